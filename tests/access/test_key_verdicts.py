"""The verdicts on presented keys (access/services.py): a bounded LRU, served stale while the database
fails, and an address that sends keys that do not exist is throttled before the database is asked."""

from __future__ import annotations

import logging
import secrets

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from access import services
from access.services import api_key_check, api_key_create, api_key_revoke
from tests.conftest import multipart_body, override

pytestmark = pytest.mark.django_db
URL = "/syte_test/embeddings"


def post(client, key: str | None = None, remote_addr: str = "127.0.0.1", url: str = URL):
    body, content_type = multipart_body([("t", "a cat", None)])
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.generic("POST", url, body, content_type=content_type, headers=headers, REMOTE_ADDR=remote_addr)


def random_key() -> str:
    return "clip_" + secrets.token_urlsafe(32)


def key_queries(queries) -> int:
    return sum("access_apikey" in q["sql"] for q in queries)


class DatabaseDown:
    """Every query raises OperationalError, as a database that is down does."""

    def __call__(self, execute, sql, params, many, context):
        raise OperationalError("connection refused")


def test_the_verdict_cache_evicts_the_least_recently_used_key_not_all_of_them(monkeypatch):
    monkeypatch.setattr(services, "CHECK_TTL_S", 3600.0)
    key, raw = api_key_create(name="busy")
    assert api_key_check(raw=raw) is not None
    for i in range(services.VERDICTS_KEPT + 500):  # random keys fill the cache past its size...
        api_key_check(raw=f"clip_flood-{i}")
        if i % 100 == 0:
            api_key_check(raw=raw)  # ...while the busy key keeps being used
    with CaptureQueriesContext(connection) as queries:
        assert api_key_check(raw=raw).key_id == key.pk
    assert key_queries(queries) == 0  # still remembered: no query
    with CaptureQueriesContext(connection) as queries:
        api_key_check(raw="clip_flood-0")  # the least recently used: evicted, so looked up again
    assert key_queries(queries) == 1


def test_a_keys_last_verdict_answers_while_the_database_fails(client, clip, settings, monkeypatch, caplog):
    override(settings, access={"require_api_key": True})
    monkeypatch.setattr(services, "CHECK_TTL_S", 0.0)  # every verdict expires at once
    _, valid = api_key_create(name="steady")
    revoked_key, revoked = api_key_create(name="gone")
    assert post(client, valid).status_code == 200 and post(client, revoked).status_code == 200
    api_key_revoke(key=revoked_key)
    with caplog.at_level(logging.WARNING, logger="access.services"), connection.execute_wrapper(DatabaseDown()):
        assert [post(client, valid).status_code for _ in range(3)] == [200, 200, 200]
        assert post(client, revoked).status_code == 401  # its last verdict: revoked
        with pytest.raises(OperationalError):
            api_key_check(raw=random_key())  # never seen: no verdict to serve
    warnings = [r for r in caplog.records if "last verdicts" in r.getMessage()]
    assert len(warnings) == 1  # once for the outage, not once a request


def test_an_address_that_sends_random_keys_is_throttled_before_the_database(client, clip):
    limit = services.FAILED_LOOKUPS_PER_MINUTE
    statuses = [post(client, random_key(), remote_addr="203.0.113.5").status_code for _ in range(limit)]
    assert statuses == [401] * limit
    with CaptureQueriesContext(connection) as queries:
        refused = post(client, random_key(), remote_addr="203.0.113.5")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "throttled"
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert key_queries(queries) == 0
    # Another address is still told its key is wrong, after a lookup.
    assert post(client, random_key(), remote_addr="198.51.100.20").status_code == 401


def test_a_key_seen_valid_keeps_working_from_an_address_past_its_failed_lookups(client, clip, monkeypatch):
    monkeypatch.setattr(services, "CHECK_TTL_S", 0.0)  # every verdict expires at once: each use looks it up
    _, raw = api_key_create(name="shared-nat")
    assert post(client, raw, remote_addr="203.0.113.5").status_code == 200
    for _ in range(services.FAILED_LOOKUPS_PER_MINUTE):
        post(client, random_key(), remote_addr="203.0.113.5")
    assert post(client, random_key(), remote_addr="203.0.113.5").status_code == 429
    with CaptureQueriesContext(connection) as queries:
        assert post(client, raw, remote_addr="203.0.113.5").status_code == 200
    assert key_queries(queries) == 1  # looked up, as it was seen valid here before


def test_with_keys_optional_v1_serves_an_address_past_its_failed_lookups_as_keyless(client, clip):
    for _ in range(services.FAILED_LOOKUPS_PER_MINUTE):
        post(client, random_key())
    response = client.post(
        "/v1/embeddings",
        {"input": "a cat"},
        content_type="application/json",
        headers={"Authorization": f"Bearer {random_key()}"},
    )
    assert response.status_code == 200
