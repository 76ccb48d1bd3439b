"""The PyTorch backend: the model's own forward, eager, on the CPU or a GPU, float32 or bfloat16 (float16 on a GPU).

bfloat16 is the model's weights in it, saved once so by prepare_model (``save_weights``), with the
pixels cast to it and the vectors returned in float32. On a CPU
with AMX it ran ViT-B/32 4.5x faster than float32, on one with AVX512-BF16 2x; on one with neither,
2 to 5x slower: prepare_model times it before it chooses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embeddings.runtime import coordination


def projections(output) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features: take the projected vector."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


class TorchBackend:
    """``threads`` maps a tower to the torch threads of its forward (0: leave torch's setting).

    Texts keep to ``threads["text"]``, this worker's share of the cores. An image forward takes
    ``threads["image"]`` (every core) while the other worker processes are idle and the share while they
    are busy (coordination.py): torch's OpenMP threads spin, so oversubscribed cores cost it dearly
    (measured: 11 against 20 images/s at 16 clients on 2 cores).
    """

    name = "torch"

    def __init__(self, model, *, threads: dict[str, int] | None = None):
        self.model = model
        parameter = next(model.parameters())
        self.device = parameter.device.type
        self.torch_dtype = parameter.dtype
        self.dtype = str(parameter.dtype).removeprefix("torch.")
        self.threads = threads or {}

    def threads_for(self, tower: str) -> int:
        share = self.threads.get("text", 0)
        if tower == "image" and not coordination.others_busy():
            return self.threads.get("image", 0) or share
        return share

    def _run(self, tower: str, method, inputs: dict[str, np.ndarray]) -> np.ndarray:
        wanted = self.threads_for(tower)
        if wanted and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inputs.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(self.torch_dtype)
        with torch.inference_mode():
            return projections(method(**tensors)).float().cpu().numpy()

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image", self.model.get_image_features, {"pixel_values": pixels})

    def text_features(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        return self._run("text", self.model.get_text_features, inputs)

    def close(self) -> None:
        self.model = None


def save_weights(model, folder: Path, *, dtype: str, fingerprint: str) -> str:
    """The model's weights cast to ``dtype``, saved (safetensors) as ``folder/torch-DTYPE`` once per
    fingerprint; the caller holds the folder's lock. Returns the folder's name.

    Why: transformers maps a safetensors file whose dtype is the one asked for, so every worker reads
    the same pages of the page cache; a cast at load would give each worker a private copy.
    """
    import json
    import os
    import shutil

    name = f"torch-{dtype}"
    target, stamp = folder / name, {"fingerprint": fingerprint, "dtype": dtype}
    try:
        if json.loads((target / "clipsite-weights.json").read_text()) == stamp:
            return name
    except (OSError, ValueError):
        pass
    tmp = folder / f"{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    (tmp / "clipsite-weights.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return name
