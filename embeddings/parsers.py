"""A JSON parser for small API bodies (feedback): orjson, with its nesting limit, never a 500."""

from __future__ import annotations

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class SafeJSONParser(JSONParser):
    """DRF's JSONParser, but a body nested too deep (which makes the stdlib recurse) is a 400 too."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return orjson.loads(stream.read() if stream is not None else b"")
        except orjson.JSONDecodeError as exc:  # orjson refuses nesting over 1024 levels
            raise ParseError("The body is not valid JSON.") from exc
