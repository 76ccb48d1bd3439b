"""JSON parsers: orjson, with its nesting limit (and no lone surrogates), never a 500."""

from __future__ import annotations

import re

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
        if len(body) > _SCAN_FROM_BYTES:
            check_string_sizes(body, max_text_chars=limits.max_text_chars, max_file_bytes=limits.max_file_bytes)


# Parsed, a JSON string costs up to 4 bytes a character (one emoji makes the whole string UCS-4), then
# its UTF-8 copy: a 99 MiB text cost 700 MB before its length was checked. So every string's length is
# read off the raw bytes first (a regular expression at C speed: about 240 MB/s, 70 on a body of escapes),
# for bodies large enough for that to matter.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_SCAN_FROM_BYTES = 1 << 20


def check_string_sizes(body: bytes, *, max_text_chars: int, max_file_bytes: int) -> None:
    """Refuse a body holding a string longer than any text or image data URL may be, before parsing it."""
    text_bytes = 12 * max_text_chars + 2  # quotes, and the longest escape (\ud83d\ude00) a character
    data_url_bytes = 4 * (max_file_bytes // 3 + 1) + 256 + 2  # base64, its data:image/...;base64, header
    for match in _STRING.finditer(body):
        size = match.end() - match.start()
        if size <= text_bytes:
            continue
        if body[match.start() + 1 : match.start() + 6].lower() != b"data:":
            raise errors.TextTooLong(f"The body holds a text of over {max_text_chars} characters; that is the limit.")
        if size > data_url_bytes:
            raise errors.FileTooLarge(f"The body holds an image data URL over the {max_file_bytes}-byte file limit.")
