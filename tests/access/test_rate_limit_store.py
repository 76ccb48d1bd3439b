"""Where the rate limits count (settings.CACHES["throttle"], access/ratelimit.py): SQLite files that every
worker process of a machine shares, a few operations a request and bounded in size; or Redis, shared by
every replica. A store that fails costs a request nothing."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from django.core.cache.backends.redis import RedisCache
from django.utils.module_loading import import_string

import clipsite.settings as product_settings
from access import ratelimit
from clipsite.config import load
from tests.conftest import ROOT
from tests.server import free_port


def local_store(location, **changes):
    """The store the product counts in without CLIP_REDIS_URL (the suite's own settings use memory)."""
    params = {k: v for k, v in product_settings.CACHES["throttle"].items() if k not in ("BACKEND", "LOCATION")}
    params["OPTIONS"] = {**params.get("OPTIONS", {}), **changes}
    return import_string(product_settings.CACHES["throttle"]["BACKEND"])(str(location), params)


def test_without_a_redis_url_the_counts_are_in_sqlite_under_clip_rate_limit_dir():
    conf = product_settings.CACHES["throttle"]
    assert conf["BACKEND"] == "access.ratelimit.LocalCounts"
    assert conf["LOCATION"] == str(product_settings.CLIPSITE.access.rate_limit_dir)


def test_counting_a_request_never_lists_the_store_folder(tmp_path, monkeypatch):
    store = local_store(tmp_path)
    listed = []
    for module, name in ((glob, "glob"), (glob, "iglob"), (os, "listdir"), (os, "scandir")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, _n=name, **k: listed.append(_n) or _f(*a, **k))
    for i in range(300):  # 300 clients, as many spoofed addresses once made 300 files
        assert ratelimit.take(f"rate-addr-203.0.{i // 250}.{i % 250}", limit=5, period=60, cache=store) is None
    monkeypatch.undo()
    assert listed == []
    assert len(os.listdir(tmp_path)) <= 8  # a few shard folders, whatever the number of clients


def test_the_local_store_stays_under_its_size_and_keeps_its_recent_clients(tmp_path):
    limit = 2**18
    store = local_store(tmp_path, size_limit=limit)
    regular = "rate-addr-198.51.100.20"
    for i in range(8000):
        ratelimit.take(f"rate-addr-10.{i // 65536}.{i // 256 % 256}.{i % 256}", limit=10**6, period=3600, cache=store)
        if i % 50 == 0:
            ratelimit.take(regular, limit=10**6, period=3600, cache=store)
    assert store._cache.volume() < 2 * limit
    kept = ratelimit.over(regular, limit=160, period=3600, cache=store)
    assert kept is not None and ratelimit.over(regular, limit=161, period=3600, cache=store) is None  # all 160
    assert ratelimit.over("rate-addr-10.0.31.63", limit=1, period=3600, cache=store) is not None  # the last one


SHARED = """
import json, sys, time
from django.utils.module_loading import import_string
from access import ratelimit
conf = json.loads(sys.argv[1])
store = import_string(conf.pop("BACKEND"))(conf.pop("LOCATION"), conf)
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
print(sum(ratelimit.take("rate-addr-203.0.113.5", limit=50, period=3600, cache=store) is None for _ in range(40)))
"""


def test_two_processes_count_together_in_the_local_store_and_lose_no_count(tmp_path):
    conf = {**product_settings.CACHES["throttle"], "LOCATION": str(tmp_path)}
    start = str(time.time() + 2)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SHARED, json.dumps(conf), start],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    allowed = [int(w.communicate(timeout=60)[0]) for w in workers]
    assert sum(allowed) == 50 and min(allowed) > 0, allowed  # 80 asked at once, exactly 50 allowed


def test_a_store_that_fails_lets_requests_through_at_once_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(ratelimit, "_store_down_until", 0.0)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = RedisCache(f"redis://127.0.0.1:{port}/0", {"OPTIONS": {"socket_connect_timeout": 0.25}})
    started = time.monotonic()
    assert all(ratelimit.take(f"c{i}", limit=1, period=60, cache=down) is None for i in range(100))
    assert time.monotonic() - started < 1.0  # asked once, then left alone for STORE_RETRY_S
    assert sum("rate-limit store failed" in r.getMessage() for r in caplog.records) == 1


def test_clip_redis_url_counts_in_redis_and_a_bad_one_is_e054(tmp_path):
    code = "import clipsite.settings as s, json; print(json.dumps(s.CACHES['throttle']))"
    env = {**os.environ, "CLIP_REDIS_URL": "redis://redis:6379/0", "DJANGO_SECRET_KEY": "x" * 50}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    conf = json.loads(out.stdout.strip().splitlines()[-1])
    assert conf["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert conf["LOCATION"] == "redis://redis:6379/0" and conf["OPTIONS"]["socket_timeout"] <= 0.5
    _, problems = load({"CLIP_REDIS_URL": "http://user:secret@redis:6379"}, base_dir=tmp_path)
    assert [(p.variable, p.check_id) for p in problems] == [("CLIP_REDIS_URL", "clipsite.E054")]
    assert "secret" not in problems[0].message


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of this test's own (the Debian package redis-server); skipped where there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen([binary, *options], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_replicas_count_together_through_redis(redis_url):
    options = {"KEY_PREFIX": "clipsite", "OPTIONS": {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}}
    replicas = [RedisCache(redis_url, options), RedisCache(redis_url, options)]  # two processes' clients
    allowed = [ratelimit.take("rate-key-7", limit=5, period=60, cache=replicas[i % 2]) is None for i in range(10)]
    assert allowed == [True] * 5 + [False] * 5
    wait = ratelimit.take("rate-key-7", limit=5, period=60, cache=replicas[0])
    assert 0 < wait <= 60
    assert ratelimit.take("rate-key-8", limit=5, period=60, cache=replicas[1]) is None  # another client


def test_compose_counts_in_its_redis_and_believes_only_its_own_networks_proxies():
    from tests.test_deploy import compose, compose_environment

    services = compose()["services"]
    environment = compose_environment("clipsite")
    assert environment["CLIP_REDIS_URL"] == "redis://redis:6379/0" and "redis" in services
    assert services["clipsite"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in services["redis"] and "ports" not in services["clipsite"]  # nginx is the only way in
    config, problems = load(environment, base_dir=ROOT)
    assert problems == []
    # Docker's networks come from the private ranges (RFC 1918): nginx's address is in one of them.
    assert set(config.access.trusted_proxies) == {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}
