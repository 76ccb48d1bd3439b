"""The rate limit through the real server: gunicorn's worker processes count in one shared store, and a
trusted proxy's X-Forwarded-For reaches Django through gunicorn and names the client."""

from __future__ import annotations

import pytest

from access import ratelimit
from tests.access.test_rate_limit_store import local_store
from tests.conftest import multipart_body
from tests.server import Server, raw_http, server_env

pytestmark = pytest.mark.server


def test_workers_share_the_counts_and_a_trusted_proxys_x_forwarded_for_names_the_client(tmp_path, tiny_model_dir):
    env = server_env(
        tmp_path,
        tiny_model_dir,
        WEB_CONCURRENCY="2",
        CLIP_RATE_LIMIT="4/min",
        CLIP_RATE_LIMIT_DIR=str(tmp_path / "rl"),
        CLIP_TRUSTED_PROXIES="127.0.0.1",  # the test is the proxy
    )
    srv = Server(env, tmp_path / "server.log")
    body, content_type = multipart_body([("t", "a cat", None)])

    def send(forwarded: str | None) -> int:
        header = "" if forwarded is None else f"X-Forwarded-For: {forwarded}\r\n"
        head = (
            f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{header}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        return raw_http(srv.port, head + body)[0]  # a connection each: gunicorn hands them to either worker

    try:
        srv.wait_ready()
        # Another process (this test) counts 3 requests of the client 203.0.113.5 in the shared store first.
        shared = local_store(tmp_path / "rl")
        for _ in range(3):
            ratelimit.take("rate-addr-203.0.113.5", limit=4, period=60, cache=shared)
        counted_elsewhere = [send("203.0.113.5") for _ in range(10)]
        # What the client put before the proxy's hop changes nothing; another client has its own count.
        prepended = [send(f"192.0.2.{i}, 198.51.100.20") for i in range(5)]
        unproxied = send(None)  # the proxy's own request: its address, 127.0.0.1
        log = srv.output()
    finally:
        srv.stop()
    assert counted_elsewhere == [200] + [429] * 9, counted_elsewhere  # 3 elsewhere + 1 = the 4 a minute allows
    assert prepended == [200] * 4 + [429], prepended
    assert unproxied == 200
    assert log.count("Booting worker") >= 2
