"""Reading multipart/form-data uploads under the service's limits, keeping every part's raw bytes.

Django's own form parser decodes text fields with ``errors="replace"`` and stores files on disk; we
need the raw bytes of each part (to refuse bad UTF-8), the parts in the order they came, and limits
enforced while reading, so a request over a limit is refused before the rest of it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.http.multipartparser import (
    FIELD,
    FILE,
    ChunkIter,
    InputStreamExhausted,
    LazyStream,
    MultiPartParserError,
    Parser,
)
from django.http.request import UnreadablePostError
from django.utils.datastructures import MultiValueDict
from django.utils.http import parse_header_parameters
from rest_framework.parsers import BaseParser, DataAndFiles

from clipsite.config import current
from embeddings import errors

_CHUNK = 64 * 1024
# Fields an HTML form adds on its own (DRF's browsable page posts Django's CSRF token): not inputs.
FORM_CONTROL_FIELDS = frozenset({"csrfmiddlewaretoken"})
# Clients send no preamble (RFC 2046 lets it be ignored); a long one is only parsing work.
MAX_PREAMBLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Part:
    key: str
    data: bytes
    filename: str | None = None  # a part with a filename is a file (an image); without, a text
    content_type: str | None = None

    @property
    def is_file(self) -> bool:
        return self.filename is not None


@dataclass
class Form:
    """The parts of one request, in the order they came. DRF exposes it as ``request.data``."""

    parts: list[Part] = field(default_factory=list)

    def copy(self) -> Form:
        return Form(list(self.parts))

    def update(self, other) -> None:  # DRF merges files into data; ours come in ``parts`` already
        return None

    def get(self, key, default=None):
        return next((p for p in self.parts if p.key == key), default)

    def __iter__(self):
        return iter(p.key for p in self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def declared_length(meta) -> int | None:
    try:
        return int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None


def check_declared_length(meta, limit: int | None = None) -> None:
    """Refuse a body whose declared length is over ``limit`` (default: the request limit), before reading
    a byte of it."""
    length = declared_length(meta)
    if length is None:
        raise errors.InvalidContentLength()
    limit = current().limits.max_request_bytes if limit is None else limit
    if length > limit:
        raise errors.RequestTooLarge(f"The request body is {length} bytes; the limit is {limit} bytes.")


def read_form(stream, content_type: str) -> Form:
    """Parse a multipart body from ``stream`` into a Form, enforcing every limit while reading (its
    declared length was refused over the limit before: embeddings/middleware.py)."""
    lim = current().limits
    _, params = parse_header_parameters(content_type or "")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70 or not boundary.isascii():
        raise errors.MalformedMultipart("The multipart Content-Type has no valid boundary parameter.")
    form, seen, total, preamble, browser_form = Form(), set(), 0, 0, False
    # Every delimiter counts, whatever its part turns out to be (skipped, empty, a form's own field):
    # the limit bounds the parsing work, not only the parts kept. One form control field is allowed.
    max_delimiters = lim.max_parts + len(FORM_CONTROL_FIELDS)
    lazy = LazyStream(ChunkIter(stream, _CHUNK))
    try:
        for index, (item_type, meta, part_stream) in enumerate(Parser(lazy, boundary.encode("ascii"))):
            if index == 0:  # the preamble before the first delimiter: ignored, as RFC 2046 says
                for chunk in part_stream:
                    preamble += len(chunk)
                    total += len(chunk)
                    _check_total(total, lim.max_request_bytes)
                    if preamble > MAX_PREAMBLE_BYTES:
                        raise errors.MalformedMultipart(
                            f"The body has over {MAX_PREAMBLE_BYTES} bytes before its first delimiter: it is not "
                            "well-formed multipart/form-data (each delimiter is '--' followed by the boundary)."
                        )
                continue
            if index > max_delimiters:
                raise errors.TooManyParts(f"The request has more than {lim.max_parts} parts.")
            if item_type not in (FIELD, FILE):
                continue  # a part without headers
            disposition = meta.get("content-disposition", ("", {}))[1]
            key = _decode_header_value(disposition.get("name"))
            filename = disposition.get("filename")
            filename = None if filename is None else _decode_header_value(filename)
            if key is None or key.strip() == "":
                raise errors.InvalidKey("A part has no name: every part needs a key (its form field name).")
            key = key.strip()
            if len(key) > lim.max_key_chars:
                raise errors.KeyTooLong(
                    f"A key is {len(key)} characters long; the limit is {lim.max_key_chars}.", key=key[:64]
                )
            data = bytearray()
            for chunk in part_stream:
                data += chunk
                total += len(chunk)
                if len(data) > lim.max_file_bytes:
                    raise errors.FileTooLarge(
                        f"Part {key!r} is over the limit of {lim.max_file_bytes} bytes per file.", key=key
                    )
                _check_total(total, lim.max_request_bytes)
            if filename is not None and filename == "" and not data:
                continue  # an HTML form's file input left empty
            if filename is None and key in FORM_CONTROL_FIELDS:
                browser_form = True
                continue
            if key in seen:
                raise errors.DuplicateKey(f"The key {key!r} is used by more than one part.", key=key)
            seen.add(key)
            if len(form.parts) >= lim.max_parts:  # the form control field's allowance is not for inputs
                raise errors.TooManyParts(f"The request has more than {lim.max_parts} parts.")
            content_type_header = meta.get("content-type", (None, {}))[0]
            form.parts.append(Part(key, bytes(data), filename, content_type_header))
    except (MultiPartParserError, InputStreamExhausted, UnreadablePostError, ValueError, OSError) as exc:
        raise errors.MalformedMultipart() from exc
    if browser_form:
        # A browser form sends its text inputs left empty too; only an API client's empty text is an error.
        form.parts = [p for p in form.parts if p.is_file or p.data.strip()]
    if not form.parts and preamble:
        raise errors.MalformedMultipart(
            "No form part was found: the body is not well-formed multipart/form-data "
            "(each delimiter is '--' followed by the boundary)."
        )
    return form


def _check_total(total: int, limit: int) -> None:
    if total > limit:
        raise errors.RequestTooLarge(f"The request is over the limit of {limit} bytes.")


def _decode_header_value(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class ClipMultiPartParser(BaseParser):
    """DRF parser for the embeddings API: ``request.data`` becomes a :class:`Form`."""

    media_type = "multipart/form-data"

    def parse(self, stream, media_type=None, parser_context=None):
        request = parser_context["request"]
        form = read_form(stream, request.META.get("CONTENT_TYPE", media_type or ""))
        return DataAndFiles(form, MultiValueDict())
