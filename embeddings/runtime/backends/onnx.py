"""The ONNX Runtime backend, float32 or int8: the model's towers exported (and quantised) once by
``prepare_model`` into the model's prepared folder, then only loaded by the workers.

Measured on our 2-core CPUs (../shared/MEASUREMENTS.md, `python manage.py bench`): float32 gives the
same vectors as PyTorch, a little faster; int8 weights quantised per channel run ViT-B/32 images
about 2x and texts about 2.3x faster, at cosine 0.9998 / 0.999 to the float32 vectors.

Without VNNI (AVX2 only), ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits
(VPMADDUBSW), which saturate: cosine 0.96-0.98 measured on the tiny test model. There the weights
are quantised to 7 bits (``reduce_range``, ONNX Runtime's advice for such CPUs), into files of
their own, so nodes of both kinds can share one prepared folder; prepare_model still measures the
result against float32 and flags it if it falls below the floor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from embeddings.runtime.backends.torch import projections
from embeddings.runtime.cpu import int8_reduce_range

logger = logging.getLogger(__name__)

OPSET = 17


class _Tower(torch.nn.Module):
    """One tower of a CLIP-family model with a plain tensor output, for export."""

    def __init__(self, model, tower: str, input_names: list[str]):
        super().__init__()
        self.model, self.tower, self.input_names = model, tower, input_names

    def forward(self, *tensors):
        inputs = dict(zip(self.input_names, tensors, strict=True))
        method = self.model.get_image_features if self.tower == "image" else self.model.get_text_features
        return projections(method(**inputs))


def export_tower(model, tower: str, example: dict[str, np.ndarray], path: Path) -> None:
    """Export one tower, its batch (and for texts, sequence) axes dynamic, atomically to ``path``."""
    names = list(example)
    dynamic = {name: {0: "batch"} | ({1: "sequence"} if tower == "text" else {}) for name in names}
    dynamic["embeds"] = {0: "batch"}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(example[name])) for name in names)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape checks that are constant for CLIP
        torch.onnx.export(
            _Tower(model, tower, names).eval(),
            tensors,
            str(tmp),
            input_names=names,
            output_names=["embeds"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)


def quantize_int8(source: Path, path: Path, *, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    quantize_dynamic(str(source), str(tmp), per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    os.replace(tmp, path)


def file_names(dtype: str) -> dict[str, str]:
    suffix = {"int8": ".int8.onnx", "int8-7bit": ".int8-7bit.onnx"}.get(dtype, ".onnx")
    return {tower: f"{tower}{suffix}" for tower in ("image", "text")}


def export_model(
    model, folder: Path, *, dtype: str, examples: dict[str, dict[str, np.ndarray]], fingerprint: str
) -> dict[str, str]:
    """Both towers as ONNX files in ``folder`` (the caller holds its lock); reused while the weights,
    the versions and the input names stay the same. Returns {tower: file name}."""
    import onnxruntime

    reduce_range = dtype == "int8" and int8_reduce_range()
    variant = "int8-7bit" if reduce_range else dtype
    names = file_names(variant)
    key = hashlib.sha256(
        json.dumps(
            [
                fingerprint,
                variant,
                torch.__version__,
                onnxruntime.__version__,
                OPSET,
                {t: list(e) for t, e in examples.items()},
            ]
        ).encode()
    ).hexdigest()[:16]
    meta_path = folder / "onnx.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get(variant) == key and all((folder / n).exists() for n in names.values()):
        return names
    logger.info(
        "Exporting the model to ONNX%s in %s (once)",
        {"int8": " and quantising to int8", "int8-7bit": " and quantising to int8 (7-bit weights: no VNNI)"}.get(
            variant, ""
        ),
        folder,
    )
    for tower, example in examples.items():
        fp32 = folder / f"{tower}.onnx"
        export_tower(model, tower, example, fp32)
        if dtype == "int8":
            quantize_int8(fp32, folder / names[tower], reduce_range=reduce_range)
    meta[variant] = key
    meta_path.write_text(json.dumps(meta))
    return names


class OnnxBackend:
    """Both towers as ONNX Runtime sessions on the CPU.

    ``threads`` maps a tower to its session's thread count. Measured (`python manage.py bench`, two
    worker processes on two cores): images gain from every core on a quiet server (p50 at one client
    near halved) and lose little under load; texts, short and many, do best on one share each. Idle
    pool threads sleep instead of spinning, so busy workers share the cores.
    """

    name = "onnx"
    device = "cpu"

    def __init__(self, files: dict[str, Path], *, threads: dict[str, int] | None = None, dtype: str = "float32"):
        import onnxruntime as ort

        self.dtype = dtype
        self.sessions = {}
        for tower, path in files.items():
            options = ort.SessionOptions()
            if (threads or {}).get(tower, 0) > 0:
                options.intra_op_num_threads = threads[tower]
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[tower] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {tower: [i.name for i in s.get_inputs()] for tower, s in self.sessions.items()}

    def _run(self, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.sessions[tower].run(None, feed)[0], dtype=np.float32)

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image", {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})

    def text_features(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        given = {"input_ids": ids, "attention_mask": mask}
        return self._run(
            "text", {name: np.ascontiguousarray(given[name], dtype=np.int64) for name in self.input_names["text"]}
        )

    def close(self) -> None:
        self.sessions = {}
