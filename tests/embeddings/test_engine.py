"""The engine: batching across requests, images and texts queued together, admission, deadlines,
failures that stay with their own request, and closing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from embeddings.runtime.engine import (
    DeadlineExceeded,
    Engine,
    EngineSettings,
    EngineStopped,
    InferenceFailed,
    QueueFull,
)
from tests.conftest import assert_same_vectors, gradient_image

TEXTS = ["a cat", "a photo of a very small dog sitting on a red sofa in the evening", "x", "two words"]


class GatedBackend:
    """The real model's backend behind a gate the test opens, so the queue's states can be reached
    without timing. Records each batch; fails on any text holding the token ``poison``."""

    def __init__(self, real, *, poison: int | None = None):
        self.real, self.poison = real, poison
        self.name, self.dtype, self.device = real.name, real.dtype, real.device
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[tuple[str, int]] = []

    def _wait(self) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"

    def image_features(self, pixels):
        self._wait()
        self.batches.append(("image", len(pixels)))
        return self.real.image_features(pixels)

    def text_features(self, ids, mask):
        self._wait()
        if self.poison is not None and np.any(ids == self.poison):
            raise ValueError("this input breaks the model")
        self.batches.append(("text", len(ids)))
        return self.real.text_features(ids, mask)

    def close(self):
        self.gate.set()  # the real backend stays open: it belongs to the process runtime


@pytest.fixture
def gated(clip):
    """Make an engine over the tiny model's real backend, gated; closed after the test."""
    engines = []

    def make(*, poison: bool = False, **settings) -> tuple[Engine, GatedBackend]:
        token = clip.preprocessing.tokenize(["poison"])[0].ids[1] if poison else None
        backend = GatedBackend(clip.backends["text"], poison=token)
        engine = Engine(
            backends={"image": backend, "text": backend},
            preprocessing=clip.preprocessing,
            info=clip.info,
            settings=EngineSettings(**({"max_wait_ms": 0} | settings)),
        )
        engines.append(engine)
        return engine, backend

    yield make
    for engine in engines:
        engine.close()


def in_threads(calls) -> list:
    """Run each call in its own thread; return what each returned or raised, in order."""
    out: list = [None] * len(calls)

    def run(i, call):
        try:
            out[i] = call()
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, out


def join(threads):
    for t in threads:
        t.join(30)
        assert not t.is_alive()


# --- with the real model ---------------------------------------------------------------------------
def test_a_text_batch_padded_to_its_longest_equals_each_text_alone(clip):
    together = clip.embed_texts(TEXTS)
    alone = np.concatenate([clip.embed_texts([t]) for t in TEXTS])
    assert_same_vectors(together, alone)


def test_an_image_batch_equals_each_image_alone(clip):
    images = [gradient_image(300 + 10 * i, 200 + 7 * i, seed=i) for i in range(5)]
    assert_same_vectors(clip.embed_images(images), np.concatenate([clip.embed_images([im]) for im in images]))


def test_images_and_texts_of_one_request_come_back_in_their_order(clip):
    images = [gradient_image(320, 240, seed=i) for i in range(3)]
    out = clip.embed(images=images, texts=TEXTS)
    assert out.images.shape == (3, clip.dim) and out.texts.shape == (4, clip.dim)
    assert_same_vectors(out.images, clip.embed_images(images))
    assert_same_vectors(out.texts, clip.embed_texts(TEXTS))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(clip):
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(48)]
    expected = {t: clip.embed_texts([t])[0] for t in texts}
    before_batches, before_items = clip.batches_run["text"], clip.items_run["text"]
    threads, results = in_threads([lambda t=t: clip.embed_texts([t])[0] for t in texts])
    join(threads)
    for text, got in zip(texts, results, strict=True):
        assert_same_vectors(got, expected[text])
    assert clip.items_run["text"] - before_items == len(texts)
    assert clip.batches_run["text"] - before_batches < len(texts)  # some requests shared a forward


# --- the queue's mechanics ---------------------------------------------------------------------------
def wait_until(condition) -> None:
    """Until another thread got somewhere (no sleep decides: the condition does, within 10 s)."""
    for _ in range(10_000):
        if condition():
            return
        threading.Event().wait(0.001)
    raise AssertionError("the condition was never reached")


def test_a_full_queue_refuses_at_once_instead_of_piling_up(gated, clip):
    engine, backend = gated(max_batch=1, max_queue=4)
    threads, results = in_threads(
        [
            lambda: engine.embed(texts=["first"], client="a").texts,
            lambda: engine.embed(texts=["b1", "b2"], client="b").texts,
            lambda: engine.embed(texts=["c1", "c2"], client="c").texts,
        ]
    )
    assert backend.entered.wait(10)
    wait_until(lambda: engine._queued_items == 4)  # one item in the forward, four waiting: full
    with pytest.raises(QueueFull, match="already waiting"):
        engine.embed(texts=["one too many"], client="d")
    backend.gate.set()
    join(threads)
    for got, texts in zip(results, (["first"], ["b1", "b2"], ["c1", "c2"]), strict=True):
        assert_same_vectors(got, clip.embed_texts(texts))


def test_one_client_gets_half_the_queue_and_others_are_served_in_turn(gated):
    engine, backend = gated(max_batch=1, max_queue=8)
    order = []
    real = backend.real.text_features

    def recording(ids, mask):
        order.append(int(ids[0, 1]))  # each text's first word's token tells whose it is
        return real(ids, mask)

    backend.real = type("Recording", (), {"text_features": staticmethod(recording)})()
    cat, dog, first = (engine.preprocessing.tokenize([w])[0].ids[1] for w in ("cat", "dog", "first"))
    calls = [lambda: engine.embed(texts=["first"], client="a")]
    threads, _ = in_threads(calls)
    assert backend.entered.wait(10)  # "first" is in the forward: the queue is empty
    more, results = in_threads([lambda: engine.embed(texts=["cat"] * 4, client="big")])
    wait_until(lambda: engine._queued_items == 4)
    with pytest.raises(QueueFull, match="this client"):  # half of 8: the big client's share is full
        engine.embed(texts=["cat"], client="big")
    small, small_results = in_threads([lambda: engine.embed(texts=["dog"], client="small")])
    wait_until(lambda: engine._queued_items == 5)
    backend.gate.set()
    join(threads + more + small)
    assert not isinstance(small_results[0], Exception) and not isinstance(results[0], Exception)
    assert order[0] == first and order[1] == cat and order[2] == dog  # served in turn, not behind all four
    assert order.count(cat) == 4


def test_image_pixels_waiting_are_bounded_too(gated):
    engine, backend = gated(max_batch=1, max_queue_pixels=2 * 224 * 224)  # two of the model's inputs
    with pytest.raises(QueueFull, match="pixels"):
        engine.embed(images=[gradient_image(seed=i) for i in range(3)])
    backend.gate.set()
    assert engine.embed(images=[gradient_image(seed=i) for i in range(2)]).images.shape == (2, engine.dim)


def test_a_request_past_its_deadline_fails_and_its_queued_work_is_dropped(gated):
    engine, backend = gated(max_batch=1)
    threads, _ = in_threads([lambda: engine.embed_texts(["blocker"])])
    assert backend.entered.wait(10)
    with pytest.raises(DeadlineExceeded):
        engine.embed(texts=["late one", "late two"], timeout=0.05)
    backend.gate.set()
    join(threads)
    assert engine.embed_texts(["after"]).shape == (1, engine.dim)
    assert backend.batches == [("text", 1), ("text", 1)]  # the late request's items never ran


def test_a_bad_item_fails_only_its_own_request_and_the_batch_is_split_in_halves(gated, clip):
    engine, backend = gated(poison=True, max_batch=8, max_wait_ms=5000)
    texts = ["ok", "a poison text", "fine", "four", "six", "seven", "eight", "nine"]
    threads, results = in_threads([lambda t=t: engine.embed_texts([t]) for t in texts])
    assert backend.entered.wait(10)  # the first batch is formed (up to 8, waiting up to 5 s for them)
    backend.gate.set()
    join(threads)
    assert isinstance(results[1], InferenceFailed)
    for text, got in zip(texts, results, strict=True):
        if text != texts[1]:
            assert_same_vectors(got, clip.embed_texts([text]))
    assert sum(n for _, n in backend.batches) == 7 and len(backend.batches) < 7  # not re-run one by one


def test_images_and_texts_of_a_request_are_queued_together(gated, clip):
    engine, backend = gated(max_batch=8)
    image = gradient_image(seed=7)
    threads, results = in_threads([lambda: engine.embed(images=[image], texts=["abc", "de"])])
    assert backend.entered.wait(10)  # the image's forward started, and the texts were queued with it
    assert engine._queued_items == 2
    backend.gate.set()
    join(threads)
    assert sorted(backend.batches) == [("image", 1), ("text", 2)]
    assert_same_vectors(results[0].images, clip.embed_images([image]))
    assert_same_vectors(results[0].texts, clip.embed_texts(["abc", "de"]))


def test_closing_fails_the_waiting_requests_instead_of_leaving_them_hanging(gated):
    engine, backend = gated(max_batch=1)
    threads, results = in_threads([lambda: engine.embed_texts(["running"]), lambda: engine.embed_texts(["queued"])])
    assert backend.entered.wait(10)
    wait_until(lambda: engine._queued_items == 1)
    closer = threading.Thread(target=engine.close)
    closer.start()
    wait_until(lambda: engine._stopped)
    backend.gate.set()  # the forward in flight finishes; the queued request is failed, not left waiting
    join(threads + [closer])
    assert results[0].shape == (1, engine.dim) and isinstance(results[1], EngineStopped)
    assert not engine.running
    with pytest.raises(EngineStopped):
        engine.embed_texts(["after close"])


def test_a_lone_client_never_waits_for_company_but_a_crowd_is_batched(gated):
    """The batch wait applies only after a batch of many: one client alone pays no max_wait_ms."""
    engine, backend = gated(max_batch=8, max_wait_ms=60_000)
    backend.gate.set()
    started = time.monotonic()
    for text in ("one", "two", "three"):
        engine.embed_texts([text, text + "!"])  # each would wait a minute if the engine always waited
    assert time.monotonic() - started < 30 and backend.batches == [("text", 2)] * 3
    backend.gate.clear()
    backend.entered.clear()
    first, _ = in_threads([lambda: engine.embed_texts(["a"])])
    assert backend.entered.wait(10)  # its forward runs while the others queue behind it
    crowd, _ = in_threads([lambda t=t: engine.embed_texts([t]) for t in ("b", "c", "d")])
    wait_until(lambda: engine._queued_items == 3)
    backend.gate.set()
    join(first + crowd)
    assert backend.batches[3:] == [("text", 1), ("text", 3)]  # the crowd's items in one forward
