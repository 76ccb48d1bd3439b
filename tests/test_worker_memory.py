"""A worker's memory stays within its budget whatever arrives at once (the real server): bodies are
admitted from their headers, decodes from their image headers, and the rest gets 503 overloaded."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import multipart_body
from tests.server import raw_http, serving

pytestmark = pytest.mark.server
MB = 2**20


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def worker_pid(server_pid: int) -> int:
    """The one gunicorn worker under the master (started by scripts/start.sh's exec)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def palette_png(side: int) -> bytes:
    im = Image.new("P", (side, side))
    im.putpalette([i % 256 for i in range(768)])
    out = io.BytesIO()
    im.save(out, "PNG", transparency=0)
    return out.getvalue()


def post(port: int, body: bytes, content_type: str) -> tuple[int, bytes]:
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\nConnection: close\r\n\r\n"
    )
    status, _, payload = raw_http(port, head.encode() + body, timeout=120)
    return status, payload


def test_eight_small_files_that_decode_large_at_once_stay_within_the_budget(tmp_path, tiny_model_dir):
    budget_mb = 256
    env = {
        "WEB_CONCURRENCY": "1",
        "WEB_THREADS": "8",
        "CLIP_WORKER_MEMORY_MB": str(budget_mb),
        "CLIP_MAX_REQUEST_BYTES": str(50 * MB),
    }
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        pid = worker_pid(srv.proc.pid)
        body, content_type = multipart_body([("img", palette_png(5000), "bomb.png")])  # 25 MP in a few kB
        assert len(body) < 100_000
        assert post(srv.port, body, content_type)[0] == 200  # warm: the libraries' own first allocations
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        before = status_kb(pid, "VmRSS:")
        results: list[tuple[int, bytes]] = []
        threads = [
            threading.Thread(target=lambda: results.append(post(srv.port, body, content_type))) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        growth_mb = (status_kb(pid, "VmHWM:") - before) / 1024
        statuses = sorted(status for status, _ in results)
        assert len(statuses) == 8 and set(statuses) <= {200, 503}, statuses
        assert 200 in statuses
        for status, payload in results:
            if status == 503:
                assert json.loads(payload)["error"]["code"] == "overloaded"
        # Unbudgeted, eight decodes of 25 MP at ~17 bytes a pixel took over 3 GB; now at most the budget,
        # plus what no budget counts (allocator slack, the answers): 128 MB of room for that.
        assert growth_mb < budget_mb + 128, f"peak grew {growth_mb:.0f} MB; statuses {statuses}"


def held_mb(port: int) -> float:
    metrics = raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[2].decode()
    line = next(line for line in metrics.splitlines() if line.startswith("clipsite_worker_memory_held_bytes "))
    return float(line.split()[-1]) / MB


def test_bodies_hold_the_budget_as_they_arrive_and_one_past_it_gets_503(tmp_path, tiny_model_dir):
    env = {
        "WEB_CONCURRENCY": "1",
        "CLIP_WORKER_MEMORY_MB": "64",
        "CLIP_MAX_REQUEST_BYTES": str(7 * MB),  # a whole one holds 4 x 7 MB of the 64
    }
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {7 * MB}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    ).encode()
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        held = []
        try:
            silent = socket.create_connection(("127.0.0.1", srv.port))  # declares 7 MB, sends none of it
            silent.sendall(head)
            held.append(silent)
            for _ in range(2):  # most of their bodies, then nothing more
                sock = socket.create_connection(("127.0.0.1", srv.port))
                sock.sendall(head + b"x" * (6 * MB + MB // 2))
                held.append(sock)
            deadline = time.monotonic() + 30
            # 4 x what came, up to 64 KiB ahead (where the reads fell), each; 4 x 64 KiB for the silent one
            least, most = 2 * 4 * 6.5 + 4 / 16, 2 * 4 * (6.5 + 1 / 16) + 4 / 16
            while held_mb(srv.port) < least and time.monotonic() < deadline:
                pass  # the server reads them as they come
            assert least <= held_mb(srv.port) < most + 2  # and the answers being sent (this metrics')
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(head)
                with contextlib.suppress(OSError):
                    sock.sendall(b"x" * (3 * MB))
                sock.settimeout(15)
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
        finally:
            for sock in held:
                sock.close()
        body, content_type = multipart_body([("t", "a photo of a cat", None)])
        assert post(srv.port, body, content_type)[0] == 200
