"""Workers come and go without losing a request silently: SIGTERM drains, SIGKILL is survived.

A request is held in flight by its own work: three 7000x7000 PNGs (no JPEG draft to shortcut them),
decoded and resized one after another, keep it busy for a second or more; /metrics says when it is in
flight, and the test acts then.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes, multipart_body
from tests.server import raw_http, serving

pytestmark = pytest.mark.server


@functools.cache
def large_png() -> bytes:
    ramp = np.linspace(0, 255, 7000, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (7000, 1)), np.tile(ramp[:, None], (1, 7000)), np.full((7000, 7000), 90, np.uint8)], -1
    )
    return image_bytes(Image.fromarray(pixels), "PNG", compress_level=1)


def request(port: int) -> bytes:
    parts = [(f"img{i}", large_png(), f"large{i}.png") for i in range(3)] + [("t", "held in flight", None)]
    body, content_type = multipart_body(parts)
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def in_flight(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("clipsite_requests_in_flight "):
                return float(line.split()[1])
    return 0.0


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # polling a condition, not timing one
    raise AssertionError("the condition was never reached")


def start_held_request(port: int) -> tuple[threading.Thread, list]:
    outcome: list = []

    def call():
        try:
            outcome.append(raw_http(port, request(port), timeout=60))
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: in_flight(port) >= 1)
    return thread, outcome


@pytest.fixture
def busy_request_server(tmp_path, tiny_model_dir):
    with serving(tmp_path, tiny_model_dir, CLIP_MAX_REQUEST_PIXELS="200000000") as srv:
        yield srv


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


def test_sigterm_finishes_the_request_in_flight_then_refuses_new_ones(busy_request_server):
    srv = busy_request_server
    thread, outcome = start_held_request(srv.port)
    os.kill(srv.proc.pid, signal.SIGTERM)  # the master (scripts/start.sh execs gunicorn)
    thread.join(60)
    status, _, payload = outcome[0]
    assert status == 200 and json.loads(payload)["texts_vectors"]
    srv.proc.wait(60)
    assert srv.proc.returncode == 0
    with pytest.raises(OSError):  # nobody listens any more
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_a_worker_killed_mid_request_gives_its_client_an_error_and_is_replaced(busy_request_server):
    srv = busy_request_server
    (worker,) = worker_pids(srv.proc.pid)
    thread, outcome = start_held_request(srv.port)
    started = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    thread.join(60)
    assert time.monotonic() - started < 30  # an error, not a hang
    assert isinstance(outcome[0], Exception) or outcome[0][0] >= 500
    wait_for(lambda: worker_pids(srv.proc.pid) not in ([], [worker]))
    srv.wait_ready()  # the new worker loads and serves
    body, content_type = multipart_body([("t", "after the kill", None)])
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    assert raw_http(srv.port, head.encode() + body, timeout=30)[0] == 200


def test_readiness_fails_while_draining(tiny_model_dir):
    from embeddings.runtime.prepare import prepare
    from embeddings.runtime.state import Runtime, RuntimeNotReady
    from tests.conftest import runtime_settings

    settings = runtime_settings(tiny_model_dir)
    prepare(settings)
    rt = Runtime()
    try:
        engine = rt.load(settings)
        with rt.admitted():  # a request already in flight (still reading its upload, say) when SIGTERM comes
            rt.drain()
            assert rt.engine() is engine
        assert not rt.ready and rt.status == "draining"
        with rt.admitted(), pytest.raises(RuntimeNotReady):  # one that starts while draining
            rt.engine()
        assert engine.embed_texts(["a request already holding the engine finishes"]).shape[0] == 1
    finally:
        rt.close()


def test_a_replacement_worker_takes_no_request_until_its_model_is_loaded(tmp_path, tiny_model_dir):
    """Its sibling serves meanwhile: no client sees the 503 a loading worker would answer."""
    body, content_type = multipart_body([("t", "while a worker is replaced", None)])
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with serving(tmp_path, tiny_model_dir, WEB_CONCURRENCY="2", WEB_THREADS="2") as srv:
        wait_for(lambda: srv.wait_ready().get("workers") == {"ready": 2, "loading": 0}, timeout=60)
        first = worker_pids(srv.proc.pid)
        os.kill(first[0], signal.SIGKILL)
        statuses: list[int] = []
        replaced = threading.Event()

        def send():
            while not replaced.is_set():
                statuses.append(raw_http(srv.port, head.encode() + body, timeout=30)[0])

        senders = [threading.Thread(target=send) for _ in range(3)]
        for t in senders:
            t.start()
        try:
            wait_for(lambda: srv.output().count("ready in") >= 3, timeout=60)
            for _ in range(20):  # and the replacement serves its share afterwards
                statuses.append(raw_http(srv.port, head.encode() + body, timeout=30)[0])
        finally:
            replaced.set()
            for t in senders:
                t.join(60)
        assert len(worker_pids(srv.proc.pid)) == 2 and first[0] not in worker_pids(srv.proc.pid)
        assert statuses and set(statuses) == {200}, statuses


def test_workers_serving_openvino_exit_cleanly_on_sigterm(tmp_path, tiny_model_dir):
    """Once the master imported onnxruntime, a worker that had run OpenVINO aborted as it exited."""
    with serving(tmp_path, tiny_model_dir, CLIP_BACKEND="openvino", CLIP_DTYPE="float32", WEB_CONCURRENCY="2") as srv:
        body, content_type = multipart_body([("t", "served by openvino", None)])
        head = (
            f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        assert raw_http(srv.port, head.encode() + body, timeout=30)[0] == 200
        os.kill(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(60)
        log = srv.output()
    assert srv.proc.returncode == 0
    assert log.count("Worker exiting") == 2, log[-3000:]
    assert "SIGABRT" not in log and "terminate called" not in log, log[-3000:]
