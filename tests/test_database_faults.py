"""A database that fails, stops or freezes costs a request seconds and a 503, never a 500, a traceback,
a hung thread or a server that cannot start (issue 15, "Database faults").

In-process tests make every query fail (an execute wrapper raising what psycopg or sqlite3 raise when
the server is gone) on each kind of path. The real-server tests run scripts/start.sh against a
PostgreSQL cluster of their own (tests/postgres.py), which they stop, or freeze with SIGSTOP: the server
is up, its kernel acknowledges every packet, and nothing answers, which no TCP timeout detects.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time

import pytest
import requests
from django.db import InterfaceError, OperationalError, connection

from tests.conftest import override, photo_bytes
from tests.postgres import Cluster, postgres_bindir
from tests.server import ROOT, free_port, serving
from tests.wearable.conftest import upload

REFUSED = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused'


def unseen_key() -> str:
    """A key shaped like ours that no server has checked: only the database can say what it is."""
    return "clip_" + secrets.token_urlsafe(32)


@pytest.fixture(params=[OperationalError, InterfaceError], ids=["OperationalError", "InterfaceError"])
def database_down(request, db):
    """Every query fails as it does when the database server is gone."""

    def fail(execute, sql, params, many, context):
        raise request.param(REFUSED)

    with connection.execute_wrapper(fail):
        yield


def error_of(response, status: int = 503) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert response["Retry-After"] == "5"
    assert "Connection refused" not in error["message"]  # the reason stays in the log
    return error


def tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


# --- every path, in the process ------------------------------------------------------------------------
def test_a_failing_database_is_503_database_unavailable_on_every_api_path(
    client, clip, settings, database_down, caplog
):
    override(settings, access={"require_api_key": True})
    key = {"HTTP_AUTHORIZATION": f"Bearer {unseen_key()}"}
    jpeg = photo_bytes("chelsea.jpg")
    with caplog.at_level(logging.WARNING):
        error_of(client.post("/syte_test/embeddings", data={"text-1": "a cat"}, **key))
        error_of(client.post("/syte_test/wearable", data={"image": upload(jpeg)}, **key))
        error_of(client.post("/syte_test/feedback", {"request_id": "r", "categories": []}, "application/json", **key))
        error_of(client.post("/v1/embeddings", {"input": "a cat"}, "application/json", **key))
        error_of(client.post("/syte_test/embeddings", data={"text-1": "a cat"}, HTTP_X_API_KEY=unseen_key()))
    assert tracebacks(caplog) == []
    assert any("Connection refused" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_keyless_requests_that_need_the_database_are_503_and_those_that_do_not_are_served(
    client, clip, database_down, caplog
):
    with caplog.at_level(logging.WARNING):
        error_of(client.post("/syte_test/feedback", {"request_id": "r", "categories": []}, "application/json"))
        embeddings = client.post("/syte_test/embeddings", data={"text-1": "a cat"})
        openai = client.post("/v1/embeddings", {"input": "a cat"}, "application/json")
    assert embeddings.status_code == 200, embeddings.content
    assert openai.status_code == 200, openai.content
    assert tracebacks(caplog) == []


def test_pages_outside_the_api_answer_503_when_the_database_fails_under_a_session(client, settings, database_down):
    client.cookies[settings.SESSION_COOKIE_NAME] = "s" * 32  # a staff session to look up
    for path in ("/", "/admin/"):
        response = client.get(path)
        assert response.status_code == 503, (path, response.content[:300])
        assert response["Retry-After"] == "5"
        assert b"database is not answering" in response.content


# --- start.sh's migrations: CLIP_MIGRATE ---------------------------------------------------------------
def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python manage.py ARGS`` in a process of its own, with the product's settings and ``env``."""
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "clipsite.settings", **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120
    )


def test_migrate_at_start_does_what_clip_migrate_says(tmp_path):
    down = f"postgres://postgres@127.0.0.1:{free_port()}/clipsite"  # nothing listens: refused
    auto = manage("migrate_at_start", DATABASE_URL=down)
    assert auto.returncode == 0, auto.stderr
    assert "THE DATABASE CANNOT BE REACHED" in auto.stderr and "Traceback" not in auto.stderr
    strict = manage("migrate_at_start", DATABASE_URL=down, CLIP_MIGRATE="true")
    assert strict.returncode != 0 and "the database failed" in strict.stderr
    left = manage("migrate_at_start", DATABASE_URL=down, CLIP_MIGRATE="false")
    assert left.returncode == 0 and "CLIP_MIGRATE=false" in left.stderr, left.stderr
    # A SQLite file is this server's own: auto migrates it.
    sqlite = manage("migrate_at_start", DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert sqlite.returncode == 0, sqlite.stderr
    assert (tmp_path / "db.sqlite3").stat().st_size > 0


@pytest.mark.server
def test_the_server_starts_and_serves_embeddings_with_the_database_down(tmp_path, tiny_model_dir):
    down = f"postgres://postgres@127.0.0.1:{free_port()}/clipsite"
    with serving(tmp_path, tiny_model_dir, DATABASE_URL=down) as srv:  # scripts/start.sh, CLIP_MIGRATE unset
        embeddings = requests.post(f"{srv.url}/syte_test/embeddings", files={"t": (None, "a cat")}, timeout=30)
        keyed = requests.post(
            f"{srv.url}/syte_test/embeddings",
            files={"t": (None, "a cat")},
            headers={"Authorization": f"Bearer {unseen_key()}"},
            timeout=30,
        )
        ready = wait_for_database_state(srv.url, "unavailable")
        log = srv.output()
    assert embeddings.status_code == 200, embeddings.text
    assert keyed.status_code == 503 and keyed.json()["error"]["code"] == "database_unavailable", keyed.text
    assert ready["ready"] is True
    assert "THE DATABASE CANNOT BE REACHED" in log
    assert "Traceback" not in log


# --- a PostgreSQL of the test's own, stopped and frozen ------------------------------------------------
@pytest.fixture
def postgres():
    """A running PostgreSQL cluster of this test's own (tests/postgres.py), removed afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: PostgreSQL must be installed (apt-get install postgresql)")
        pytest.skip("no PostgreSQL on this machine (apt-get install postgresql)")
    cluster = Cluster(bindir)
    try:
        yield cluster
    finally:
        cluster.remove()


def create_key(url: str) -> str:
    """A new API key in the database at ``url`` (migrated: the server's start script did it)."""
    done = manage("create_api_key", "test", DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def embed(url: str, key: str | None = None, timeout: float = 30) -> tuple[requests.Response, float]:
    """One text embedded, keyed or not, and the seconds the answer took."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.monotonic()
    response = requests.post(
        f"{url}/syte_test/embeddings", files={"t": (None, "a cat")}, headers=headers, timeout=timeout
    )
    return response, time.monotonic() - started


def wait_for_database_state(url: str, state: str, within: float = 30) -> dict:
    """/readyz's body once it says ``state``; it must answer 200, and at once, all along."""
    deadline = time.monotonic() + within
    while True:
        started = time.monotonic()
        response = requests.get(f"{url}/readyz", timeout=10)
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 3, "a readiness probe waited on the database"
        body = response.json()
        if body["database"] == state or time.monotonic() > deadline:
            assert body["database"] == state, body
            return body
        time.sleep(0.5)


def served_again(url: str, key: str, within: float = 30) -> requests.Response:
    deadline = time.monotonic() + within
    while True:
        response, _ = embed(url, key)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def assert_unavailable_within(response: requests.Response, seconds: float) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable", response.text
    assert response.headers["Retry-After"] == "5"
    assert seconds < 15, seconds  # its bounds: DATABASE_TIMEOUT + 1 s on a kept connection, then 3 s to connect


@pytest.mark.server
def test_with_postgresql_stopped_keyed_requests_are_503_and_the_rest_is_served(tmp_path, tiny_model_dir, postgres):
    # Keys not required, so that keyless requests show what is served; a key presented is checked anyway.
    env = {"DATABASE_URL": postgres.url, "CLIP_REQUIRE_API_KEY": "false"}
    with serving(tmp_path, tiny_model_dir, **env) as srv:  # start.sh migrates the cluster (CLIP_MIGRATE=auto)
        key, later_key = create_key(postgres.url), create_key(postgres.url)
        assert embed(srv.url, key)[0].status_code == 200  # the request thread now keeps a connection
        postgres.stop()
        assert_unavailable_within(*embed(srv.url, unseen_key()))
        keyless, _ = embed(srv.url)
        assert keyless.status_code == 200, keyless.text
        wait_for_database_state(srv.url, "unavailable")
        postgres.start()
        # The same server, with no restart, checks keys again once the database is back.
        recovered = served_again(srv.url, later_key)
        assert recovered.status_code == 200, recovered.text
        wait_for_database_state(srv.url, "ok")
        log = srv.output()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.server
def test_with_postgresql_frozen_keyed_requests_are_503_within_seconds(tmp_path, tiny_model_dir, postgres):
    # One request thread: the connection it keeps from the first request is the one that meets the
    # frozen server (the hang of the issue: a query on a kept connection waited for ever).
    env = {"DATABASE_URL": postgres.url, "CLIP_REQUIRE_API_KEY": "false", "WEB_THREADS": "1"}
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        key, later_key = create_key(postgres.url), create_key(postgres.url)
        assert embed(srv.url, key)[0].status_code == 200
        postgres.freeze()
        try:
            assert_unavailable_within(*embed(srv.url, unseen_key()))  # the kept connection: the deadline
            keyless, keyless_s = embed(srv.url)
            assert keyless.status_code == 200 and keyless_s < 15, (keyless.text, keyless_s)
            assert_unavailable_within(*embed(srv.url, unseen_key()))  # a new connection: connect_timeout
            wait_for_database_state(srv.url, "unavailable")
        finally:
            postgres.thaw()
        recovered = served_again(srv.url, later_key)
        assert recovered.status_code == 200, recovered.text
        wait_for_database_state(srv.url, "ok")
        log = srv.output()
    assert "Traceback" not in log, log[-3000:]
