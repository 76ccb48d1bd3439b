"""Finding and loading a CLIP-family model: a hub id, a save_pretrained folder, or the original layout.

The three ways to name a model (``CLIP_MODEL``):
1. a Hugging Face id: fetched once (by ``prepare_model`` only) into ``CLIP_MODELS_DIR/hub/<org>--<name>/``
   in the original layout, then read from disk, so workers and restarts need no network;
2. a local folder saved with ``save_pretrained`` (model and processor in one folder);
3. a folder in the original layout, holding ``model-clip/`` and ``processor-clip/``.
Unset: the layout directly under ``CLIP_MODELS_DIR`` if present, else a random-weight ``vit-b-32``
(built by ``prepare_model``).

``resolve_model_source`` never downloads or builds anything: ``fetch`` does, and only prepare calls it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embeddings.runtime import testmodel

logger = logging.getLogger(__name__)

MODEL_SUBDIR, PROCESSOR_SUBDIR = "model-clip", "processor-clip"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FALLBACK_PRESET = "vit-b-32"


class ModelLoadError(Exception):
    """The configured model cannot be found, fetched or used; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # the model's identity here: a hub id, a folder's path, a test model's name (see served_name)
    model_dir: Path
    processor_dir: Path
    kind: str  # "hub", "folder", "layout" or "fallback"
    test_model: dict | None = None  # the marker of a random-weight test model


def hub_cache_dir(models_dir: Path, model_id: str) -> Path:
    return Path(models_dir) / "hub" / model_id.replace("/", "--")


def has_layout(folder: Path) -> bool:
    return (folder / MODEL_SUBDIR / "config.json").is_file() and (folder / PROCESSOR_SUBDIR).is_dir()


def _source(name: str, model_dir: Path, processor_dir: Path, kind: str) -> ModelSource:
    marker = testmodel.read_marker(model_dir)
    if marker:
        name = f"random-test-model/{marker.get('preset')}-seed{marker.get('seed')} (random weights, not a real CLIP)"
    return ModelSource(name, model_dir, processor_dir, kind, marker)


def served_name(source: ModelSource, configured: str = "") -> str:
    """The name answers give the model: ``configured`` (CLIP_SERVED_MODEL_NAME), else a test model's own
    name, a hub id as it is, or a folder's base name; never a path of this machine."""
    if configured:
        return configured
    return source.name if source.test_model is not None else default_served_name(source.name)


def default_served_name(spec: str) -> str:
    """What answers call CLIP_MODEL=``spec`` by default: a folder by its base name, a hub id as it is."""
    folder = Path(spec).expanduser()
    return Path(os.path.abspath(folder)).name if spec and folder.is_dir() else spec


class ModelNotPrepared(ModelLoadError):
    """The model is not on disk yet, or not prepared for this configuration: run prepare_model."""


PREPARE_HINT = "run `python manage.py prepare_model` first (scripts/start.sh and ./run.sh do)"


def resolve_model_source(spec: str, models_dir: Path) -> ModelSource:
    """Which folders ``CLIP_MODEL=spec`` means, from what is on disk; never downloads or builds."""
    models_dir = Path(models_dir)
    spec = (spec or "").strip()
    if not spec:
        if has_layout(models_dir):
            return _source(str(models_dir), models_dir / MODEL_SUBDIR, models_dir / PROCESSOR_SUBDIR, "layout")
        target = fallback_dir(models_dir)
        if not has_layout(target):
            raise ModelNotPrepared(
                f"no model is configured and the random-weight test model is not built: {PREPARE_HINT}"
            )
        return _source("", target / MODEL_SUBDIR, target / PROCESSOR_SUBDIR, "fallback")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if has_layout(folder):
            return _source(spec, folder / MODEL_SUBDIR, folder / PROCESSOR_SUBDIR, "layout")
        if (folder / "config.json").is_file():
            return _source(spec, folder, folder, "folder")
        raise ModelLoadError(
            f"CLIP_MODEL={spec!r} is a folder, but holds neither config.json (a save_pretrained folder) "
            f"nor {MODEL_SUBDIR}/ and {PROCESSOR_SUBDIR}/ (the original layout)"
        )
    if spec.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(spec):
        raise ModelLoadError(f"CLIP_MODEL={spec!r} is neither an existing folder nor a Hugging Face model id")
    cache = hub_cache_dir(models_dir, spec)
    if not has_layout(cache):
        raise ModelNotPrepared(f"{spec} is not in {cache}: {PREPARE_HINT}, which fetches it once")
    source = _source(spec, cache / MODEL_SUBDIR, cache / PROCESSOR_SUBDIR, "hub")
    return ModelSource(spec, source.model_dir, source.processor_dir, "hub", source.test_model)


def fetch(spec: str, models_dir: Path) -> ModelSource:
    """``resolve_model_source``, after fetching a hub id or building the fallback test model if missing."""
    try:
        return resolve_model_source(spec, models_dir)
    except ModelNotPrepared:
        pass
    spec = (spec or "").strip()
    try:
        if not spec:
            build_fallback(models_dir)
        else:
            fetch_model(spec, hub_cache_dir(models_dir, spec))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot store the model under CLIP_MODELS_DIR={models_dir} ({exc.strerror or exc}): "
            "set CLIP_MODELS_DIR to a folder this user can write"
        ) from exc
    return resolve_model_source(spec, models_dir)


@contextlib.contextmanager
def folder_lock(path: Path):
    """An exclusive lock on ``path`` (a lock file): one process prepares a folder at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_model(model_id: str, dest: Path) -> Path:
    """Download ``model_id`` from the hub and save it in the original layout at ``dest``.

    Fetched into a temporary folder beside ``dest`` and renamed into place under a lock, so two
    processes fetching at once never leave a half-written or mixed folder.
    """
    from transformers import AutoModel, AutoProcessor

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest.parent / f".{dest.name}.lock"):
        if has_layout(dest):
            return dest  # another process fetched it while this one waited
        logger.info("Fetching %s from the Hugging Face hub into %s", model_id, dest)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
            cache = Path(tmp) / "hf-cache"
            try:
                model = AutoModel.from_pretrained(model_id, cache_dir=cache)
                processor = AutoProcessor.from_pretrained(model_id, cache_dir=cache)
            except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot fetch"
                raise ModelLoadError(f"cannot fetch {model_id!r} from the Hugging Face hub: {exc}") from exc
            _check_clip_family(model, model_id)
            staged = Path(tmp) / "staged"
            model.save_pretrained(staged / MODEL_SUBDIR)
            processor.save_pretrained(staged / PROCESSOR_SUBDIR)
            if dest.exists():
                shutil.rmtree(dest)
            staged.rename(dest)
    return dest


def fallback_dir(models_dir: Path) -> Path:
    """Where the random-weight vit-b-32 lives: under CLIP_MODELS_DIR, or the temporary folder when that
    cannot be written."""
    preferred = Path(models_dir) / "test-models" / f"{FALLBACK_PRESET}-seed0"
    if has_layout(preferred):
        return preferred
    try:
        preferred.parent.mkdir(parents=True, exist_ok=True)
        return preferred
    except OSError:
        return Path(tempfile.gettempdir()) / "clipsite-test-models" / f"{FALLBACK_PRESET}-seed0"


def build_fallback(models_dir: Path) -> Path:
    """Build (once) the random-weight vit-b-32 a service started with no model at all serves."""
    target = fallback_dir(models_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target.parent / f".{target.name}.lock"):
        if not has_layout(target):
            logger.warning("Building a random-weight %s test model in %s", FALLBACK_PRESET, target)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
                testmodel.build_test_model(FALLBACK_PRESET, Path(tmp) / "m", seed=0)
                (Path(tmp) / "m").rename(target)
    return target


def _check_clip_family(model, name: str) -> None:
    if not (
        callable(getattr(model, "get_image_features", None)) and callable(getattr(model, "get_text_features", None))
    ):
        raise ModelLoadError(
            f"{name} loads as {type(model).__name__}, which is not a CLIP-family model: "
            "it offers no get_image_features and get_text_features"
        )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the torchvision fallback warning is expected: we run without it
    hf_logging.disable_progress_bar()


def load_processor(source: ModelSource):
    """The model's own processor (tokenizer and image processor)."""
    from transformers import AutoProcessor

    _quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(source.processor_dir)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the processor from {source.processor_dir}: {exc}") from exc
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"the processor in {source.processor_dir} lacks a tokenizer or an image processor")
    return processor


def resolve_device(device: str) -> str:
    """``auto`` as what this machine has; ``cuda`` refused clearly where there is none."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIP_DEVICE=cuda, but torch sees no CUDA device")
    return device


def load_model(source: ModelSource, *, device: str = "cpu", dtype: str = "float32", weights: Path | None = None):
    """The torch model of ``source`` in eval mode, on ``device`` (cpu or cuda), its weights in ``dtype``;
    ``weights``: a folder of the same model saved in ``dtype`` by prepare_model, read instead."""
    import torch
    from transformers import AutoModel

    _quiet_transformers()
    folder = weights or source.model_dir
    try:
        model = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a model from {folder}: {exc}") from exc
    _check_clip_family(model, source.name or str(source.model_dir))
    return model.to(device).eval()


def text_context(config) -> int:
    """How many tokens the text tower takes: its position table, less XLM-R's offset (AltCLIP)."""
    text = getattr(config, "text_config", config)
    positions = int(getattr(text, "max_position_embeddings", None) or 77)
    if getattr(config, "model_type", "") == "altclip":
        positions -= int(getattr(text, "pad_token_id", 1)) + 1  # positions count from padding_idx + 1
    return positions
