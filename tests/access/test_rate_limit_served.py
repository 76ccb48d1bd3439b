"""The rate limit holds across gunicorn's worker processes: they count in one shared cache."""

from __future__ import annotations

import pytest

from tests.conftest import multipart_body
from tests.server import Server, raw_http, server_env

pytestmark = pytest.mark.server


def test_the_rate_limit_is_shared_by_every_worker(tmp_path, tiny_model_dir):
    env = server_env(
        tmp_path, tiny_model_dir, WEB_CONCURRENCY="2", CLIP_RATE_LIMIT="4/min", CLIP_RATE_LIMIT_DIR=str(tmp_path / "rl")
    )
    srv = Server(env, tmp_path / "server.log")
    try:
        srv.wait_ready()
        # Another process (this test) counts 3 requests of this client in the shared cache first.
        import time

        from django.core.cache.backends.filebased import FileBasedCache

        shared = FileBasedCache(str(tmp_path / "rl"), {})
        shared.set("throttle_clip_addr-127.0.0.1", [time.time()] * 3, 60)
        body, content_type = multipart_body([("t", "a cat", None)])
        head = (
            f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        statuses = []
        for _ in range(10):  # a connection each: gunicorn hands them to either worker
            status, _, _ = raw_http(srv.port, head + body)
            statuses.append(status)
        log = srv.output()
    finally:
        srv.stop()
    assert statuses == [200] + [429] * 9, statuses  # 3 counted elsewhere + 1 here = the 4 a minute allows
    assert log.count("Booting worker") >= 2
