"""The process-wide runtime: one engine per process, loaded once from what prepare_model made."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from clipsite.config import RuntimeSettings
from embeddings import metrics
from embeddings.runtime import coordination
from embeddings.runtime.backends import open_backend
from embeddings.runtime.engine import Engine, EngineSettings, ModelInfo
from embeddings.runtime.loading import load_model, load_processor, resolve_device, resolve_model_source, served_name
from embeddings.runtime.prepare import Manifest, read_manifest
from embeddings.runtime.preprocessing import Preprocessing

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


def engine_settings(settings: RuntimeSettings) -> EngineSettings:
    return EngineSettings(
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        max_queue_pixels=settings.max_queue_pixels,
        timeout_s=settings.request_timeout_s,
    )


def open_engine(settings: RuntimeSettings) -> tuple[Engine, Manifest]:
    """The engine of the prepared model: reads the manifest and opens the backends it names.

    Touches no network and exports nothing; raises ModelNotPrepared (naming prepare_model) when the
    model is not on disk or not prepared for this configuration.
    """
    source = resolve_model_source(settings.model, settings.models_dir)
    folder, manifest = read_manifest(source, settings)
    preprocessing = Preprocessing(load_processor(source), family=manifest.family, context=manifest.context)
    threads = {"image": settings.image_threads, "text": settings.text_threads}
    torch_models: dict[str, object] = {}

    # torch is imported only where a tower runs on it: elsewhere it would cost each worker ~170 MB.
    def model(dtype: str, weights: Path | None = None):  # once per dtype, only where a tower runs on torch
        if dtype not in torch_models:
            import torch

            if settings.text_threads > 0:
                torch.set_num_threads(settings.text_threads)
            device = resolve_device(settings.device)
            torch_models[dtype] = load_model(source, device=device, dtype=dtype, weights=weights)
        return torch_models[dtype]

    opened: dict[str, object] = {}
    backends = {}
    for tower, choice in manifest.towers.items():
        key = _choice_key(choice)
        if key not in opened:
            opened[key] = open_backend(choice, model=model, prepared_dir=folder, threads=threads)
        backends[tower] = opened[key]
    info = ModelInfo(
        name=source.name,
        family=manifest.family,
        dim=manifest.dim,
        logit_scale=manifest.logit_scale,
        logit_bias=manifest.logit_bias,
        test_model=source.test_model,
        served_name=served_name(source, settings.served_model_name),
    )
    return Engine(
        backends=backends, preprocessing=preprocessing, info=info, settings=engine_settings(settings)
    ), manifest


def _choice_key(choice: dict) -> str:
    return f"{choice['backend']}/{choice['dtype']}"


class Runtime:
    """Holds the engine of this process. ``load`` and ``start`` are idempotent; ``engine()`` raises until ready."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self.status = "idle"  # idle -> loading -> ready | failed
        self.error: str | None = None
        self.started_at: float | None = None
        self.ready_seconds: float | None = None
        self.process_seconds_to_ready: float | None = None
        self.settings: RuntimeSettings | None = None
        self.manifest: Manifest | None = None
        self._admitted = threading.local()  # this thread's request started while ready

    def engine(self) -> Engine:
        engine = self._engine
        admitted = self.status == "draining" and getattr(self._admitted, "yes", False)
        if engine is None or not (self.status == "ready" or admitted):
            raise RuntimeNotReady(self.error or self.status)
        return engine

    @contextlib.contextmanager
    def admitted(self):
        """Around one request: one that starts while the process serves keeps the engine to its end,
        even if draining begins meanwhile (it may still be reading its upload); later ones get 503."""
        self._admitted.yes = self.status == "ready"
        try:
            yield
        finally:
            self._admitted.yes = False

    @property
    def ready(self) -> bool:
        return self._engine is not None and self.status == "ready"

    def readiness(self) -> tuple[bool, str, dict[str, int] | None]:
        """(ready, status, the server's workers: how many ready, how many loading; None outside gunicorn).

        Ready when this worker is, and no sibling that takes connections still loads: a balancer told
        "ready" would send requests that the kernel may hand to that sibling, to get 503.
        """
        others = coordination.siblings()
        if others is None:
            return self.ready, self.status, None
        waiting = others["loading"] > 0
        workers = {
            "ready": others["ready"] + int(self.ready),
            "loading": others["loading"] + int(self.status == "loading"),
        }
        return self.ready and not waiting, "loading" if self.ready and waiting else self.status, workers

    def drain(self) -> None:
        """The process is stopping: /readyz fails and new requests get 503; those in flight finish."""
        if self.status == "ready":
            self.status = "draining"
        coordination.mark_leaving()

    # --- liveness --------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """What makes this process unfit to serve, if anything: a dead inference thread, a hung forward."""
        engine, settings = self._engine, self.settings
        if engine is None or settings is None or self.status != "ready":
            return None
        if not engine.running:
            return "the inference thread died"
        if engine.stalled(settings.forward_timeout_s):
            return f"a forward has run for over {settings.forward_timeout_s:g} s (CLIP_FORWARD_TIMEOUT)"
        return None

    def watch_once(self, on_unhealthy) -> bool:
        """One look by the watchdog. Unhealthy: /readyz fails, every waiting request gets 503 at once,
        and ``on_unhealthy(problem)`` has the process replaced. Returns whether to keep watching."""
        problem = self.health_problem()
        if problem is None:
            return True
        logger.critical("This worker cannot serve any more (%s): failing its requests and leaving", problem)
        self.status, self.error = "failed", problem
        coordination.mark_leaving()
        self._engine.abort(problem)
        on_unhealthy(problem)
        return False

    def _watch(self, on_unhealthy, interval_s: float) -> None:
        stop = threading.Event()
        while self.watch_once(on_unhealthy):
            stop.wait(interval_s)

    def load(self, settings: RuntimeSettings) -> Engine:
        """Load synchronously (a second call returns the loaded engine)."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            self.status, self.started_at = "loading", time.monotonic()
            try:
                engine, manifest = open_engine(settings)
                try:
                    engine.warm_up()
                except Exception:
                    engine.close()
                    raise
            except Exception as exc:
                self.status, self.error = "failed", str(exc)
                coordination.mark_leaving()
                raise
            if engine.is_test_model:
                logger.warning(
                    "SERVING A RANDOM-WEIGHT TEST MODEL (%s): its vectors carry no meaning. "
                    "Set CLIP_MODEL to a real model.",
                    engine.name,
                )
            if not manifest.faithful:
                logger.warning("The backend is below the parity floor: %s. %s", manifest.describe(), manifest.note)
            self._engine, self.status, self.settings, self.manifest = engine, "ready", settings, manifest
            coordination.mark_ready()
            self.ready_seconds = time.monotonic() - self.started_at
            metrics.MODEL_LOAD_SECONDS.set(self.ready_seconds)
            self.process_seconds_to_ready = process_age()
            logger.info("Model %s ready in %.1f s: %s", engine.name, self.ready_seconds, manifest.describe())
            return engine

    def start(self, settings: RuntimeSettings, *, on_failure=None, on_unhealthy=None) -> None:
        """Load in a background thread, once; ``on_failure(exc)`` runs if loading fails. With
        ``on_unhealthy``, that thread then watches the engine (``watch_once``) every second."""
        with self._lock:
            if self._thread is not None or self._engine is not None:
                return
            self.status = "loading"  # from now: a worker waiting for its model sees it (wait_for_siblings)
            self._thread = threading.Thread(
                target=self._load_in_background,
                args=(settings, on_failure, on_unhealthy),
                name="clip-warmup",
                daemon=True,
            )
            self._thread.start()

    def _load_in_background(self, settings: RuntimeSettings, on_failure, on_unhealthy) -> None:
        try:
            self.load(settings)
        except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
            logger.critical("Cannot load CLIP_MODEL=%r: %s", settings.model, exc)
            if on_failure is not None:
                on_failure(exc)
            return
        if on_unhealthy is not None:
            self._watch(on_unhealthy, interval_s=1.0)

    def close(self) -> None:
        """Stop the engine and forget it (tests, and a worker that exits)."""
        with self._lock:
            if self._engine is not None:
                self._engine.close()
            self._engine, self._thread, self.status, self.error = None, None, "idle", None
            self.settings = self.manifest = None


runtime = Runtime()
