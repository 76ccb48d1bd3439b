"""A worker's memory budget (embeddings/memory.py): decodes and bodies admitted before the work, a
body let go with its answer, and a /v1 text refused before it is parsed."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
from PIL import Image

from embeddings import memory, multipart
from embeddings.images import decode_image
from tests.conftest import image_bytes, multipart_body, override

URL = "/syte_test/embeddings"


@pytest.fixture
def budget_mb(settings):
    """Set the worker's budget for one test (a fresh budget object for the new size)."""

    def set_budget(mb: int) -> memory.MemoryBudget:
        override(settings, limits={"worker_memory_bytes": mb * 2**20})
        memory.reset_budget()
        return memory.budget()

    yield set_budget
    memory.reset_budget()


def palette_png(side: int) -> bytes:
    """A few kB that decode to side x side pixels, transparency and all."""
    im = Image.new("P", (side, side))
    im.putpalette([i % 256 for i in range(768)])
    return image_bytes(im, "PNG", transparency=0)


def test_a_decode_holds_its_bytes_from_the_header_until_the_request_decodes_another_or_ends(budget_mb):
    pool = budget_mb(64)
    with memory.request_memory():
        decode_image(palette_png(2000), max_pixels=10**8)
        held = pool.used
        assert held == memory.decode_bytes("P", 2000, 2000, turns=False)
        decode_image(palette_png(100), max_pixels=10**8)  # the next image's hold replaces the first's
        assert pool.used == memory.decode_bytes("P", 100, 100, turns=False) < held
    assert pool.used == 0


def test_a_decode_that_does_not_fit_now_is_503_and_one_that_never_fits_is_413(budget_mb):
    from embeddings.errors import ImageTooLarge, Overloaded

    pool = budget_mb(64)
    data = palette_png(3000)  # about 61 MB to decode: fits alone
    assert pool.try_reserve(32 * 2**20)  # another request holds half the budget
    with memory.request_memory(), pytest.raises(Overloaded) as busy:
        decode_image(data, key="img", max_pixels=10**8)
    assert busy.value.status_code == 503 and busy.value.retry_after
    pool.release(32 * 2**20)
    with memory.request_memory():
        assert decode_image(data, max_pixels=10**8).image.size == (3000, 3000)
    with memory.request_memory(), pytest.raises(ImageTooLarge):  # more than the whole budget
        decode_image(palette_png(4500), key="img", max_pixels=10**8)
    assert pool.used == 0


def test_a_request_over_the_budget_gets_503_overloaded_with_retry_after(client, clip, budget_mb):
    pool = budget_mb(64)
    assert pool.try_reserve(60 * 2**20)  # the rest of the worker is busy decoding
    try:
        body, content_type = multipart_body([("img", palette_png(2000), "a.png")])
        response = client.generic("POST", URL, body, content_type=content_type)
        assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
        assert int(response["Retry-After"]) >= 1
    finally:
        pool.release(60 * 2**20)
    response = client.generic("POST", URL, body, content_type=content_type)
    assert response.status_code == 200 and pool.used == 0


def test_the_request_body_is_let_go_with_its_answer_without_a_garbage_collection(client, clip, monkeypatch):
    forms = []
    read = multipart.read_form

    def remembered(stream, content_type):
        form = read(stream, content_type)
        forms.append(weakref.ref(form))
        return form

    monkeypatch.setattr(multipart, "read_form", remembered)
    body, content_type = multipart_body(
        [("t", "a photo of a cat", None), ("i", image_bytes(Image.new("RGB", (64, 64)), "PNG"), "a.png")]
    )
    gc.collect()
    gc.disable()  # only reference counting frees it now: no cycle may hold it
    try:
        response = client.generic("POST", URL, body, content_type=content_type)
        assert response.status_code == 200
        assert forms and forms[0]() is None
    finally:
        gc.enable()


def test_a_huge_v1_text_is_refused_from_the_raw_bytes_before_parsing(client, clip, monkeypatch):
    import orjson

    from embeddings import parsers

    parsed = []
    monkeypatch.setattr(parsers.orjson, "loads", lambda body: parsed.append(len(body)) or orjson.loads(body))
    body = json.dumps({"input": ["a cat", "x" * (3 * 2**20) + "🙂"]}).encode()
    response = client.generic("POST", "/v1/embeddings", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "text_too_long"
    assert parsed == []  # refused before orjson made a 12 MB string of it


def test_a_v1_text_just_over_the_character_limit_is_refused_before_its_utf8_copy(client, clip, settings):
    override(settings, limits={"max_text_chars": 10})
    body = json.dumps({"input": ["🙂" * 11]}).encode()
    response = client.generic("POST", "/v1/embeddings", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "text_too_long"


def test_a_v1_image_data_url_over_the_file_limit_is_refused_before_parsing(client, clip, settings):
    override(settings, limits={"max_file_bytes": 1 << 20})
    body = json.dumps({"input": ["data:image/png;base64," + "A" * (2 << 20)]}).encode()
    response = client.generic("POST", "/v1/embeddings", body, content_type="application/json")
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"


_HEAP_SCRIPT = """
import time

import django
import numpy as np

django.setup()
from embeddings.memory import MemoryBudget


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


pool = MemoryBudget(512 << 20)
# glibc maps a large block on its own only until one is freed: the threshold then rises to it, and
# the blocks of a few MB that follow (decoded images, bodies) come from the heap, which keeps them.
del bytearray(30 << 20)[:]
blocks, pins = [], []
for _ in range(64):  # 256 MB, each block with a small one above it that stays: holes, not a free top
    blocks.append(np.ones(4 << 20, dtype=np.uint8))
    pins.append(np.ones(64 << 10, dtype=np.uint8))
del blocks
before = rss_mb()
assert pool.try_reserve(256 << 20)
pool.release(256 << 20)
deadline = time.monotonic() + 30
while pool.trimmer.trims == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
print(before, rss_mb(), pool.trimmer.trims)
"""


@pytest.mark.skipif(memory._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_the_heap_a_large_release_leaves_is_given_back_to_the_system():
    import os
    import subprocess
    import sys

    # A fresh interpreter: the heap of one that ran other tests is in any state.
    done = subprocess.run(
        [sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr
    before, after, trims = (float(x) for x in done.stdout.split()[-3:])
    assert trims >= 1
    assert after < before - 128, (before, after)


def test_small_releases_do_not_trim(budget_mb):
    pool = budget_mb(512)
    trims = pool.trimmer.trims
    for _ in range(100):
        assert pool.try_reserve(64 << 10)
        pool.release(64 << 10)  # 6.4 MB in all, under the 32 MB that wakes the trim
    assert pool.trimmer._released == 100 * (64 << 10) or pool.trimmer._trim is None
    assert pool.trimmer.trims == trims
