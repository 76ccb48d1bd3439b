"""The process-wide runtime: one model per process, loaded once, in the background when asked."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from embeddings.runtime.encoder import ClipEncoder
from embeddings.runtime.loading import load_model, resolve_model_source

logger = logging.getLogger(__name__)


def process_age() -> float | None:
    """Seconds since this process started (for a gunicorn worker: since its fork), from /proc."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class RuntimeNotReady(Exception):
    """The model is not loaded (yet, or it failed)."""


@dataclass(frozen=True)
class RuntimeConfig:
    model: str
    models_dir: Path
    device: str
    torch_threads: int = 0
    solo_threads: int = 0  # torch threads while the other worker processes are idle: all cores
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    backend: str = "torch"  # "torch" or "onnx" (ONNX Runtime, on CPU)
    quantize: str = "none"  # "none" or "int8" (onnx)


class Runtime:
    """Holds the encoder of this process. ``start`` is idempotent; ``encoder()`` raises until ready."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._encoder: ClipEncoder | None = None
        self.status = "idle"  # idle -> loading -> ready | failed
        self.error: str | None = None
        self.started_at: float | None = None
        self.ready_seconds: float | None = None
        self.process_seconds_to_ready: float | None = None
        self.config: RuntimeConfig | None = None

    def encoder(self) -> ClipEncoder:
        encoder = self._encoder
        if encoder is None:
            raise RuntimeNotReady(self.error or self.status)
        return encoder

    @property
    def ready(self) -> bool:
        return self._encoder is not None

    def load(self, config: RuntimeConfig) -> ClipEncoder:
        """Load synchronously (idempotent: a second call returns the loaded encoder)."""
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            self.status, self.started_at = "loading", time.monotonic()
            try:
                self._set_threads(config.torch_threads)
                source = resolve_model_source(config.model, config.models_dir)
                encoder = self._from_onnx_cache(source, config) if config.backend == "onnx" else None
                if encoder is None:
                    model, processor, device = load_model(source, device=config.device)
                    encoder = ClipEncoder(
                        model,
                        processor,
                        name=source.name,
                        device=device,
                        test_model=source.test_model,
                        threads=config.torch_threads,
                        solo_threads=config.solo_threads,
                    )
                    if config.backend == "onnx":
                        self._use_onnx(encoder, model, source, config)
                encoder.start_batching(
                    max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue
                )
                encoder.warm_up()
            except Exception as exc:
                self.status, self.error = "failed", str(exc)
                raise
            if encoder.is_test_model:
                logger.warning(
                    "SERVING A RANDOM-WEIGHT TEST MODEL (%s): its vectors carry no meaning. "
                    "Set CLIP_MODEL to a real model.",
                    encoder.name,
                )
            self._encoder, self.status, self.config = encoder, "ready", config
            self.ready_seconds = time.monotonic() - self.started_at
            self.process_seconds_to_ready = process_age()
            logger.info(
                "Model %s ready on %s (%s) in %.1f s",
                encoder.name,
                encoder.device,
                encoder.backend.name,
                self.ready_seconds,
            )
            return encoder

    def start(self, config: RuntimeConfig, *, on_failure=None) -> None:
        """Load in a background thread, once; ``on_failure(exc)`` runs if loading fails."""
        with self._lock:
            if self._thread is not None or self._encoder is not None:
                return
            self._thread = threading.Thread(
                target=self._load_in_background, args=(config, on_failure), name="clip-warmup", daemon=True
            )
            self._thread.start()

    def _load_in_background(self, config: RuntimeConfig, on_failure) -> None:
        try:
            self.load(config)
        except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
            logger.critical("Cannot load CLIP_MODEL=%r: %s", config.model, exc)
            if on_failure is not None:
                on_failure(exc)

    @staticmethod
    def _onnx_threads(config: RuntimeConfig) -> dict[str, int]:
        return {"image": config.solo_threads or config.torch_threads, "text": config.torch_threads}

    def _from_onnx_cache(self, source, config: RuntimeConfig) -> ClipEncoder | None:
        """With the export already cached, never load the torch weights: ONNX Runtime holds them."""
        from embeddings.runtime.encoder import text_input_names
        from embeddings.runtime.loading import load_model_shell, read_logit_scale
        from embeddings.runtime.onnx import OnnxBackend, cached_onnx_files

        model, processor = load_model_shell(source)
        names = text_input_names(processor.tokenizer)
        files = cached_onnx_files(source.model_dir, quantize=config.quantize, text_input_names=names)
        if files is None:
            return None
        encoder = ClipEncoder(
            model,
            processor,
            name=source.name,
            device="cpu",
            test_model=source.test_model,
            logit_scale=read_logit_scale(source.model_dir),
        )
        encoder.use_backend(
            OnnxBackend(
                files, threads=self._onnx_threads(config), name="onnx-int8" if config.quantize == "int8" else "onnx"
            )
        )
        return encoder

    @staticmethod
    def _use_onnx(encoder: ClipEncoder, model, source, config: RuntimeConfig) -> None:
        """Serve from ONNX Runtime; float32 falls back to torch if the export fails, int8 never does."""
        from embeddings.runtime.onnx import OnnxBackend

        try:
            backend = OnnxBackend.for_model(
                model,
                source.model_dir,
                quantize=config.quantize,
                threads=Runtime._onnx_threads(config),
                text_input_names=encoder.text_input_names,
            )
        except Exception as exc:
            if config.quantize != "none":
                raise
            logger.warning("ONNX export of %s failed (%s): serving it with PyTorch", source.name, exc)
            return
        encoder.use_backend(backend)

    @staticmethod
    def _set_threads(threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)

    def reset(self) -> None:
        """Forget the loaded model (tests only)."""
        with self._lock:
            if self._encoder is not None and self._encoder.batcher is not None:
                self._encoder.batcher.stop()
            self._encoder, self._thread, self.status, self.error, self.config = None, None, "idle", None, None


runtime = Runtime()
