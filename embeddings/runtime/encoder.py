"""Encoding images and texts with a loaded CLIP-family model, exactly as transformers' pipeline does."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Families trained on texts padded to a fixed length: padding them only to the batch's longest text
# changes their vectors, so their texts are padded as their processor documents.
_FIXED_LENGTH_PADDING = {"siglip": 64, "siglip2": 64}


def _embeddings(output) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features: take the projected vector."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class TextBatch:
    inputs: dict[str, torch.Tensor]
    truncated: list[bool]


class ClipEncoder:
    """A CLIP-family model and its processor. ``encode_*`` return raw float32 projections."""

    def __init__(self, model, processor, *, name: str, device: str = "cpu", test_model: dict | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.name = name
        self.device = device
        self.test_model = test_model
        config = model.config
        self.model_type = getattr(config, "model_type", "")
        text_config = getattr(config, "text_config", config)
        context = getattr(text_config, "max_position_embeddings", None) or 77
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None) or context
        self.max_text_tokens = int(min(context, tokenizer_max))
        self.fixed_text_length = _FIXED_LENGTH_PADDING.get(self.model_type)
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.exp().item()) if isinstance(scale, torch.Tensor) else 100.0
        self.dim = int(getattr(config, "projection_dim", 0) or 0)
        # One forward at a time per model: torch already uses every thread it was given.
        self._lock = threading.Lock()

    @property
    def is_test_model(self) -> bool:
        return self.test_model is not None

    # --- texts ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        """Tokenize as the model's own processor does; mark texts longer than the model's context."""
        lengths = self.tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
        truncated = [len(ids) > self.max_text_tokens for ids in lengths]
        if self.fixed_text_length:
            padding, max_length = "max_length", min(self.fixed_text_length, self.max_text_tokens)
        else:
            padding, max_length = "longest", self.max_text_tokens
        inputs = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
        )
        names = ("input_ids", "attention_mask", "position_ids") if self.model_type != "siglip" else ("input_ids",)
        return TextBatch({k: v.to(self.device) for k, v in inputs.items() if k in names}, truncated)

    def text_features(self, batch: TextBatch) -> np.ndarray:
        with self._lock, torch.inference_mode():
            out = _embeddings(self.model.get_text_features(**batch.inputs))
        return out.float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        batch = self.tokenize(texts)
        return self.text_features(batch), batch.truncated

    # --- images --------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> dict[str, torch.Tensor]:
        """The model's own image processor on RGB PIL images."""
        inputs = self.image_processor(images=list(images), return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    def image_features(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        with self._lock, torch.inference_mode():
            out = _embeddings(self.model.get_image_features(**inputs))
        return out.float().cpu().numpy()

    def encode_images(self, images: Sequence) -> np.ndarray:
        return self.image_features(self.preprocess(images))

    def warm_up(self) -> None:
        """Embed one text and one blank image so the first request pays no lazy initialisation."""
        from PIL import Image

        vectors, _ = self.encode_texts(["a photo of a cat"])
        self.encode_images([Image.new("RGB", (224, 224), (127, 127, 127))])
        self.dim = int(vectors.shape[-1])
        if not all(math.isfinite(x) for x in vectors[0][:4]):
            raise RuntimeError("the model produced non-finite text vectors")
