"""A frozen, typed view of the service's settings, read at call time (tests may change settings)."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Limits:
    max_text_words: int
    max_file_bytes: int
    max_request_bytes: int
    max_image_pixels: int
    max_parts: int
    max_key_chars: int


def limits() -> Limits:
    return Limits(
        max_text_words=settings.CLIP_MAX_TEXT_WORDS,
        max_file_bytes=settings.CLIP_MAX_FILE_BYTES,
        max_request_bytes=settings.CLIP_MAX_REQUEST_BYTES,
        max_image_pixels=settings.CLIP_MAX_IMAGE_PIXELS,
        max_parts=settings.CLIP_MAX_PARTS,
        max_key_chars=settings.CLIP_MAX_KEY_CHARS,
    )


def runtime_backend() -> str:
    """What CLIP_RUNTIME=auto means here: ONNX Runtime on the CPU, PyTorch on a GPU."""
    if settings.CLIP_RUNTIME != "auto":
        return settings.CLIP_RUNTIME
    if settings.CLIP_DEVICE == "cuda":
        return "torch"
    if settings.CLIP_DEVICE == "auto":
        import torch

        return "torch" if torch.cuda.is_available() else "onnx"
    return "onnx"


def runtime_config():
    from embeddings.runtime.state import RuntimeConfig

    return RuntimeConfig(
        model=settings.CLIP_MODEL,
        models_dir=settings.CLIP_MODELS_DIR,
        device=settings.CLIP_DEVICE,
        # 0: share the cores among the worker processes
        torch_threads=settings.CLIP_TORCH_THREADS or max(1, settings.CPU_CORES // settings.WEB_CONCURRENCY),
        solo_threads=settings.CLIP_SOLO_THREADS or settings.CPU_CORES,
        max_batch=settings.CLIP_MAX_BATCH,
        max_wait_ms=settings.CLIP_MAX_WAIT_MS,
        max_queue=settings.CLIP_MAX_QUEUE,
        backend=runtime_backend(),
        quantize=settings.CLIP_QUANTIZE,
    )
