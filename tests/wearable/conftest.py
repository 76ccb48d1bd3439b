"""Fixtures of the wearable tests: every test starts with an empty in-process cache of category vectors."""

from __future__ import annotations

import io

import pytest

from wearable.services import category_cache

WEARABLE = "/syte_test/wearable"
FEEDBACK = "/syte_test/feedback"


@pytest.fixture(autouse=True)
def cold_category_cache():
    # The database is rolled back after each test; the process's memory must not outlive it.
    category_cache.clear()
    yield
    category_cache.clear()


def upload(data: bytes, name: str = "photo.jpg"):
    f = io.BytesIO(data)
    f.name = name
    return f


def post_wearable(client, data: bytes, *, query: str = "", key: str = "image", **extra):
    return client.post(WEARABLE + query, data={key: upload(data)}, **extra)
