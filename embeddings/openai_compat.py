"""What an OpenAI-style embeddings request means: ``POST /v1/embeddings`` and ``GET /v1/models``.

The body is OpenAI's (``model``, ``input``, ``encoding_format``, ``dimensions``, ``user``); the inputs
become the same parts a multipart request gives, so the limits, the decoding and the vectors are the
embeddings endpoint's. A ``data:image/...;base64,...`` string is an image, any other string a text, and
the answer keeps the order of ``input``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time

from clipsite.config import current
from embeddings import errors
from embeddings.multipart import Part
from embeddings.services import check_part_count, current_engine, encode_parts, l2_normalize, vector_out

FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
ENCODINGS = ("float", "base64")
# RFC 2397: data:[<mediatype>][;base64],<data>. Only base64 images; the media type itself is not trusted
# (the decoder reads the bytes' own signature, as for an upload's filename).
_DATA_IMAGE = re.compile(r"data:image/([\w.+-]+)((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)
_STARTED = int(time.time())


def served_model() -> str:
    """The name the model is served under: /v1/models lists it, and a request's ``model`` must name it."""
    return current_engine().served_name


def models_list() -> dict:
    """``GET /v1/models``: the one served model, in OpenAI's shape."""
    return {"object": "list", "data": [_model_object(served_model())]}


def model_retrieve(model_id: str) -> dict:
    """``GET /v1/models/<id>``: the served model, or 404 model_not_found."""
    _check_model(model_id)
    return _model_object(model_id)


def _model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "clipsite"}


def _check_model(model) -> None:
    served = served_model()
    if not isinstance(model, str):
        raise errors.InvalidParameter("model must be a string: the name GET /v1/models lists.", key="model")
    if model != served:
        raise errors.UnknownModel(f"This server serves {served!r}, not {model[:200]!r}.", key="model")


def _parts_of(inputs: list, *, key_prefix: str = "input") -> list[Part]:
    """Each input as a part: an image file for a base64 image data URL, else a text field."""
    max_bytes, max_chars = current().limits.max_file_bytes, current().limits.max_text_chars
    parts = []
    for index, item in enumerate(inputs):
        key = f"{key_prefix}[{index}]"
        if not isinstance(item, str):
            raise errors.InvalidParameter(
                f"{key} is not a string: send texts, or images as data:image/...;base64,... strings "
                "(token arrays are not taken).",
                key=key,
            )
        match = _DATA_IMAGE.match(item)
        if match is None:
            if item[:11].lower() == "data:image/":
                raise errors.InvalidImage(f"{key} is a data URL but not data:image/...;base64,...", key=key)
            if len(item) > max_chars:  # before its UTF-8 copy, which may be 4 times its length
                raise errors.TextTooLong(f"{key} has more than {max_chars} characters; that is the limit.", key=key)
            parts.append(Part(key=key, data=item.encode("utf-8")))
            continue
        payload = item[match.end() :]
        if len(payload) // 4 * 3 > max_bytes:  # refused before decoding a byte of it
            raise errors.FileTooLarge(f"Image {key} is over the {max_bytes}-byte file limit.", key=key)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.InvalidImage(f"{key} is not valid base64.", key=key) from exc
        parts.append(Part(key=key, data=data, filename=f"{key}.{match.group(1).lower()}"))
    return parts


def embeddings_create(*, body, client: str = "") -> dict:
    """The whole answer of ``POST /v1/embeddings`` for a parsed JSON body."""
    if not isinstance(body, dict):
        raise errors.MalformedRequest('The body must be a JSON object: {"model": ..., "input": ...}.')
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise errors.InvalidParameter(
            f"Unknown field {unknown[0][:100]!r}: this endpoint takes {', '.join(sorted(FIELDS))}.", key=unknown[0]
        )
    if "model" in body:  # optional here (one model is served); when named, it must be that one
        _check_model(body["model"])
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise errors.InvalidParameter(
            f"encoding_format={str(encoding)[:100]!r} is not one of: {', '.join(ENCODINGS)}.", key="encoding_format"
        )
    if "input" not in body:
        raise errors.EmptyRequest("The body has no input: a string, or a list of strings.")
    inputs = body["input"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list):
        raise errors.InvalidParameter("input must be a string or a list of strings.", key="input")
    if not inputs:
        raise errors.EmptyRequest("input is empty: send at least one text or image.")
    check_part_count(inputs)  # before any image is decoded
    parts = _parts_of(inputs)
    dim = current_engine().dim
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise errors.DimensionsUnsupported(
            f"dimensions={repr(dimensions)[:50]} is not supported: this model's vectors have {dim} dimensions, and "
            "shortening them is not offered (yet). Leave dimensions out, or send it equal to the model's.",
            key="dimensions",
        )
    encoded = encode_parts(parts, client=client)
    rows = dict(zip(encoded.texts_keys, l2_normalize(encoded.texts_raw), strict=True)) | dict(
        zip(encoded.images_keys, l2_normalize(encoded.images_raw), strict=True)
    )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector_out(rows[p.key], encoding)}
            for i, p in enumerate(parts)
        ],
        "model": encoded.model,
        "usage": {"prompt_tokens": encoded.text_tokens, "total_tokens": encoded.text_tokens},
    }
