"""Preprocessing, apart from any backend and shared by every endpoint: images to the model's pixels,
texts to its token ids, exactly as the model's own processor does.

Images: the stock CLIP image processor converts to numpy, back to PIL, resizes, crops and normalises
in float64. The fast path does the same steps once each (PIL resize, a crop, one fused multiply-add in
float32) and is used only when, checked once at load, it gives the stock processor's pixels.

Texts: tokenised once in the request's thread (cut to the model's context the way the tokenizer's own
truncation cuts, checked at load), and padded in the inference thread with numpy alone: to the
batch's longest text where the mask makes that exact, else to the family's fixed length.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def _get(obj, name, default=None):
    value = getattr(obj, name, default)
    return default if value is None else value


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("shortest_edge", "longest_edge", "height", "width") if getattr(size, k, None)}


@dataclass(frozen=True)
class FastImagePreprocessor:
    shortest_edge: int | None  # resize so the short side has this length (CLIP), or ...
    resize_to: tuple[int, int] | None  # ... resize to exactly (height, width) (SigLIP)
    crop: tuple[int, int] | None  # centre crop (height, width)
    resample: int
    scale: np.ndarray  # per channel: rescale_factor / std
    offset: np.ndarray  # per channel: -mean / std

    @classmethod
    def from_processor(cls, image_processor) -> FastImagePreprocessor | None:
        """The fast path for processors doing resize / centre crop / rescale / normalise, else None."""
        if _get(image_processor, "do_pad", False) or not _get(image_processor, "do_resize", False):
            return None
        if _get(image_processor, "do_convert_rgb", True) is False:
            return None
        size = _size_dict(_get(image_processor, "size"))
        if set(size) == {"shortest_edge"}:
            shortest, resize_to = int(size["shortest_edge"]), None
        elif set(size) == {"height", "width"}:
            shortest, resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            return None
        crop = None
        if _get(image_processor, "do_center_crop", False):
            crop_size = _size_dict(_get(image_processor, "crop_size"))
            if set(crop_size) != {"height", "width"}:
                return None
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        factor = (
            float(_get(image_processor, "rescale_factor", 1 / 255))
            if _get(image_processor, "do_rescale", True)
            else 1.0
        )
        if _get(image_processor, "do_normalize", True):
            mean = np.asarray(_get(image_processor, "image_mean", [0.0, 0.0, 0.0]), dtype=np.float64).reshape(-1)
            std = np.asarray(_get(image_processor, "image_std", [1.0, 1.0, 1.0]), dtype=np.float64).reshape(-1)
            if mean.size == 1:
                mean = np.repeat(mean, 3)
            if std.size == 1:
                std = np.repeat(std, 3)
        else:
            mean, std = np.zeros(3), np.ones(3)
        resample = _get(image_processor, "resample", Image.Resampling.BICUBIC)
        try:
            resample = int(resample)
        except (TypeError, ValueError):
            return None
        return cls(
            shortest_edge=shortest,
            resize_to=resize_to,
            crop=crop,
            resample=resample,
            scale=(factor / std).astype(np.float32).reshape(3, 1, 1),
            offset=(-mean / std).astype(np.float32).reshape(3, 1, 1),
        )

    @property
    def target_short_side(self) -> int:
        """The short side the model sees: JPEGs much larger than twice this are draft-decoded."""
        if self.crop:
            return min(self.crop)
        if self.resize_to:
            return min(self.resize_to)
        return int(self.shortest_edge)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, computed as transformers does (long side truncated)."""
        if self.resize_to:
            return self.resize_to[1], self.resize_to[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image to the model's (3, H, W) float32 input."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.output_size(*image.size)
        if size != image.size:
            image = image.resize(size, resample=self.resample)
        if self.crop:
            crop_h, crop_w = self.crop
            width, height = image.size
            if crop_h <= height and crop_w <= width:
                top, left = (height - crop_h) // 2, (width - crop_w) // 2
                image = image.crop((left, top, left + crop_w, top + crop_h))
            else:
                return None  # an image smaller than the crop: the stock processor pads it; let it
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        return pixels * self.scale + self.offset

    def agrees_with(self, image_processor, *, atol: float = 1e-4) -> bool:
        """Does this path give the stock processor's pixels on a few awkward sizes and modes?"""
        rng = np.random.default_rng(0)
        for width, height in ((301, 227), (224, 224), (640, 480), (333, 1001)):
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            array[: height // 2] //= 3  # structure, not only noise
            image = Image.fromarray(array, "RGB")
            want = image_processor(images=[image], return_tensors="np")["pixel_values"][0]
            got = self(image)
            if got is None or got.shape != want.shape or float(np.max(np.abs(got - want))) > atol:
                logger.info(
                    "Fast preprocessing disagrees with %s; using the stock processor", type(image_processor).__name__
                )
                return False
        return True


# Families trained on texts padded to a fixed length that pool a fixed position (SigLIP pools the
# last): per-batch padding would change their vectors, so their texts are padded as their
# processor documents (transformers' zero-shot pipeline pads SigLIP to 64).
FIXED_TEXT_LENGTH = {"siglip": 64, "siglip2": 64}

_PROBE_TEXTS = ("a photo of a cat", "x", " ".join(["photograph"] * 120), "Zwei Hunde 🐕 im Schnee")


def probe_image(width: int = 301, height: int = 227, seed: int = 0) -> Image.Image:
    """A deterministic picture with structure (not only noise), for the checks made at load."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[: height // 2] //= 3
    return Image.fromarray(array, "RGB")


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    truncated: bool  # longer than the model's context, and cut to it


class UnsupportedProcessor(Exception):
    """The model's processor makes inputs the engine cannot batch (e.g. SigLIP 2 NaFlex's patches)."""


class Preprocessing:
    """The model's processor, as the engine uses it: ``image`` and ``tokenize`` run in request threads,
    ``pad`` in the inference thread."""

    def __init__(self, processor, *, family: str, context: int):
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.family = family
        stock = self.image_processor(images=[probe_image()], return_tensors="np")
        if set(stock) != {"pixel_values"}:
            raise UnsupportedProcessor(
                f"{type(self.image_processor).__name__} makes {sorted(stock)}: only processors of fixed-size "
                "pixel_values are supported (SigLIP 2's NaFlex variants are not; its fixed-resolution ones are)"
            )
        fast = FastImagePreprocessor.from_processor(self.image_processor)
        self.fast = fast if fast is not None and fast.agrees_with(self.image_processor) else None
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None) or context
        self.max_tokens = int(min(context, tokenizer_max))
        fixed = FIXED_TEXT_LENGTH.get(family)
        self.fixed_length = min(fixed, self.max_tokens) if fixed else None
        self.uses_mask = "attention_mask" in self.tokenizer.model_input_names
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.pad_left = getattr(self.tokenizer, "padding_side", "right") == "left"
        self._lock = threading.Lock()  # a fast tokenizer's truncation state is shared: one call at a time
        self._specials = self._special_frame()
        if not self._cuts_like_the_tokenizer():
            logger.info("Own truncation disagrees with %s; the tokenizer truncates", type(self.tokenizer).__name__)
            self._specials = None

    # --- images ----------------------------------------------------------------------------------
    @property
    def draft_min_side(self) -> int | None:
        """For JPEG drafts (``decode_image`` keeps the short side >= twice this): the model's input side.

        Decoding at 1/2-1/8 scale down to the model's input size keeps cosine >= 0.9999 to the stock
        pipeline on real photographs (tests/embeddings/test_preprocessing.py) at a fraction of the cost.
        Only with the fast path: the stock processor's path stays exactly the stock one.
        """
        return -(-self.fast.target_short_side // 2) if self.fast is not None else None

    def image(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image to the model's (3, H, W) float32 input."""
        pixels = self.fast(image) if self.fast is not None else None
        if pixels is None:
            pixels = self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        return np.asarray(pixels, dtype=np.float32)

    # --- texts -----------------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self.fixed_length or self.max_tokens

    def _special_frame(self) -> tuple[int, int]:
        """How many special tokens the tokenizer puts before and after a text's own tokens."""
        with_specials = self.tokenizer("photo", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("photo", add_special_tokens=False)["input_ids"]
        for start in range(len(with_specials) - len(plain) + 1):
            if with_specials[start : start + len(plain)] == plain:
                return start, len(with_specials) - start - len(plain)
        return 0, 0

    def _cut(self, ids: list[int]) -> list[int]:
        head, tail = self._specials
        keep = self.limit - head - tail
        return ids[: head + keep] + (ids[len(ids) - tail :] if tail else [])

    def _cuts_like_the_tokenizer(self) -> bool:
        texts = list(_PROBE_TEXTS)
        full = self.tokenizer(texts, truncation=False, padding=False)["input_ids"]
        want = self.tokenizer(texts, truncation=True, max_length=self.limit, padding=False)["input_ids"]
        return all(
            (self._cut(f) if len(f) > self.limit else list(f)) == list(w) for f, w in zip(full, want, strict=True)
        )

    def tokenize(self, texts: Sequence[str]) -> list[Tokens]:
        """Token ids as the model's own tokenizer gives them, cut to the model's context."""
        with self._lock:
            full = self.tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
            if self._specials is None:
                cut = self.tokenizer(list(texts), truncation=True, max_length=self.limit, padding=False)["input_ids"]
        if self._specials is not None:
            cut = [self._cut(ids) if len(ids) > self.limit else ids for ids in full]
        return [Tokens(list(c), len(f) > self.max_tokens) for f, c in zip(full, cut, strict=True)]

    def pad(self, items: Sequence[Tokens]) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch's ids (n, length) and mask (None when the model takes none), numpy only."""
        length = self.fixed_length or max(len(item.ids) for item in items)
        ids = np.full((len(items), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), length), dtype=np.int64)
        for row, item in enumerate(items):
            n = len(item.ids)
            span = slice(length - n, length) if self.pad_left else slice(0, n)
            ids[row, span] = item.ids
            mask[row, span] = 1
        return ids, (mask if self.uses_mask else None)
