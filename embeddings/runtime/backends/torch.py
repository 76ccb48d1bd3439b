"""The PyTorch backend: the model's own forward, float32, eager, on the CPU or a GPU."""

from __future__ import annotations

import numpy as np
import torch


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
    """``threads`` maps a tower to the torch threads of its forward (0: leave torch's setting)."""

    name = "torch"
    dtype = "float32"

    def __init__(self, model, *, threads: dict[str, int] | None = None):
        self.model = model
        self.device = next(model.parameters()).device.type
        self.threads = threads or {}

    def _run(self, tower: str, method, inputs: dict[str, np.ndarray]) -> np.ndarray:
        wanted = self.threads.get(tower, 0)
        if wanted and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            return projections(method(**tensors)).float().cpu().numpy()

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image", self.model.get_image_features, {"pixel_values": pixels})

    def text_features(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        return self._run("text", self.model.get_text_features, inputs)

    def close(self) -> None:
        self.model = None
