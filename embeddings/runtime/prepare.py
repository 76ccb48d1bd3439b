"""Prepare, then load: everything a model needs before workers serve it, done once, under a lock.

``prepare`` (``manage.py prepare_model``, which scripts/start.sh runs before gunicorn) fetches a hub id
or builds the fallback test model, loads the float32 torch model, chooses the backend for each tower,
exports it where the backend needs files, checks the backend's vectors against float32 PyTorch on a
fixed probe set, and writes the choice into a **manifest** beside the model. Workers only read the
manifest (``read_manifest``) and open what it names: they never download, export or choose, and a
worker that finds no current manifest stops with a message naming prepare_model.

The prepared folder is ``MODEL/clipsite-prepared/`` (or, where the model's folder cannot be written,
one under CLIP_MODELS_DIR or the temporary folder); it holds one manifest per configuration
(``manifest-RUNTIME-QUANTIZE-DEVICE.json``) and the exported files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipsite.config import RuntimeSettings
from embeddings.runtime.loading import (
    PREPARE_HINT,
    ModelLoadError,
    ModelNotPrepared,
    ModelSource,
    fetch,
    folder_lock,
    load_model,
    load_processor,
    resolve_device,
    text_context,
)
from embeddings.runtime.preprocessing import Preprocessing, probe_image

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PREPARED_SUBDIR = "clipsite-prepared"
# The core promise: a backend is faithful when its vectors are float32 PyTorch's to these cosines.
PARITY_FLOOR = {"image": 0.999, "text": 0.9999}
PROBE_TEXTS = (
    "a photo of a cat",
    "An astronaut in a white space suit, holding a flag on the moon.",
    "x",
    "Zwei Hunde spielen im Schnee 🐕",
    " ".join(["photograph"] * 100),  # over every family's context: the cut is checked too
)


@dataclass(frozen=True)
class Manifest:
    """What prepare_model chose for one model and configuration, and what it measured."""

    model: str
    family: str
    dim: int
    context: int
    logit_scale: float
    logit_bias: float | None
    fingerprint: str
    requested: dict  # {"runtime", "quantize", "device"}: the configuration it was prepared for
    towers: dict  # {"image": {"backend", "dtype", "files"?}, "text": {...}}
    parity: dict  # {"image": min cosine to float32 torch, "text": ...} on the probe set
    faithful: bool  # every tower at or above PARITY_FLOOR
    note: str  # why this choice
    prepared_at: float
    versions: dict
    version: int = MANIFEST_VERSION

    def describe(self) -> str:
        return ", ".join(f"{t} {c['backend']}/{c['dtype']} (cos {self.parity[t]:.6f})" for t, c in self.towers.items())


def prepared_dir(model_dir: Path, models_dir: Path) -> Path:
    """Beside the model when its folder can be written, else under CLIP_MODELS_DIR, else the temp folder."""
    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
    candidates = (
        Path(model_dir) / PREPARED_SUBDIR,
        Path(models_dir) / "prepared" / key,
        Path(tempfile.gettempdir()) / "clipsite-prepared" / key,
    )
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    raise ModelLoadError(f"no folder to prepare {model_dir} in: tried {', '.join(str(c) for c in candidates)}")


def fingerprint(source: ModelSource) -> str:
    """Changes whenever the weights, the configuration or the processor's files change."""
    parts = [str(source.model_dir.resolve()), str(source.processor_dir.resolve())]
    for folder in sorted({source.model_dir, source.processor_dir}):
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = f.stat()
            parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _requested(settings: RuntimeSettings) -> dict:
    return {"runtime": settings.runtime, "quantize": settings.quantize, "device": settings.device}


def manifest_path(folder: Path, settings: RuntimeSettings) -> Path:
    return folder / f"manifest-{settings.runtime}-{settings.quantize}-{settings.device}.json"


def read_manifest(source: ModelSource, settings: RuntimeSettings) -> tuple[Path, Manifest]:
    """The prepared folder and the current manifest for this model and configuration, or ModelNotPrepared."""
    folder = prepared_dir(source.model_dir, settings.models_dir)
    path = manifest_path(folder, settings)
    try:
        manifest = Manifest(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelNotPrepared(
            f"{source.name or source.model_dir} is not prepared ({path} is missing): {PREPARE_HINT}"
        ) from exc
    if manifest.version != MANIFEST_VERSION or manifest.fingerprint != fingerprint(source):
        raise ModelNotPrepared(f"the model's files changed since it was prepared: {PREPARE_HINT}")
    return folder, manifest


def probe_inputs(preprocessing: Preprocessing) -> tuple[np.ndarray, tuple]:
    """The fixed probe set the parity self-check runs: synthetic pictures, texts of several lengths."""
    images = [probe_image(301, 227, 0), probe_image(224, 224, 1), probe_image(500, 333, 2).rotate(90, expand=True)]
    pixels = np.stack([preprocessing.image(image) for image in images])
    return pixels, preprocessing.pad(preprocessing.tokenize(PROBE_TEXTS))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    value = float(np.min(np.sum(a * b, axis=1)))
    return value if math.isfinite(value) else -1.0


def prepare(settings: RuntimeSettings) -> tuple[ModelSource, Manifest]:
    """Make the configured model ready to serve; a no-op when a current manifest exists."""
    source = fetch(settings.model, settings.models_dir)
    folder = prepared_dir(source.model_dir, settings.models_dir)
    with folder_lock(folder / ".lock"):
        try:
            return source, read_manifest(source, settings)[1]
        except ModelNotPrepared:
            pass
        manifest = _prepare(source, settings, folder)
        path = manifest_path(folder, settings)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(manifest), indent=2))
        os.replace(tmp, path)
    level = logging.INFO if manifest.faithful else logging.WARNING
    logger.log(level, "Prepared %s: %s. %s", source.name or source.model_dir, manifest.describe(), manifest.note)
    return source, manifest


def _prepare(source: ModelSource, settings: RuntimeSettings, folder: Path) -> Manifest:
    import onnxruntime
    import torch
    import transformers

    from embeddings.runtime.backends.torch import TorchBackend

    device = resolve_device(settings.device)
    processor = load_processor(source)
    model = load_model(source, device=device)
    family = getattr(model.config, "model_type", "")
    context = text_context(model.config)
    preprocessing = Preprocessing(processor, family=family, context=context)
    pixels, (ids, mask) = probe_inputs(preprocessing)
    reference = TorchBackend(model)
    want = {"image": reference.image_features(pixels), "text": reference.text_features(ids, mask)}
    torch_choice = {"backend": "torch", "dtype": "float32"}
    choice, parity, note = torch_choice, {"image": 1.0, "text": 1.0}, "float32 PyTorch: the reference itself"
    if device == "cuda":
        note = "a GPU: float32 PyTorch"
    elif settings.runtime == "torch":
        note = "CLIP_RUNTIME=torch"
    else:
        dtype = "int8" if settings.quantize == "int8" else "float32"
        try:
            choice, parity = _onnx_choice(model, preprocessing, folder, source, dtype, pixels, ids, mask, want)
        except Exception as exc:
            if dtype == "int8":
                raise ModelLoadError(
                    f"cannot export {source.name or source.model_dir} to ONNX for int8: {exc}"
                ) from exc
            logger.warning("ONNX export of %s failed (%s): PyTorch serves it", source.name or source.model_dir, exc)
            note = f"the ONNX export failed ({type(exc).__name__}): float32 PyTorch serves"
        else:
            faithful = all(parity[t] >= PARITY_FLOOR[t] for t in parity)
            if faithful:
                note = f"ONNX Runtime {dtype}, as CLIP_RUNTIME={settings.runtime} on the CPU asks; faithful to float32"
            elif settings.runtime == "auto" and dtype == "float32":
                note = f"ONNX Runtime's vectors fell below the parity floor ({parity}): float32 PyTorch serves"
                choice, parity = torch_choice, {"image": 1.0, "text": 1.0}
            else:
                note = f"FORCED ONNX Runtime {dtype} IS BELOW THE PARITY FLOOR {PARITY_FLOOR}: measured {parity}"
    logit_scale = getattr(model, "logit_scale", None)
    logit_bias = getattr(model, "logit_bias", None)
    return Manifest(
        model=source.name,
        family=family,
        dim=int(want["image"].shape[1]),
        context=context,
        logit_scale=float(logit_scale.detach().float().exp().item()) if logit_scale is not None else 100.0,
        logit_bias=float(logit_bias.detach().float().reshape(-1)[0].item()) if logit_bias is not None else None,
        fingerprint=fingerprint(source),
        requested=_requested(settings),
        towers={"image": dict(choice), "text": dict(choice)},
        parity={t: round(v, 7) for t, v in parity.items()},
        faithful=all(parity[t] >= PARITY_FLOOR[t] for t in parity),
        note=note,
        prepared_at=time.time(),
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )


def _onnx_choice(model, preprocessing, folder, source, dtype, pixels, ids, mask, want):
    from embeddings.runtime.backends.onnx import OnnxBackend, export_model

    text_example = {"input_ids": ids[:2]} | ({"attention_mask": mask[:2]} if mask is not None else {})
    files = export_model(
        model,
        folder,
        dtype=dtype,
        examples={"image": {"pixel_values": pixels[:2]}, "text": text_example},
        fingerprint=fingerprint(source),
    )
    backend = OnnxBackend({t: folder / n for t, n in files.items()}, dtype=dtype)
    try:
        got = {"image": backend.image_features(pixels), "text": backend.text_features(ids, mask)}
    finally:
        backend.close()
    parity = {t: _min_cosine(got[t], want[t]) for t in want}
    return {"backend": "onnx", "dtype": dtype, "files": files}, parity
