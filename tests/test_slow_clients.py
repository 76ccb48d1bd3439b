"""Slow clients cost a connection each, never a thread: with 48 connections sending their requests a
byte at a time, a normal request is answered in its usual time (real sockets, the real server)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import multipart_body
from tests.server import raw_http, serving

pytestmark = pytest.mark.server
SLOW_CLIENTS = 48


def request_bytes() -> bytes:
    body, content_type = multipart_body([("t", "a photo of a cat", None)])
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def timed_request(port: int) -> tuple[int, float]:
    started = time.monotonic()
    status, _, _ = raw_http(port, request_bytes(), timeout=60)
    return status, time.monotonic() - started


@pytest.mark.parametrize("part", ["headers", "body"])
def test_48_clients_dripping_their_requests_do_not_hold_the_threads(tmp_path, tiny_model_dir, part):
    # One worker of 2 threads: without the buffering worker, 2 slow clients would already block it.
    with serving(tmp_path, tiny_model_dir, WEB_CONCURRENCY="1", WEB_THREADS="2") as srv:
        usual = min(timed_request(srv.port)[1] for _ in range(3))
        data = request_bytes()
        split = data.index(b"\r\n\r\n") + 4 if part == "body" else 20
        slow = []
        for _ in range(SLOW_CLIENTS):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(data[:split])  # then nothing more for now: a client dripping its request
            slow.append(s)
        try:
            for s in slow:  # a byte more from each, as they would
                s.sendall(data[split : split + 1])
            status, seconds = timed_request(srv.port)
            assert status == 200
            assert seconds < usual + 2.0, (seconds, usual)  # its usual time, not a wait for a free thread
            for s in slow:  # the slow ones, once complete, are answered too
                s.sendall(data[split + 1 :])
            for s in slow[:3]:
                s.settimeout(30)
                assert s.recv(12).startswith(b"HTTP/1.1 200")
        finally:
            for s in slow:
                s.close()
