"""JSON parsers: orjson, with its nesting limit (and no lone surrogates), never a 500."""

from __future__ import annotations

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from clipsite.config import current
from embeddings import errors


class SafeJSONParser(JSONParser):
    """DRF's JSONParser for small bodies (feedback), but a body nested too deep (which makes the stdlib
    recurse) or holding a lone surrogate is a 400 too."""

    def body_limit(self) -> int:
        return current().limits.max_json_bytes

    def check(self, body: bytes) -> None:
        """A look at the raw bytes before parsing, for what parsing alone would cost too much."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = self.body_limit()
        body = stream.read(limit + 1) if stream is not None else b""
        if len(body) > limit:  # a body that declared no length, or lied about it
            raise errors.RequestTooLarge(f"The JSON body is over the limit of {limit} bytes.")
        self.check(body)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # orjson refuses nesting over 1024 levels
            raise ParseError("The body is not valid JSON.") from exc


class InputsJSONParser(SafeJSONParser):
    """The OpenAI-compatible body: up to the request limit (base64 images), and never more JSON values
    than the part limit allows. Parsed, a body of tiny values (``[[],[],...]``) costs some 20 times its
    size in Python objects; counting its separators first (at C speed) refuses it for what it is."""

    def body_limit(self) -> int:
        return current().limits.max_request_bytes

    def check(self, body: bytes) -> None:
        limits = current().limits
        # Texts may hold commas and colons, at most one a character, and each image's data URL one comma.
        allowed = limits.max_parts * (limits.max_text_chars + 2) + 64
        if body.count(b",") + body.count(b":") > allowed:
            raise errors.TooManyParts(f"The body holds more values than {limits.max_parts} inputs can.")
