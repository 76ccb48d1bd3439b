"""A JSON parser for small API bodies (feedback): orjson, with its nesting limit, never a 500."""

from __future__ import annotations

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from clipsite.config import current
from embeddings import errors


class SafeJSONParser(JSONParser):
    """DRF's JSONParser, but a body nested too deep (which makes the stdlib recurse) is a 400 too."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = current().limits.max_json_bytes
        body = stream.read(limit + 1) if stream is not None else b""
        if len(body) > limit:  # a body that declared no length, or lied about it
            raise errors.RequestTooLarge(f"The JSON body is over the limit of {limit} bytes.")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # orjson refuses nesting over 1024 levels
            raise ParseError("The body is not valid JSON.") from exc
