"""Image preprocessing without the stock processor's overhead, proven equal to it at load time.

The stock CLIP image processor converts to numpy, back to PIL, resizes, crops and normalises in
float64. We do the same steps once each (PIL bicubic resize, a crop, one fused multiply-add in
float32) and, before using this path for a model, check it against the model's own processor.
"""

from __future__ import annotations

import logging
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
