"""The OpenVINO backend, float32 or bfloat16, on the CPU: prepare_model converts the ONNX export it
makes for ONNX Runtime into OpenVINO's IR (no second export from torch), and each worker compiles
each tower for this CPU from the IR, whose weights every worker maps from the one file.

bfloat16 is OpenVINO's ``INFERENCE_PRECISION_HINT``: weights and activations in bfloat16 where the
CPU computes it natively (AVX512-BF16, AMX), accumulation in float32. OpenVINO quietly runs float32
where the CPU cannot, so the backend reports the precision the compiled model really runs
(``dtype``), and prepare_model offers bfloat16 only where the CPU lists it.

Measured (`python manage.py bench`, ViT-B/32, 2 cores): on a Xeon with AMX, bfloat16 ran images
2.8x and texts 3.1x faster than ONNX Runtime float32; on an AMD EPYC with AVX512-BF16, 1.9x and 1.8x.
OpenVINO reading ONNX Runtime's int8 export ran 3x slower than ONNX Runtime itself: there is no int8
OpenVINO path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}


def load_openvino():
    """The openvino module, imported with its telemetry declined where the user has not decided.

    Importing openvino sends a usage event (openvino_telemetry, from a thread that forks a process)
    unless a consent file says no; a server must not call out, nor fork from a thread before gunicorn
    forks its workers. The consent file is the package's own opt-out (``opt_in_out --opt_out``); an
    explicit choice already there is kept.
    """
    import sys

    if "openvino" not in sys.modules:
        try:
            from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

            checker = OptInChecker()
            if checker.consent_file_base_dir() and not os.path.exists(checker.consent_file()):
                if checker.create_or_check_consent_dir():
                    checker.update_result(ConsentCheckResult.DECLINED)
        except Exception:  # noqa: BLE001 - no telemetry package, or no home to write in: nothing to decline
            pass
    import openvino

    return openvino


def convert_to_ir(folder: Path, onnx_files: dict[str, str]) -> dict[str, str]:
    """Each tower's ONNX export as OpenVINO's own format (``image.xml`` + ``image.bin``) in ``folder``
    (the caller holds its lock), made again only when the export is newer. Returns {tower: xml name}.

    Why: OpenVINO maps an IR's weights from the file, so the float32 constants sit in the page cache
    once for every worker, where from ONNX each worker copies them (measured, ViT-B/32 image tower on
    bfloat16: 389 MB private per worker from IR, 722 MB from ONNX, the same speed).
    """
    openvino = load_openvino()

    names = {}
    for tower, name in onnx_files.items():
        source, xml = folder / name, folder / f"{Path(name).stem}.xml"
        names[tower] = xml.name
        if xml.exists() and xml.with_suffix(".bin").exists() and xml.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            continue
        tmp = folder / f"{Path(name).stem}.tmp{os.getpid()}.xml"
        openvino.save_model(openvino.Core().read_model(str(source)), str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    return names


def cpu_capabilities() -> set[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively ({"FP32", "BF16", "INT8", ...})."""
    openvino = load_openvino()

    return set(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoBackend:
    """Both towers compiled for the CPU, each with its own thread count (``threads``, as for ONNX
    Runtime: images every core, texts this worker's share); one infer request per tower, used by
    the engine's one inference thread."""

    name = "openvino"
    device = "cpu"

    def __init__(
        self,
        files: dict[str, Path],
        *,
        threads: dict[str, int] | None = None,
        dtype: str = "float32",
        vocabulary: int | None = None,
    ):
        openvino = load_openvino()

        if dtype not in PRECISIONS:
            raise ValueError(f"OpenVINO runs float32 or bfloat16, not {dtype}")
        core = openvino.Core()
        # OpenVINO's Gather gives a zero row for an index past the table where torch and ONNX Runtime
        # raise: the backend checks token ids itself, so that a bad one fails instead of a garbage vector.
        self.vocabulary = vocabulary
        self.requests = {}
        self.input_names: dict[str, list[str]] = {}
        ran = set()
        for tower, path in files.items():
            config = {
                "INFERENCE_PRECISION_HINT": PRECISIONS[dtype],
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                # Two workers share the cores: pinned threads would fight over the same ones.
                "ENABLE_CPU_PINNING": False,
            }
            if (threads or {}).get(tower, 0) > 0:
                config["INFERENCE_NUM_THREADS"] = threads[tower]
            compiled = core.compile_model(str(path), "CPU", config)
            ran.add(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
            self.requests[tower] = compiled.create_infer_request()
            self.input_names[tower] = [port.get_any_name() for port in compiled.inputs]
        # What the CPU really runs: bfloat16 only where it has the instructions.
        self.dtype = "bfloat16" if ran == {"bf16"} else "float32"
        if self.dtype != dtype:
            logger.warning("OpenVINO runs %s here, not the %s asked for: the CPU lacks it", self.dtype, dtype)

    def _run(self, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        request = self.requests[tower]
        request.infer(feed)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses it

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image", {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})

    def text_features(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if ids.size and (ids.min() < 0 or (self.vocabulary is not None and ids.max() >= self.vocabulary)):
            raise ValueError(f"a token id is outside the model's vocabulary of {self.vocabulary}")
        given = {"input_ids": ids, "attention_mask": mask}
        return self._run(
            "text", {name: np.ascontiguousarray(given[name], dtype=np.int64) for name in self.input_names["text"]}
        )

    def close(self) -> None:
        self.requests = {}
