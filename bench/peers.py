"""Other CLIP servers the benchmark can drive on the same model folder, each through its own HTTP API.

A peer knows one server's wire format: which path and body embed one image or one text, and where
the vector sits in the answer. The benchmark sends those bodies with its own clients, so a peer's
column ("x infinity") is measured the same way as clipsite's. The peer is started by the user (or
the bench) with ``start_command``; nothing here installs or launches it.
"""

from __future__ import annotations

import base64
import http.client
from pathlib import Path
from urllib.parse import urlsplit

import orjson

_JSON = {"Content-Type": "application/json"}


class InfinityPeer:
    """An infinity-emb server (michaelfeil/infinity) serving one CLIP model, via its OpenAI-style API."""

    name = "infinity"

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"infinity URL must look like http://127.0.0.1:7997, not {url!r}")
        self.url = url.rstrip("/")
        self.host: str = parts.hostname
        self.port: int = parts.port or 80
        self.prefix = parts.path.rstrip("/")  # infinity's --url-prefix, if it was started with one
        status, body = self._get("/models")
        models = orjson.loads(body).get("data") if status == 200 else None
        if not models:
            raise RuntimeError(f"infinity at {self.url} answered GET /models with {status} and no model")
        self.model: str = models[0]["id"]
        status, body = self._get("/openapi.json")
        spec = orjson.loads(body) if status == 200 else {}
        self.version: str | None = spec.get("info", {}).get("version")
        # Before the `modality` field (late 2024) images had a route of their own.
        modern = not spec or b'"modality"' in body
        self.image_path = self.prefix + ("/embeddings" if modern else "/embeddings_image")

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", self.prefix + path)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as exc:
            raise RuntimeError(f"infinity at {self.url} is unreachable: {exc}") from exc
        finally:
            conn.close()

    def describe(self) -> dict:
        return {"url": self.url, "model": self.model, "version": self.version}

    def image_request(self, jpeg: bytes) -> tuple[str, bytes, dict[str, str]]:
        """One request embedding one JPEG, sent inline as a data URI (the server fetches nothing)."""
        uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        body = {"model": self.model, "input": [uri], "encoding_format": "float"}
        if self.image_path.endswith("/embeddings"):
            body["modality"] = "image"
        return self.image_path, orjson.dumps(body), _JSON

    def text_request(self, text: str) -> tuple[str, bytes, dict[str, str]]:
        body = {"model": self.model, "input": [text], "modality": "text", "encoding_format": "float"}
        return self.prefix + "/embeddings", orjson.dumps(body), _JSON

    def vector(self, payload: bytes) -> list[float]:
        """The one embedding in an answer to ``image_request`` or ``text_request``."""
        (item,) = orjson.loads(payload)["data"]
        return item["embedding"]


def merged_model_folder(model_dir: Path, out: Path) -> Path:
    """One Hugging Face folder at ``out`` linking the files of ``model-clip`` and ``processor-clip``."""
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Path] = {}
    for part in ("processor-clip", "model-clip"):  # on a name in both, the model's file wins
        # Files only: subfolders (clipsite's prepared ONNX exports) are clipsite's own cache.
        sources.update((p.name, p.resolve()) for p in (model_dir / part).iterdir() if p.is_file())
    for name, source in sorted(sources.items()):
        link = out / name
        if link.is_symlink() or link.exists():
            if link.resolve() == source:
                continue
            link.unlink()
        link.symlink_to(source)
    return out


def start_command(model_folder: Path, port: int) -> list[str]:
    """How to start infinity-emb (0.0.7x) on ``model_folder`` on the CPU, loopback only, float32.

    Run it with HF_HUB_OFFLINE=1 (the folder is local) and DO_NOT_TRACK=1 (no telemetry). The disk
    cache stays off: the benchmark repeats its bodies, and cached answers would not be a forward.
    """
    return [
        "infinity_emb", "v2",
        "--model-id", str(model_folder),
        "--engine", "torch",
        "--device", "cpu",
        "--dtype", "float32",
        "--no-vector-disk-cache",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
