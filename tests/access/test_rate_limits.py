"""CLIP_RATE_LIMIT covers every way in to the model, the demo page's no-script forms included, and
counts in a sliding window whose Retry-After never passes the period."""

from __future__ import annotations

import io

import pytest
from django.core.cache.backends.locmem import LocMemCache
from rest_framework.views import APIView

from access import ratelimit
from access.authentication import ClientRateThrottle
from tests.conftest import multipart_body, override, photo_bytes

pytestmark = pytest.mark.django_db


def upload(data: bytes, name: str):
    f = io.BytesIO(data)
    f.name = name
    return f


def multipart(client, url: str, parts: list[tuple]):
    body, content_type = multipart_body(parts)
    return client.generic("POST", url, body, content_type=content_type)


def demo_compare(client):
    return client.post(
        "/", {"panel": "compare", "images": [upload(photo_bytes("chelsea.jpg"), "cat.jpg")], "texts": "a cat"}
    )


def test_the_demo_pages_no_script_form_counts_against_the_rate_limit_with_the_api(client, settings, clip):
    override(settings, access={"rate_limit": "2/min"})
    assert demo_compare(client).status_code == 200
    assert multipart(client, "/syte_test/embeddings", [("t", "a cat", None)]).status_code == 200
    refused = demo_compare(client)
    assert refused.status_code == 429 and 1 <= int(refused["Retry-After"]) <= 60
    assert "more requests than this server takes from you" in refused.content.decode()
    assert multipart(client, "/syte_test/embeddings", [("t", "a cat", None)]).status_code == 429


MODEL_ENDPOINTS = {
    "embeddings": lambda client: multipart(client, "/syte_test/embeddings", [("t", "a cat", None)]),
    "clip": lambda client: multipart(client, "/syte_test/clip", [("t", "a cat", None)]),
    "wearable": lambda client: multipart(
        client, "/syte_test/wearable", [("image", photo_bytes("chelsea.jpg"), "c.jpg")]
    ),
    "v1": lambda client: client.post("/v1/embeddings", {"input": "a cat"}, content_type="application/json"),
    "demo form": demo_compare,
}


@pytest.mark.parametrize("endpoint", MODEL_ENDPOINTS)
def test_every_endpoint_that_runs_the_model_is_rate_limited(client, settings, clip, endpoint):
    override(settings, access={"rate_limit": "1/min"})
    send = MODEL_ENDPOINTS[endpoint]
    send(client)
    assert send(client).status_code == 429


def test_every_api_view_that_takes_a_post_counts_against_the_rate_limit():
    from django.urls import get_resolver

    def views(patterns):
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                yield from views(pattern.url_patterns)
            elif isinstance(getattr(pattern.callback, "view_class", None), type):
                yield pattern.callback.view_class

    posting = [v for v in views(get_resolver().url_patterns) if issubclass(v, APIView) and hasattr(v, "post")]
    assert len(posting) >= 4  # embeddings, v1, wearable, feedback
    assert all(ClientRateThrottle in v.throttle_classes for v in posting), posting


def test_the_window_slides_and_retry_after_never_passes_the_period():
    store = LocMemCache("sliding", {})
    take = lambda now: ratelimit.take("c", limit=3, period=60, now=now, cache=store)  # noqa: E731
    assert [take(1000.0), take(1001.0), take(1002.0)] == [None, None, None]
    wait = take(1003.0)
    assert wait is not None and 0 < wait <= 60
    assert take(1003.0 + wait - 0.5) is not None  # not before Retry-After
    assert take(1003.0 + wait + 0.01) is None  # the oldest request's slot has left the window
    # A refused request is not counted: the client is not punished for asking.
    store = LocMemCache("refused", {})
    for _ in range(3):
        ratelimit.take("c", limit=3, period=60, now=2000.0, cache=store)
    for _ in range(50):
        ratelimit.take("c", limit=3, period=60, now=2010.0, cache=store)
    assert ratelimit.take("c", limit=3, period=60, now=2060.0, cache=store) is None


def test_a_request_counts_for_at_least_nine_tenths_of_the_period():
    store = LocMemCache("nine-tenths", {})
    assert ratelimit.take("c", limit=1, period=60, now=5999.9, cache=store) is None  # end of a slot
    assert ratelimit.take("c", limit=1, period=60, now=5999.9 + 53.9, cache=store) is not None
    assert ratelimit.take("c", limit=1, period=60, now=5999.9 + 60.0, cache=store) is None
