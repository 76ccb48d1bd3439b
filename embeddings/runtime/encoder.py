"""Encoding images and texts with a loaded CLIP-family model, exactly as transformers' pipeline does.

Work is split in two: ``prepare_*`` (tokenize, preprocess) runs in the request's thread, and the
forward runs in the batcher's inference thread, which pads each text batch only to its longest text
where that gives the same vectors.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embeddings.runtime import coordination
from embeddings.runtime.batching import Batcher
from embeddings.runtime.preprocess import FastImagePreprocessor

logger = logging.getLogger(__name__)

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


def text_input_names(tokenizer) -> list[str]:
    """The tokenizer outputs a CLIP-family text tower takes."""
    return [n for n in tokenizer.model_input_names if n != "token_type_ids"]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class PreparedText:
    ids: list[int]
    truncated: bool


class TorchBackend:
    """The model's own forward, in float32 eager PyTorch.

    ``threads`` is this worker's share of the cores; ``solo_threads`` what it may use while every other
    worker process is idle (see coordination.py): all cores for the one request of a quiet server,
    a share each under load, so the cores are never oversubscribed for long.
    """

    name = "torch"

    def __init__(self, model, device: str, *, threads: int = 0, solo_threads: int = 0):
        self.model, self.device = model, device
        self.threads, self.solo_threads = threads, solo_threads or threads

    def _run(self, method, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        wanted = self.threads if coordination.others_busy() else self.solo_threads
        if wanted and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        coordination.mark_busy(True)
        try:
            with torch.inference_mode():
                return _embeddings(method(**tensors)).float().cpu().numpy()
        finally:
            coordination.mark_busy(False)

    def text_features(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(self.model.get_text_features, inputs)

    def image_features(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(self.model.get_image_features, inputs)


class ClipEncoder:
    """A CLIP-family model, its processor and a backend. ``encode_*`` return raw float32 projections."""

    def __init__(
        self,
        model,
        processor,
        *,
        name: str,
        device: str = "cpu",
        test_model: dict | None = None,
        backend=None,
        fast_preprocessing: bool = True,
        threads: int = 0,
        solo_threads: int = 0,
        logit_scale: float | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.name = name
        self.device = device
        self.test_model = test_model
        self.backend = backend or TorchBackend(model, device, threads=threads, solo_threads=solo_threads)
        config = model.config
        self.model_type = getattr(config, "model_type", "")
        text_config = getattr(config, "text_config", config)
        context = getattr(text_config, "max_position_embeddings", None) or 77
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None) or context
        self.max_text_tokens = int(min(context, tokenizer_max))
        self.fixed_text_length = _FIXED_LENGTH_PADDING.get(self.model_type)
        if self.fixed_text_length:
            self.fixed_text_length = min(self.fixed_text_length, self.max_text_tokens)
        self.text_input_names = text_input_names(self.tokenizer)
        scale = getattr(model, "logit_scale", None)
        if logit_scale is not None:
            self.logit_scale = logit_scale
        elif isinstance(scale, torch.Tensor) and scale.device.type != "meta":
            self.logit_scale = float(scale.exp().item())
        else:
            self.logit_scale = 100.0
        self.dim = int(getattr(config, "projection_dim", 0) or 0)
        self.fast = FastImagePreprocessor.from_processor(self.image_processor) if fast_preprocessing else None
        if self.fast is not None and not self.fast.agrees_with(self.image_processor):
            self.fast = None
        self.batcher: Batcher | None = None
        self._tokenizer_lock = threading.Lock()

    @property
    def is_test_model(self) -> bool:
        return self.test_model is not None

    @property
    def draft_min_side(self) -> int | None:
        """For JPEG drafts (``decode_image`` keeps the short side >= twice this): the model's input side.

        Decoding at 1/2-1/8 scale down to the model's input size keeps cosine >= 0.9999 to the stock
        pipeline on real photographs (tests/embeddings/test_batching.py) at a fraction of the cost.
        Only with our own preprocessing: the stock processor's path stays exactly the stock one.
        """
        return -(-self.fast.target_short_side // 2) if self.fast is not None else None

    def use_backend(self, backend) -> None:
        """Serve from another backend (ONNX Runtime) and let the torch weights go."""
        self.backend = backend
        self.model = None

    def start_batching(self, *, max_batch: int, max_wait_ms: float, max_queue: int) -> None:
        self.batcher = Batcher(
            {"text": self.forward_texts, "image": self.forward_images},
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )

    # --- texts ---------------------------------------------------------------------------------
    def prepare_texts(self, texts: Sequence[str]) -> list[PreparedText]:
        """Token ids as the model's own tokenizer gives them, truncated to the model's context."""
        limit = self.fixed_text_length or self.max_text_tokens
        # A fast tokenizer keeps its truncation setting in shared state: one request thread at a time.
        with self._tokenizer_lock:
            full = self.tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
            cut = self.tokenizer(list(texts), truncation=True, max_length=limit, padding=False)["input_ids"]
        return [PreparedText(list(c), len(f) > self.max_text_tokens) for f, c in zip(full, cut, strict=True)]

    def forward_texts(self, items: Sequence[PreparedText]) -> np.ndarray:
        """One forward for a batch; CLIP pads to the batch's longest text (exact, thanks to its mask)."""
        padding = "max_length" if self.fixed_text_length else "longest"
        with self._tokenizer_lock:
            padded = self.tokenizer.pad(
                {"input_ids": [item.ids for item in items]},
                padding=padding,
                max_length=self.fixed_text_length,
                return_tensors="np",
            )
        inputs = {k: np.asarray(padded[k], dtype=np.int64) for k in self.text_input_names if k in padded}
        return self.backend.text_features(inputs)

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        prepared = self.prepare_texts(texts)
        run = self.batcher.run if self.batcher else (lambda _kind, items: self.forward_texts(items))
        return run("text", prepared), [p.truncated for p in prepared]

    # --- images --------------------------------------------------------------------------------
    def prepare_images(self, images: Sequence) -> list[dict[str, np.ndarray]]:
        """Each RGB PIL image to the model's inputs, one dict of arrays (batch dimension 1) per image."""
        prepared = []
        for image in images:
            pixels = self.fast(image) if self.fast is not None else None
            if pixels is not None:
                prepared.append({"pixel_values": pixels[None]})
            else:
                out = self.image_processor(images=[image], return_tensors="np")
                prepared.append({k: np.asarray(v) for k, v in out.items()})
        return prepared

    def forward_images(self, items: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        inputs = {k: np.concatenate([item[k] for item in items]) for k in items[0]}
        return self.backend.image_features(inputs)

    def encode_images(self, images: Sequence) -> np.ndarray:
        prepared = self.prepare_images(images)
        run = self.batcher.run if self.batcher else (lambda _kind, items: self.forward_images(items))
        return run("image", prepared)

    def warm_up(self) -> None:
        """Embed one text and one blank image so the first request pays no lazy initialisation."""
        from PIL import Image

        vectors, _ = self.encode_texts(["a photo of a cat"])
        self.encode_images([Image.new("RGB", (224, 224), (127, 127, 127))])
        self.dim = int(vectors.shape[-1])
        if not all(math.isfinite(x) for x in vectors[0][:4]):
            raise RuntimeError("the model produced non-finite text vectors")
