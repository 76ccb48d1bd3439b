"""Attacks on the worker's memory budget (embeddings/memory.py), its edge (clipsite/workers.py) and the
failed-key-lookup limit (access/services.py) that succeeded on the code they were written against: each
test states the property that should hold, and fails while the hole is open. Bounded: a few servers,
a few dozen requests, well under 200 MB sent in all."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import multipart_body
from tests.server import raw_http, serving

MB = 2**20
ROOT = Path(__file__).resolve().parent.parent


def held_mb(port: int) -> float:
    metrics = raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[2].decode()
    line = next(line for line in metrics.splitlines() if line.startswith("clipsite_worker_memory_held_bytes "))
    return float(line.split()[-1]) / MB


def worker_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def post(body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


# --- 1. answers: held over the budget, never admitted, one per connection ---------------------------------


@pytest.mark.server
def test_large_answers_to_clients_that_do_not_read_stay_within_the_budget(tmp_path, tiny_model_dir):
    """GETs of a 3.9 MB static file (no body: nothing admitted) from clients that never read: each answer
    was buffered whole and ``reserve``d over the total, so N connections held N x 3.9 MB, and meanwhile
    every POST got 503. A file answer is now kept as the file (sendfile from the event loop)."""
    import drf_spectacular_sidecar

    budget_mb = 64
    env = {"WEB_CONCURRENCY": "1", "CLIP_WORKER_MEMORY_MB": str(budget_mb), "CLIP_MAX_REQUEST_BYTES": str(16 * MB)}
    path = "/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js.map"
    on_disk = (Path(drf_spectacular_sidecar.__file__).parent / path.lstrip("/")).read_bytes()
    assert len(on_disk) > 2 * MB
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n".encode()
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        socks = []
        try:
            for _ in range(32):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing; takes little
                sock.connect(("127.0.0.1", srv.port))
                sock.sendall(get + b"\r\n")
                socks.append(sock)
            # A client that reads gets the whole file, byte for byte, behind the 32 that do not.
            status, _, whole = raw_http(srv.port, get + b"Connection: close\r\n\r\n", timeout=60)
            assert status == 200 and whole == on_disk
            status, _, part = raw_http(srv.port, get + b"Range: bytes=1000-1999\r\nConnection: close\r\n\r\n")
            assert status == 206 and part == on_disk[1000:2000]
            held = held_mb(srv.port)
            status = raw_http(srv.port, post(*multipart_body([("t", "hello", None)])))[0]
            assert held < 1, f"answers hold {held:.0f} MB of a {budget_mb} MB budget"
            assert status == 200
        finally:
            for sock in socks:
                sock.close()


# --- 2. progressive JPEG: libjpeg's coefficient buffer is full-size whatever the draft --------------------


def progressive_cmyk_jpeg(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (side, side), (10, 200, 30, 5)).save(out, "JPEG", progressive=True, quality=90)
    return out.getvalue()


@pytest.mark.server
def test_a_progressive_jpeg_holds_what_its_decode_takes(tmp_path, tiny_model_dir):
    """A 25 MP progressive CMYK JPEG (~0.5 MB) is drafted to 1/8 and held as 625x625 pixels (~19 MB), but
    libjpeg keeps every DCT coefficient of the full-size image for a multi-scan file (2 bytes x 4
    components a pixel: ~200 MB), whatever the output scale."""
    budget_mb = 64
    env = {"WEB_CONCURRENCY": "1", "CLIP_WORKER_MEMORY_MB": str(budget_mb), "CLIP_MAX_REQUEST_BYTES": str(16 * MB)}
    upload = post(*multipart_body([("img", progressive_cmyk_jpeg(5000), "p.jpg")]))
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        pid = worker_pid(srv.proc.pid)
        warm = post(*multipart_body([("img", progressive_cmyk_jpeg(64), "s.jpg")]))
        assert raw_http(srv.port, warm)[0] == 200  # the libraries' first allocations
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = status_kb(pid, "VmRSS:")
        status = raw_http(srv.port, upload, timeout=120)[0]
        growth_mb = (status_kb(pid, "VmHWM:") - before) / 1024
        # Either refused (413/503) from what it really takes, or served within the budget (+ 64 MB slack).
        assert growth_mb < budget_mb + 64, (
            f"one {len(upload) // 1024} kB upload grew the worker {growth_mb:.0f} MB ({status})"
        )


# --- 3. WebP: Pillow's animation decoder keeps two canvases and a copy beside the picture ---------------

_WEBP_PEAK = textwrap.dedent(
    """
    import io, sys
    from PIL import Image
    from embeddings import images, memory
    def kb(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
    out = io.BytesIO(); Image.new("RGB", (3000, 3000)).save(out, "WEBP", lossless=True)
    held = []
    memory.hold_decode = lambda mode, w, h, *, key, **how: held.append(memory.decode_bytes(mode, w, h, **how))
    before = kb("VmRSS:"); open("/proc/self/clear_refs", "w").write("5")
    images.decode_image(out.getvalue())
    print(held[0], (kb("VmHWM:") - before) * 1024)
    """
)


def test_a_webp_decode_holds_what_it_takes():
    """decode_bytes counts a WebP as any RGB/RGBA file (8 bytes a pixel): it takes ~19 (measured 1.6x the
    estimate at 9 MP; at the 50 MP limit ~500 MB more than held)."""
    done = subprocess.run(
        [sys.executable, "-c", _WEBP_PEAK], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    estimate, peak = map(int, done.stdout.split())
    assert peak <= 1.1 * estimate, f"a 3000x3000 WebP is held as {estimate / MB:.0f} MB and takes {peak / MB:.0f} MB"


# --- 4. failed key lookups: /readyz?verbose=1 looks keys up without counting them -----------------------


@pytest.mark.server
def test_keys_tried_on_readyz_count_as_failed_lookups(tmp_path, tiny_model_dir):
    """The API refuses an address's new keys with 429 after FAILED_LOOKUPS_PER_MINUTE failures; /readyz's
    details look keys up with ``api_key_check(raw=raw)`` (no address): unlimited guesses, one database
    query each, and none of them counted."""
    with serving(tmp_path, tiny_model_dir, WEB_CONCURRENCY="1") as srv:
        statuses = set()
        for _ in range(40):
            key = os.urandom(16).hex()
            request = f"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
            statuses.add(raw_http(srv.port, request.encode())[0])
        fresh = f"X-API-Key: {os.urandom(16).hex()}\r\n"
        status = raw_http(srv.port, post(*multipart_body([("t", "hello", None)]), fresh))[0]
        assert 429 in statuses or status == 429, (
            f"40 bad keys on /readyz answered {sorted(statuses)}; the next on the API {status}"
        )


# --- 5. bodies that never come: 4 MiB of budget each for a few hundred bytes of headers -----------------


@pytest.mark.server
def test_bodies_that_never_come_cannot_lock_every_other_request_out(tmp_path, tiny_model_dir):
    """Each connection that sends a POST's headers (Content-Length: 8 MB) and one byte of body holds
    4 x HOLD_AHEAD_BYTES = 4 MiB of the budget until body_timeout, renewed by each byte it trickles (up to
    READ_LIMIT_S): budget / 4 MiB sockets (128 at the default 512 MB) and no bandwidth make every
    other request with a body a 503, from any client."""
    budget_mb = 64
    env = {"WEB_CONCURRENCY": "1", "CLIP_WORKER_MEMORY_MB": str(budget_mb), "CLIP_MAX_REQUEST_BYTES": str(16 * MB)}
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {8 * MB}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n-"
    ).encode()
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        socks = []
        try:
            for _ in range(budget_mb // 4):
                socks.append(socket.create_connection(("127.0.0.1", srv.port)))
                socks[-1].sendall(head)
            deadline = time.monotonic() + 30
            while held_mb(srv.port) < budget_mb - 1 and time.monotonic() < deadline:
                pass  # the server reads them as they come
            status, _, payload = raw_http(srv.port, post(*multipart_body([("t", "hello", None)])))
            assert status == 200, f"{len(socks)} sockets of 300 bytes each: a 5-byte POST got {status} {payload[:80]!r}"
        finally:
            for sock in socks:
                sock.close()
