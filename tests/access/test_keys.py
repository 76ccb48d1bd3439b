"""API keys and rate limits: created and revoked in admin or by command, stored hashed, shown once."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command

from access.models import ApiKey
from access.services import api_key_create, api_key_revoke, digest_of
from tests.conftest import multipart_body, override

pytestmark = pytest.mark.django_db
URL = "/syte_test/embeddings"


def post(client, **headers):
    body, content_type = multipart_body([("t", "a photo of a cat", None)])
    return client.generic("POST", URL, body, content_type=content_type, headers=headers)


@pytest.fixture
def keys_required(settings, clip):
    override(settings, access={"require_api_key": True})


def test_create_api_key_prints_the_key_as_its_last_line_and_stores_only_its_hash():
    out = io.StringIO()
    call_command("create_api_key", "search-backend", stdout=out, stderr=io.StringIO())
    raw = out.getvalue().strip().splitlines()[-1]
    assert raw.startswith("clip_") and len(raw) > 40
    key = ApiKey.objects.get(name="search-backend")
    assert key.digest == digest_of(raw) and raw not in (key.digest, key.prefix) and raw.startswith(key.prefix)


def test_without_a_key_every_api_endpoint_is_401_in_the_error_shape(client, keys_required):
    for path in (URL, "/syte_test/wearable", "/syte_test/feedback"):
        response = client.generic("POST", path, b"", content_type="multipart/form-data; boundary=b")
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "not_authenticated"
        assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_valid_key_is_accepted_as_bearer_or_x_api_key(client, keys_required):
    _, raw = api_key_create(name="ok")
    assert post(client, Authorization=f"Bearer {raw}").status_code == 200
    assert post(client, **{"X-API-Key": raw}).status_code == 200


def test_a_wrong_or_revoked_key_is_401(client, keys_required):
    key, raw = api_key_create(name="soon revoked")
    assert post(client, Authorization="Bearer clip_not-a-key").status_code == 401
    assert post(client, Authorization=f"Bearer {raw}").status_code == 200
    api_key_revoke(key=key)
    response = post(client, Authorization=f"Bearer {raw}")
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"


def test_keys_off_the_api_is_open_but_a_wrong_key_is_still_refused(client, clip):
    assert post(client).status_code == 200
    assert post(client, Authorization="Bearer clip_wrong").status_code == 401


def test_health_stays_open_with_keys_required(client, keys_required):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_the_demo_page_keeps_working_for_logged_in_staff(client, admin_client, keys_required):
    import json
    import re

    assert client.post("/", {"panel": "compare", "texts": "a cat"}).status_code == 401
    assert "log in as staff" in client.get("/").content.decode()
    page = admin_client.get("/").content.decode()
    config = json.loads(re.search(r'id="demo-config" type="application/json">(.*?)</script>', page).group(1))
    assert config["demoToken"]
    assert post(client, **{"X-Demo-Token": config["demoToken"]}).status_code == 200  # what demo.js sends
    assert post(client, **{"X-Demo-Token": config["demoToken"] + "x"}).status_code == 401
    assert (
        client.get("/").content.decode().count("demoToken") == 1
        and '"demoToken": null' in client.get("/").content.decode()
    )


def test_admin_shows_a_new_key_once_and_revokes(admin_client, clip):
    response = admin_client.post("/admin/access/apikey/add/", {"name": "from-admin"})
    assert response.status_code == 200  # the key's page itself, not a redirect the key would have to follow
    raw = re.search(r'<code id="api-key">(clip_[^<]+)</code>', response.content.decode()).group(1)
    key = ApiKey.objects.get(name="from-admin")
    assert key.digest == digest_of(raw)
    assert "no-store" in response["Cache-Control"]
    page = admin_client.get(f"/admin/access/apikey/{key.pk}/change/").content.decode()
    assert raw not in page
    admin_client.post("/admin/access/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_a_new_key_travels_in_no_cookie_message_or_session(admin_client, clip):
    response = admin_client.post("/admin/access/apikey/add/", {"name": "from-admin"})
    raw = re.search(r'<code id="api-key">(clip_[^<]+)</code>', response.content.decode()).group(1)
    assert all(raw not in morsel.OutputString() for morsel in response.cookies.values())
    assert all(raw not in str(value) for value in admin_client.session.values())
    assert [str(message) for message in response.context["messages"]] == []
    # Nor on the next page, where a message queued by the add would be shown.
    after = admin_client.get("/admin/access/apikey/")
    assert raw not in after.content.decode() and raw not in str(after.cookies)


def test_the_rate_limit_answers_429_with_retry_after_per_key(client, settings, clip):
    from django.core.cache import caches

    caches["throttle"].clear()
    override(settings, access={"rate_limit": "2/min"})
    _, first = api_key_create(name="a")
    _, second = api_key_create(name="b")
    assert [post(client, Authorization=f"Bearer {first}").status_code for _ in range(3)] == [200, 200, 429]
    response = post(client, Authorization=f"Bearer {first}")
    assert response.json()["error"]["code"] == "throttled" and 1 <= int(response["Retry-After"]) <= 60
    assert post(client, Authorization=f"Bearer {second}").status_code == 200  # a key of its own
    assert [post(client).status_code for _ in range(3)] == [200, 200, 429]  # per address without one
