"""Through the real server README starts (scripts/start.sh -> gunicorn), with raw HTTP requests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import multipart_body, photo_bytes
from tests.server import GUNICORN_ONLY, ROOT, Server, raw_http, server_env, serving

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("server")
    with serving(tmp, tiny_model_dir, CLIP_MAX_REQUEST_BYTES=str(30 * 1024 * 1024)) as srv:
        yield srv


def request_bytes(path: str, body: bytes, content_type: str, extra_headers: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost:8081\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + body


def original_example() -> tuple[bytes, str]:
    """The original spec's request, made well-formed: same boundary, keys, filename, text and header."""
    return multipart_body(
        [("image-1", photo_bytes("chelsea.jpg"), "test.jpg"), ("text-1", "hello world, how are you?", None)],
        boundary="boundary",
    )


def test_original_example_with_literal_request_id_header(server):
    body, content_type = original_example()
    status, headers, payload = raw_http(
        server.port, request_bytes("//syte_test/clip", body, content_type, "request_id: 1\r\n")
    )
    assert status == 200, payload
    result = json.loads(payload)
    assert headers["request_id"] == "1" and result["request_id"] == "1"
    assert len(result["vectors"]["image-1"]) == len(result["vectors"]["text-1"]) == result["dim"]
    assert result["similarities"][0]["image"] == "image-1" and result["similarities"][0]["text"] == "text-1"


def test_doubled_slash_through_gunicorn(server):
    body, content_type = multipart_body([("text-1", "hi", None)])
    status, _, payload = raw_http(server.port, request_bytes("//syte_test/embeddings", body, content_type))
    assert status == 200, payload


def test_declared_length_over_limit_is_refused_before_the_body_is_sent(server):
    head = (
        b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000000\r\n\r\n"
    )
    started = time.monotonic()
    status, headers, payload = raw_http(server.port, head, timeout=10)  # sends no body at all
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5


def test_api_404_and_405_through_gunicorn(server):
    status, _, payload = raw_http(server.port, b"GET /syte_test/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and json.loads(payload)["error"]["code"] == "not_found"
    status, _, payload = raw_http(
        server.port,
        b"DELETE /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    )
    assert status == 405 and json.loads(payload)["error"]["code"] == "method_not_allowed"


def test_a_client_that_hangs_up_mid_body_does_not_hurt_others(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="t"\r\n\r\nabc'
        )
    body, content_type = multipart_body([("text-1", "still serving", None)])
    status, _, _ = raw_http(server.port, request_bytes("/syte_test/embeddings", body, content_type))
    assert status == 200


def run_start(tmp_path, model, **extra) -> subprocess.CompletedProcess:
    env = {**server_env(tmp_path, model, **extra), "PYTHON": sys.executable}
    import os

    env = {**os.environ, **env, "PATH": f"{sys.executable.rsplit('/', 1)[0]}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "start.sh")], env=env, capture_output=True, text=True, timeout=180
    )


def test_unloadable_model_stops_the_start_with_a_clear_error(tmp_path):
    result = run_start(tmp_path, tmp_path / "no-such-model")
    assert result.returncode != 0
    assert "no-such-model" in result.stderr + result.stdout


def test_bad_configuration_value_stops_the_start_naming_the_variable(tmp_path, tiny_model_dir):
    result = run_start(tmp_path, tiny_model_dir, CLIP_MAX_PARTS="lots")
    assert result.returncode != 0
    assert "CLIP_MAX_PARTS" in result.stderr and "clipsite.E027" in result.stderr


def test_a_model_that_fails_in_the_worker_stops_gunicorn(tmp_path, tiny_model_dir):
    # prepare_model passes (the folder is there) but the weights are corrupt: the worker cannot load.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model-clip" / "model.safetensors").write_bytes(b"not safetensors")
    result = run_start(tmp_path, broken)
    assert result.returncode != 0
    assert "cannot load" in (result.stderr + result.stdout).lower()


class RecordingHub:
    """A loopback TCP listener standing in for the Hugging Face hub: it counts who connects."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def test_workers_never_touch_the_hub_after_prepare_model(tmp_path, tiny_model_dir):
    import shutil

    from embeddings.runtime import loading, testmodel

    models = tmp_path / "models"
    cache = loading.hub_cache_dir(models, "openai/clip-vit-base-patch32")
    shutil.copytree(tiny_model_dir, cache, ignore=shutil.ignore_patterns("clipsite-prepared"))
    (cache / "model-clip" / testmodel.MARKER).unlink()  # as prepare_model would have fetched it
    hub = RecordingHub()
    env = server_env(tmp_path, "openai/clip-vit-base-patch32", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    prepared = subprocess.run(
        [sys.executable, "manage.py", "prepare_model"],
        env={**__import__("os").environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    srv = Server(env, tmp_path / "server.log", command=GUNICORN_ONLY)
    try:
        assert srv.wait_ready()["model"] == "openai/clip-vit-base-patch32"  # a hub id is served as it is
        assert srv.details()["faithful"]
        body, content_type = multipart_body([("text-1", "offline", None)])
        status, _, _ = raw_http(srv.port, request_bytes("/syte_test/embeddings", body, content_type))
        assert status == 200
    finally:
        srv.stop()
        hub.close()
    assert hub.connections == 0


def test_a_worker_with_nothing_prepared_stops_and_names_prepare_model(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "unprepared"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("clipsite-prepared"))
    env = {**__import__("os").environ, **server_env(tmp_path, folder), "PYTHON": sys.executable}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], env=env, cwd=ROOT, check=True, timeout=120)
    result = subprocess.run(GUNICORN_ONLY, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "prepare_model" in result.stdout + result.stderr
    assert not (folder / "model-clip" / "clipsite-prepared" / "image.onnx").exists()  # the worker exported nothing


def test_only_the_literal_request_id_header_keeps_its_underscore(server):
    """Underscored headers are dropped, not merged into their dashed twins: X_Request_Id is not X-Request-ID."""
    body, content_type = multipart_body([("text-1", "hi", None)])
    status, headers, _ = raw_http(
        server.port, request_bytes("/syte_test/embeddings", body, content_type, "X_Request_Id: smuggled\r\n")
    )
    assert status == 200 and headers["request_id"] != "smuggled"
    status, headers, _ = raw_http(
        server.port, request_bytes("/syte_test/embeddings", body, content_type, "request_id: literal-7\r\n")
    )
    assert status == 200 and headers["request_id"] == "literal-7"
