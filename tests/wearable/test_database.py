"""The database must not turn into 500s or long stalls: WAL, a short busy timeout, and answers from memory.

The suite's test database is SQLite in memory, where neither WAL nor file locks exist. The tests of
those run on ``file_database``: a copy of the test database in a real SQLite file, opened by a Django
connection built from the product's own DATABASES settings, so the journal mode, the busy timeout and
the locks are SQLite's. The other tests make the queries fail (monkeypatch, a missing table) on the
in-memory database.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections
from django.db.utils import load_backend

from tests.conftest import photo_bytes
from tests.server import ROOT
from tests.wearable.conftest import post_wearable, upload
from wearable import services
from wearable.models import Prediction

SQLITE = "django.db.backends.sqlite3"


@pytest.fixture
def jpeg() -> bytes:
    return photo_bytes("chelsea.jpg")


@pytest.fixture
def file_database(django_db_blocker, tmp_path):
    """For one test, the default connection is a new, migrated SQLite file (its path is the value).

    The connection is built from the default database's settings (clipsite/settings.py's OPTIONS) with
    only NAME changed, so nothing touches the suite's database or the real one; the test runs in
    autocommit, as a server request does, not inside a test transaction.
    """
    default = connections[DEFAULT_DB_ALIAS]
    if default.settings_dict["ENGINE"] != SQLITE:
        pytest.skip("DATABASE_URL is not SQLite")
    path = tmp_path / "db.sqlite3"
    wrapper = load_backend(SQLITE).DatabaseWrapper({**default.settings_dict, "NAME": str(path)}, DEFAULT_DB_ALIAS)
    with django_db_blocker.unblock():
        connections[DEFAULT_DB_ALIAS] = wrapper
        try:
            call_command("migrate", verbosity=0, interactive=False)  # the schema and the seeded categories
            yield path
        finally:
            wrapper.close()
            connections[DEFAULT_DB_ALIAS] = default


def database_down(*args, **kwargs):
    raise OperationalError("unable to open database file")


def warnings_naming(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_sqlite_files_are_opened_in_wal_mode_with_a_short_busy_timeout(file_database):
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
        cursor.execute("PRAGMA busy_timeout")
        busy_ms = cursor.fetchone()[0]
    assert busy_ms == django_settings.SQLITE_BUSY_TIMEOUT_S * 1000
    assert django_settings.SQLITE_BUSY_TIMEOUT_S <= 5  # the old 20 s stalled every request behind a lock
    # Writers take the lock at BEGIN, where the busy timeout applies (a deferred upgrade fails at once).
    assert connection.transaction_mode == "IMMEDIATE"


def test_a_held_write_lock_answers_from_memory_and_logs_the_unrecorded_prediction(
    client, clip, jpeg, file_database, caplog
):
    warm = post_wearable(client, jpeg, headers={"request_id": "warm"})
    assert warm.status_code == 200, warm.content
    locker = sqlite3.connect(file_database, isolation_level=None)
    # In rollback-journal mode an exclusive lock also stops readers; in WAL readers go on.
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="wearable.services"):
            started = time.monotonic()
            locked = post_wearable(client, jpeg, headers={"request_id": "locked-1"})
            waited = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert locked.status_code == 200, locked.content
    assert locked.json()["top_categories"] == warm.json()["top_categories"]
    # It waited the short busy timeout for the write lock (the test above pins it), not the old 20 s.
    assert waited < 10
    assert warnings_naming(caplog, "locked-1")
    assert not Prediction.objects.filter(request_id="locked-1").exists()
    # The lock gone, the same process records again: the failed write left the connection usable.
    after = post_wearable(client, jpeg, headers={"request_id": "after-lock"})
    assert after.status_code == 200, after.content
    assert Prediction.objects.filter(request_id="after-lock").count() == 1


@pytest.mark.django_db
def test_a_cold_cache_with_the_database_down_is_503_database_unavailable(client, clip, jpeg, monkeypatch):
    monkeypatch.setattr(services, "_enabled_rows", database_down)
    response = post_wearable(client, jpeg, headers={"request_id": "cold-down"})
    assert response.status_code == 503, response.content
    assert response["Retry-After"] == "5"
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert "unable to open" not in error["message"]  # the internal reason stays in the log


@pytest.mark.django_db
def test_a_warm_cache_answers_when_the_database_is_down(client, clip, jpeg, monkeypatch, caplog):
    warm = post_wearable(client, jpeg, headers={"request_id": "warm"})
    assert warm.status_code == 200, warm.content
    monkeypatch.setattr(services, "_enabled_rows", database_down)
    monkeypatch.setattr(Prediction.objects, "create", database_down)
    with caplog.at_level(logging.WARNING, logger="wearable.services"):
        response = post_wearable(client, jpeg, headers={"request_id": "warm-down"})
    assert response.status_code == 200, response.content
    assert response.json()["top_categories"] == warm.json()["top_categories"]
    assert warnings_naming(caplog, "warm-down")
    assert not Prediction.objects.filter(request_id="warm-down").exists()


def test_a_failed_write_leaves_the_connection_usable(client, clip, jpeg, file_database, monkeypatch, caplog):
    # A real failing INSERT (no such table) in autocommit, as a server request runs: nothing is left
    # open or marked for rollback, and the next request on the same connection records its answer.
    monkeypatch.setattr(Prediction._meta, "db_table", "wearable_prediction_missing")
    with caplog.at_level(logging.WARNING, logger="wearable.services"):
        failed = post_wearable(client, jpeg, headers={"request_id": "no-table"})
    assert failed.status_code == 200, failed.content
    assert warnings_naming(caplog, "no-table")
    assert connection.get_autocommit() and not connection.in_atomic_block and not connection.needs_rollback
    monkeypatch.undo()
    after = post_wearable(client, jpeg, headers={"request_id": "after-failure"})
    assert after.status_code == 200, after.content
    assert Prediction.objects.filter(request_id="after-failure").count() == 1


@pytest.mark.django_db
def test_embeddings_never_touch_the_database(client, clip, jpeg, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.post("/syte_test/embeddings", data={"image-1": upload(jpeg), "text-1": "a photo of a cat"})
    assert response.status_code == 200, response.content


# --- PostgreSQL (the suite's second pass: scripts/with-postgres.sh) -----------------------------------
def postgres_settings(url: str, **env: str) -> dict:
    """settings.DATABASES["default"] for DATABASE_URL=``url``, in a fresh process."""
    code = "from clipsite import settings; import json; print(json.dumps(settings.DATABASES['default']))"
    environ = {**os.environ, "DATABASE_URL": url, **env}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_database_url_postgres_gives_psycopg3_persistent_health_checked_connections_with_deadlines():
    db = postgres_settings("postgres://clip:pw@db.internal:5433/clipsite?sslmode=require")
    # Django's backend, with a client-side deadline on every wait (clipsite/postgresql/base.py).
    assert db["ENGINE"] == "clipsite.postgresql" and (db["HOST"], db["PORT"], db["NAME"]) == (
        "db.internal",
        5433,
        "clipsite",
    )
    assert db["CONN_MAX_AGE"] == 60 and db["CONN_HEALTH_CHECKS"] is True
    assert db["OPTIONS"] == {
        "sslmode": "require",
        "connect_timeout": 3,
        "options": "-c lock_timeout=2000 -c statement_timeout=5000",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 5000,
        "client_timeout": 6.0,
    }


def test_a_database_urls_own_values_win_and_database_timeout_0_sets_no_query_limit():
    own = "options=-c%20statement_timeout%3D60000&tcp_user_timeout=20000&keepalives_idle=30&client_timeout=61"
    options = postgres_settings(f"postgres://clip:pw@db.internal/clipsite?{own}")["OPTIONS"]
    # The URL's statement_timeout stays, and ours that it does not name is added beside it.
    assert options["options"] == "-c statement_timeout=60000 -c lock_timeout=2000"
    assert (options["tcp_user_timeout"], options["keepalives_idle"], options["client_timeout"]) == (20000, 30, 61)
    unlimited = postgres_settings("postgres://clip:pw@db.internal/clipsite", DATABASE_TIMEOUT="0")["OPTIONS"]
    assert unlimited["options"] == "-c lock_timeout=2000"  # a lock is still waited for 2 s at most
    assert "tcp_user_timeout" not in unlimited and "client_timeout" not in unlimited
    assert unlimited["connect_timeout"] == 3


@pytest.mark.django_db
def test_on_postgresql_a_held_lock_is_a_quick_error_not_a_stall():
    if connection.vendor != "postgresql":
        pytest.skip("DATABASE_URL is not PostgreSQL (test.sh's second pass runs this)")
    import psycopg

    assert psycopg.__version__.startswith("3.") and connection.Database is psycopg
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone()[0] == f"{django_settings.SQLITE_BUSY_TIMEOUT_S}s"


@pytest.mark.django_db
def test_on_postgresql_every_query_has_a_server_and_a_client_deadline():
    if connection.vendor != "postgresql":
        pytest.skip("DATABASE_URL is not PostgreSQL (test.sh's second pass runs this)")
    from clipsite.postgresql.base import DeadlineConnection

    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "5s"
    # The client's own, for a server that does not answer at all (tests/test_database_faults.py freezes one).
    assert isinstance(connection.connection, DeadlineConnection) and connection.connection.deadline_s == 6.0
