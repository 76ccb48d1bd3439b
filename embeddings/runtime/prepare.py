"""Prepare, then load: everything a model needs before workers serve it, done once, under a lock.

``prepare`` (``manage.py prepare_model``, which scripts/start.sh runs before gunicorn) fetches a hub id
or builds the fallback test model, loads the float32 torch model, chooses the backend for each tower,
exports it where the backend needs files, checks the backend's vectors against float32 PyTorch on a
fixed probe set, and writes the choice into a **manifest** beside the model. Workers only read the
manifest (``read_manifest``) and open what it names: they never download, export or choose, and a
worker that finds no current manifest stops with a message naming prepare_model.

The prepared folder is ``MODEL/clipsite-prepared/`` (or, where the model's folder cannot be written,
one under CLIP_MODELS_DIR or the temporary folder); it holds one manifest per configuration
(``manifest-BACKEND-DTYPE-DEVICE[-CPU].json``) and the exported files.
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
from functools import partial
from pathlib import Path

import numpy as np

from clipsite.config import RuntimeSettings
from embeddings.runtime.cpu import cpu_features, int8_reduce_range
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

MANIFEST_VERSION = 2
PREPARED_SUBDIR = "clipsite-prepared"
# The core promise: a backend is faithful when its vectors are float32 PyTorch's to these cosines.
PARITY_FLOOR = {"image": 0.999, "text": 0.9999}
PROBE_PHOTOS = Path(__file__).resolve().parent / "assets" / "photos"
PROBE_TEXTS = (
    "a photo of a cat",
    "An astronaut in a white space suit, holding a flag on the moon.",
    "x",
    "Zwei Hunde spielen im Schnee 🐕",
    " ".join(["photograph"] * 100),  # over every family's context: the cut is checked too
)
# What prepare_model may choose between, fastest faithful first. int8 only when CLIP_DTYPE=int8 asks:
# its error follows each input's activation ranges, so a probe set that passes says less of the next
# input than it does for bfloat16, whose rounding is the same relative size on every input.
CPU_CANDIDATES = (
    ("torch", "float32"),
    ("onnx", "float32"),
    ("openvino", "float32"),
    ("torch", "bfloat16"),
    ("openvino", "bfloat16"),
    ("onnx", "int8"),
)
# On a GPU: PyTorch, in float32, float16 (tensor cores on every CUDA GPU since Volta) and bfloat16
# (Ampere and later): timed and checked against float32 like the CPU's candidates.
CUDA_CANDIDATES = (("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"))
# Each candidate is timed on a short image batch and a short text batch, best of TIMING_RUNS.
TIMING_BATCH = {"image": 8, "text": 16}
TIMING_RUNS = 3
TIMING_TEXTS = ("a photo of a cat", "a red dress", "two dogs playing in the snow", "a leather handbag")


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
    requested: dict  # {"backend", "dtype", "device"}: the configuration it was prepared for
    towers: dict  # {"image": {"backend", "dtype", "files"?}, "text": {...}}
    parity: dict  # {"image": min cosine to float32 torch, "text": ...} on the probe set
    faithful: bool  # every tower at or above PARITY_FLOOR
    note: str  # why this choice
    prepared_at: float
    versions: dict
    cpu: dict  # what the CPU offers (embeddings/runtime/cpu.py), or {"device": "cuda"}
    candidates: list  # each pair tried: backend, dtype, runs, parity, ms_per_item, or skipped / error
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
    return {"backend": settings.backend, "dtype": settings.dtype, "device": settings.device}


def manifest_path(folder: Path, settings: RuntimeSettings) -> Path:
    """One manifest per configuration and per kind of hardware it runs on: nodes of several kinds (CPUs,
    GPUs, or both under CLIP_DEVICE=auto) sharing one model volume (a Kubernetes PersistentVolumeClaim)
    each keep their own measured choice, and the exported files, which depend on neither, are shared."""
    # torch is imported only where the device is not plainly the CPU (it costs a worker memory).
    device = settings.device if settings.device == "cpu" else resolve_device(settings.device)
    hardware = repr(_cpu_key(cpu_features())) if device == "cpu" else repr(sorted(gpu_features().items()))
    key = hashlib.sha256(hardware.encode()).hexdigest()[:10]
    return folder / f"manifest-{settings.backend}-{settings.dtype}-{settings.device}-{key}.json"


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
    if "flags" in manifest.cpu and _cpu_key(manifest.cpu) != _cpu_key(cpu_features()):
        # The volume moved to another machine: what was fastest (bfloat16 with AMX, say) may be slow here.
        raise ModelNotPrepared(f"the model was prepared on another CPU ({manifest.cpu['model']}): {PREPARE_HINT}")
    return folder, manifest


def gpu_features() -> dict:
    """What prepare_model records of the GPU it measured on."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "model": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}


def _cpu_key(cpu: dict) -> tuple:
    return cpu.get("model"), tuple(cpu.get("flags", ())), cpu.get("cores")


def probe_inputs(preprocessing: Preprocessing) -> tuple[np.ndarray, tuple]:
    """The fixed probe set of the parity self-check: the real photos beside the runtime, a synthetic
    picture of noise, and texts of several lengths."""
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in sorted(PROBE_PHOTOS.glob("*.jpg"))]
    images.append(probe_image(500, 333, 2).rotate(90, expand=True))
    pixels = np.stack([preprocessing.image(image) for image in images])
    return pixels, preprocessing.pad(preprocessing.tokenize(PROBE_TEXTS))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
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


def candidates(settings: RuntimeSettings, device: str) -> list[tuple[str, str, str | None]]:
    """The (backend, dtype, why it is skipped or None) pairs prepare_model measures for ``settings``."""
    pairs = CUDA_CANDIDATES if device == "cuda" else CPU_CANDIDATES
    wanted = [
        (b, d)
        for b, d in pairs
        if settings.backend in ("auto", b) and (settings.dtype == d or (settings.dtype == "auto" and d != "int8"))
    ]
    if device == "cuda":
        return [(b, d, gpu_unavailable(d)) for b, d in wanted]
    if settings.dtype == "float16":
        raise ModelLoadError(
            "CLIP_DTYPE=float16 runs on a GPU, and this machine has none that torch sees (CLIP_DEVICE="
            f"{settings.device} chose the CPU): leave CLIP_DTYPE=auto, or run where CUDA is"
        )
    return [(b, d, unavailable(b, d, forced=settings.dtype == d)) for b, d in wanted]


def gpu_unavailable(dtype: str) -> str | None:
    """Why this GPU cannot run ``dtype`` (None: it can)."""
    import torch

    # Not counting emulation: Volta and Turing "support" bfloat16 only as float32 arithmetic.
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name()} has no native bfloat16 (Ampere and later have)"
    return None


def unavailable(backend: str, dtype: str, *, forced: bool) -> str | None:
    """Why this CPU cannot run ``backend``/``dtype``, or runs it slowly unless forced (None: it can)."""
    if backend == "openvino":
        try:
            from embeddings.runtime.backends.openvino import cpu_capabilities

            capabilities = cpu_capabilities()
        except Exception as exc:  # noqa: BLE001 - not installed, or no CPU plugin
            return f"OpenVINO cannot run here ({type(exc).__name__}: {exc})"
        if dtype == "bfloat16" and "BF16" not in capabilities and not forced:
            return "OpenVINO finds no native bfloat16 on this CPU"
    if backend == "torch" and dtype == "bfloat16" and not forced:
        import torch

        # oneDNN's own check also passes where it emulates bfloat16 with plain AVX-512: the flags decide.
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if not (native and cpu_features()["native_bf16"]):
            return "PyTorch finds no native bfloat16 on this CPU (measured 2-5x slower than float32 there)"
    return None


def _seconds_per_item(run, inputs: tuple, items: int) -> float:
    """The best of TIMING_RUNS timed calls after one warm-up, per item: the least disturbed by the machine."""
    run(*inputs)
    best = math.inf
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        run(*inputs)
        best = min(best, time.perf_counter() - started)
    return best / items


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
    threads = {"image": settings.image_threads, "text": settings.text_threads}
    reference = TorchBackend(model, threads=threads)
    want = {"image": reference.image_features(pixels), "text": reference.text_features(ids, mask)}
    timing = _timing_inputs(pixels, preprocessing)
    results: list[dict] = []
    for backend, dtype, skipped in candidates(settings, device):
        result = {"backend": backend, "dtype": dtype}
        results.append(result)
        if skipped:
            result["skipped"] = skipped
            continue
        try:
            opened, choice = open_candidate(backend, dtype, model, folder, source, pixels, ids, mask, threads)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            logger.warning("%s/%s cannot serve %s: %s", backend, dtype, source.name or source.model_dir, exc)
            result["error"] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        try:
            got = {"image": opened.image_features(pixels), "text": opened.text_features(ids, mask)}
            result["parity"] = {t: round(min_cosine(got[t], want[t]), 7) for t in want}
            result["runs"] = opened.dtype
            result["ms_per_item"] = {
                "image": round(1000 * _seconds_per_item(opened.image_features, *timing["image"]), 3),
                "text": round(1000 * _seconds_per_item(opened.text_features, *timing["text"]), 3),
            }
        except Exception as exc:  # noqa: BLE001
            logger.warning("%s/%s failed on the probe set: %s", backend, dtype, exc)
            result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            opened.close()
        result |= {k: v for k, v in (choice or {}).items() if k in ("files", "vocabulary")}
        if dtype == "int8":
            result["weights"] = "7-bit (reduce_range): this CPU has no VNNI" if int8_reduce_range() else "8-bit"
    towers, parity, note = _choose(results, settings)
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
        towers=towers,
        parity=parity,
        faithful=all(parity[t] >= PARITY_FLOOR[t] for t in parity),
        note=note,
        prepared_at=time.time(),
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": _openvino_version(),
        },
        cpu=cpu_features() if device == "cpu" else gpu_features(),
        candidates=results,
    )


def _openvino_version() -> str | None:
    from embeddings.runtime.backends.openvino import load_openvino

    try:
        return load_openvino().__version__
    except ImportError:
        return None


def _timing_inputs(pixels: np.ndarray, preprocessing: Preprocessing) -> dict[str, tuple]:
    """A short image batch and a short text batch, the sizes a busy server forwards."""
    images = np.concatenate([pixels] * (TIMING_BATCH["image"] // len(pixels) + 1))[: TIMING_BATCH["image"]]
    texts = [TIMING_TEXTS[i % len(TIMING_TEXTS)] for i in range(TIMING_BATCH["text"])]
    return {
        "image": ((images,), TIMING_BATCH["image"]),
        "text": (preprocessing.pad(preprocessing.tokenize(texts)), TIMING_BATCH["text"]),
    }


def open_candidate(backend, dtype, model, folder, source, pixels, ids, mask, threads):
    """The candidate backend, opened as a worker opens it, and its manifest choice (None for torch)."""
    import copy

    from embeddings.runtime.backends import open_backend
    from embeddings.runtime.backends.onnx import export_model

    if backend == "torch":
        if dtype == "float32":
            return open_backend(
                {"backend": "torch", "dtype": dtype}, model=lambda *_: model, prepared_dir=folder, threads=threads
            ), None
        from embeddings.runtime.backends.torch import save_weights

        choice = {"backend": "torch", "dtype": dtype, "files": {"weights": ""}}
        choice["files"]["weights"] = save_weights(
            copy.deepcopy(model), folder, dtype=dtype, fingerprint=fingerprint(source)
        )
        loader = partial(load_model, source, device=next(model.parameters()).device.type)
        return open_backend(
            choice, model=lambda d, w: loader(dtype=d, weights=w), prepared_dir=folder, threads=threads
        ), choice
    text_example = {"input_ids": ids[:2]} | ({"attention_mask": mask[:2]} if mask is not None else {})
    files = export_model(
        model,
        folder,
        dtype="int8" if dtype == "int8" else "float32",
        examples={"image": {"pixel_values": pixels[:2]}, "text": text_example},
        fingerprint=fingerprint(source),
    )
    if backend == "openvino":
        from embeddings.runtime.backends.openvino import convert_to_ir

        files = convert_to_ir(folder, files)
    choice = {"backend": backend, "dtype": dtype, "files": files}
    if backend == "openvino":
        choice["vocabulary"] = int(getattr(model.config, "text_config", model.config).vocab_size)
    return open_backend(choice, prepared_dir=folder, threads=threads), choice


def _choose(results: list[dict], settings: RuntimeSettings) -> tuple[dict, dict, str]:
    """Per tower, the fastest candidate that is faithful to float32; where none is (only a forced
    choice can leave none), the fastest that ran, flagged. Returns (towers, parity, note)."""
    ran = [r for r in results if "ms_per_item" in r]
    forced = settings.backend != "auto" or settings.dtype != "auto"
    asked = f"CLIP_BACKEND={settings.backend} CLIP_DTYPE={settings.dtype}"
    towers, parity, notes = {}, {}, []
    if not ran:
        problems = "; ".join(f"{r['backend']}/{r['dtype']}: {r.get('error') or r.get('skipped')}" for r in results)
        raise ModelLoadError(f"no backend can serve this model with {asked}: {problems}")
    reference = [r for r in ran if (r["backend"], r["dtype"]) == ("torch", "float32")]
    for tower in ("image", "text"):
        faithful = [r for r in ran if r["parity"][tower] >= PARITY_FLOOR[tower]]
        # Unforced, float32 PyTorch is the reference itself: it serves when nothing else is faithful.
        pool = faithful or (reference if not forced else []) or ran
        best = min(pool, key=lambda r: r["ms_per_item"][tower])
        towers[tower] = {k: best[k] for k in ("backend", "dtype", "files", "vocabulary") if k in best}
        parity[tower] = best["parity"][tower]
        label = f"{tower}: {best['backend']}/{best['dtype']} at {best['ms_per_item'][tower]:g} ms an item"
        if faithful:
            notes.append(f"{label}, the fastest of {len(faithful)} faithful to float32 (of {len(results)} tried)")
        elif pool is reference:
            notes.append(f"{label}: the float32 reference, as no other candidate reached the parity floor")
        elif not forced:
            notes.append(f"{label}: BELOW THE PARITY FLOOR {PARITY_FLOOR[tower]}, the float32 reference having failed")
        else:
            notes.append(
                f"{label}: FORCED BY {asked}, BELOW THE PARITY FLOOR {PARITY_FLOOR[tower]} "
                f"(cosine {best['parity'][tower]:.6f} to float32)"
            )
    note = "; ".join(notes)
    if forced:
        note += f" ({asked})"
    return towers, parity, note
