"""How gunicorn serves the demo page's assets with DJANGO_DEBUG off: whitenoise, hashed and compressed."""

from __future__ import annotations

import re

import pytest
import requests

pytestmark = pytest.mark.server

ONE_YEAR = 365 * 24 * 3600


def asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:href|src)="(/static/[^"]+)"', html)


def test_page_assets_are_hashed_cached_for_long_and_compressed(demo_server):
    html = requests.get(demo_server.url + "/", timeout=30).text
    assets = asset_urls(html)
    for name in ("demo.css", "demo.js"):
        stem, ext = name.split(".")
        assert any(re.fullmatch(rf"/static/demo/{stem}\.[0-9a-f]{{12}}\.{ext}", url) for url in assets), assets
    for url in assets:
        response = requests.get(demo_server.url + url, headers={"Accept-Encoding": "gzip"}, timeout=30)
        assert response.status_code == 200, url
        max_age = int(re.search(r"max-age=(\d+)", response.headers["Cache-Control"]).group(1))
        assert max_age >= ONE_YEAR and "immutable" in response.headers["Cache-Control"], url
        if url.endswith((".css", ".js")):
            assert response.headers.get("Content-Encoding") == "gzip", url


def test_page_weight_stays_small(demo_server):
    page = requests.get(demo_server.url + "/", timeout=30)
    total = len(page.content) + sum(
        len(requests.get(demo_server.url + url, timeout=30).content) for url in asset_urls(page.text)
    )
    assert total < 60_000, f"the page and its assets weigh {total} bytes"
