"""What an embeddings request means: validate the parts, call the runtime, shape the answer."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from clipsite.config import current
from embeddings import errors
from embeddings.images import DecodedImage, decode_image
from embeddings.logs import note_embedded
from embeddings.multipart import Part
from embeddings.runtime.engine import Engine
from embeddings.runtime.state import runtime
from embeddings.texts import check_text

ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EncodedParts:
    texts_keys: list[str]
    images_keys: list[str]
    texts_raw: np.ndarray  # (n_texts, dim) float32 projections
    images_raw: np.ndarray
    truncated: list[str]
    model: str  # the served name of the model that computed them
    text_tokens: int = 0  # tokens the model read over all texts (the OpenAI endpoint's usage)


def current_engine() -> Engine:
    """The loaded engine; before it is ready, RuntimeNotReady (errors.py answers it with 503 not_ready)."""
    return runtime.engine()


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def text_of(part: Part) -> str:
    """A text part's content, checked: not over the character limit (refused before decoding when its
    bytes alone say so), valid UTF-8, not empty, not over the word limit."""
    limit = current().limits.max_text_chars
    if len(part.data) > 4 * limit:  # UTF-8 takes at most 4 bytes a character
        raise errors.TextTooLong(
            f"Text part {part.key!r} has more than {limit} characters; the limit is {limit}.", key=part.key
        )
    try:
        text = part.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidText(f"Text part {part.key!r} is not valid UTF-8.", key=part.key) from exc
    return check_text(text, key=part.key)


def image_of(part: Part, engine: Engine, *, pixel_budget: int | None = None) -> DecodedImage:
    """An image part decoded the one way every endpoint decodes it (same bytes, same vector).

    ``pixel_budget``: what is left of the request's decoded-pixel budget; an image that would decode to
    more is refused from its header, before a pixel is decoded.
    """
    return decode_image(
        part.data,
        key=part.key,
        max_pixels=current().limits.max_image_pixels,
        draft_min_side=engine.draft_min_side,
        pixel_budget=pixel_budget,
    )


def check_part_count(parts: list[Part]) -> None:
    """The part limit for parts from any source (the multipart reader enforces it while reading)."""
    limit = current().limits.max_parts
    if len(parts) > limit:
        raise errors.TooManyParts(f"The request has more than {limit} parts.")


def encode_parts(parts: list[Part], *, client: str = "") -> EncodedParts:
    """Validate and embed every part; raises an ApiError naming the first part at fault.

    Images are decoded, preprocessed to the model's input and let go one at a time, so a request holds
    at most one decoded picture at once, and all its images together may decode to at most
    ``CLIP_MAX_REQUEST_PIXELS``.
    """
    if not parts:
        raise errors.EmptyRequest()
    check_part_count(parts)
    engine = current_engine()
    texts = [(p.key, text_of(p)) for p in parts if not p.is_file]
    budget = current().limits.max_request_pixels
    images = []
    for part in (p for p in parts if p.is_file):
        decoded = image_of(part, engine, pixel_budget=budget)
        budget -= decoded.image.width * decoded.image.height
        images.append((part.key, engine.preprocess_image(decoded.image)))
        del decoded
    out = engine.embed(images=[i for _, i in images], texts=[t for _, t in texts], client=client)
    note_embedded(images=len(images), texts=len(texts), batches=out.batches)
    return EncodedParts(
        texts_keys=[k for k, _ in texts],
        images_keys=[k for k, _ in images],
        texts_raw=out.texts,
        images_raw=out.images,
        truncated=[k for (k, _), flag in zip(texts, out.truncated, strict=True) if flag],
        model=engine.served_name,
        text_tokens=sum(out.text_tokens),
    )


def _pair_suffix(key: str, word: str) -> str | None:
    return key[len(word) :] if key.lower().startswith(word) else None


def paired_keys(images_keys: list[str], texts_keys: list[str]) -> list[tuple[int, int]]:
    """Image/text pairs whose keys agree after the word image/text (``image-1`` with ``text-1``)."""
    by_suffix = {}
    for j, key in enumerate(texts_keys):
        suffix = _pair_suffix(key, "text")
        if suffix is not None:
            by_suffix.setdefault(suffix, j)
    pairs = []
    for i, key in enumerate(images_keys):
        suffix = _pair_suffix(key, "image")
        if suffix is not None and suffix in by_suffix:
            pairs.append((i, by_suffix[suffix]))
    return pairs


def similarity_scores(images: np.ndarray, texts: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """100 x cosine similarity (CLIP's logit scale), images x texts (``normalized``: already unit length)."""
    if not normalized:
        images, texts = l2_normalize(images), l2_normalize(texts)
    return 100.0 * (images @ texts.T)


def vector_out(vector: np.ndarray, encoding: str):
    """A vector as the client asked: float32 numbers (the renderer writes each float32 exactly, in
    its shortest form), or base64 of little-endian float32."""
    vector = np.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector


def embeddings_compute(
    *, parts: list[Part], request_id: str, normalize: bool = True, encoding: str = "float", client: str = ""
) -> dict:
    """The whole answer of ``POST /syte_test/embeddings`` for already-parsed parts."""
    encoded = encode_parts(parts, client=client)
    texts = l2_normalize(encoded.texts_raw) if normalize else encoded.texts_raw
    images = l2_normalize(encoded.images_raw) if normalize else encoded.images_raw
    texts_out = [vector_out(v, encoding) for v in texts]
    images_out = [vector_out(v, encoding) for v in images]
    by_key = dict(zip(encoded.texts_keys, texts_out, strict=True)) | dict(
        zip(encoded.images_keys, images_out, strict=True)
    )
    body = {
        "request_id": request_id,
        "model": encoded.model,
        "dim": int(texts.shape[1] if len(texts) else images.shape[1]),
        "normalized": normalize,
        "encoding": encoding,
        "texts_vectors": texts_out,
        "images_vectors": images_out,
        "texts_keys": encoded.texts_keys,
        "images_keys": encoded.images_keys,
        "vectors": {p.key: by_key[p.key] for p in parts},
        "similarities": [],
        "truncated": encoded.truncated,
    }
    if len(texts) and len(images):
        unit = (images, texts) if normalize else (encoded.images_raw, encoded.texts_raw)
        matrix = np.round(similarity_scores(*unit, normalized=normalize).astype(np.float64), 2)
        body["similarities"] = [
            {"image": encoded.images_keys[i], "text": encoded.texts_keys[j], "score": float(matrix[i, j])}
            for i, j in paired_keys(encoded.images_keys, encoded.texts_keys)
        ]
        body["similarity_matrix"] = matrix.tolist()
    return body
