"""The process runtime: loading once, and liveness: a dead inference thread or a hung forward makes
/readyz fail, fails every waiting request at once, and has the worker replaced."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from embeddings.runtime.engine import EngineStopped
from embeddings.runtime.prepare import prepare
from embeddings.runtime.state import Runtime, RuntimeNotReady
from tests.conftest import runtime_settings


@pytest.fixture
def loaded(tiny_model_dir):
    settings = runtime_settings(tiny_model_dir)
    prepare(settings)
    rt = Runtime()
    rt.load(settings)
    yield rt
    rt.close()


def test_load_is_idempotent(loaded):
    assert loaded.load(loaded.settings) is loaded.engine()


def test_a_healthy_runtime_has_no_problem(loaded):
    calls = []
    assert loaded.health_problem() is None and loaded.watch_once(calls.append) is True and calls == []


def test_a_dead_inference_thread_fails_readiness_and_replaces_the_worker(loaded):
    engine = loaded.engine()
    with engine._cond:  # the thread leaves its loop as if it had crashed
        engine._stopped = True
        engine._cond.notify_all()
    engine._thread.join(10)
    calls = []
    assert loaded.watch_once(calls.append) is False
    assert calls == ["the inference thread died"] and not loaded.ready and loaded.status == "failed"
    with pytest.raises(RuntimeNotReady):
        loaded.engine()


def test_a_hung_forward_fails_every_waiting_request_at_once(loaded):
    engine = loaded.engine()
    gate, entered = threading.Event(), threading.Event()
    real = engine.backends["text"]

    class Hung:
        name, dtype, device = real.name, real.dtype, real.device

        def text_features(self, ids, mask):
            entered.set()
            gate.wait(30)
            return real.text_features(ids, mask)

        def close(self):
            gate.set()

    engine.backends["text"] = Hung()
    outcome = []

    def call():
        try:
            outcome.append(engine.embed_texts(["a hat"]))
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(10)
    loaded.settings = replace(loaded.settings, forward_timeout_s=0.0)  # any forward in flight is "too long"
    calls = []
    assert loaded.watch_once(calls.append) is False
    thread.join(10)  # answered while the forward is still stuck
    assert not thread.is_alive() and isinstance(outcome[0], EngineStopped)
    assert "CLIP_FORWARD_TIMEOUT" in calls[0] and not loaded.ready
    gate.set()
    engine.backends["text"] = real


def test_an_aborted_engine_answers_503_through_the_api(client, clip, monkeypatch):
    def stopped(**kwargs):
        raise EngineStopped("a forward hung")

    monkeypatch.setattr(clip, "embed", stopped)
    response = client.post("/syte_test/embeddings", data={"t": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    assert response["Retry-After"]


def test_a_request_past_its_deadline_is_504_timeout_with_retry_after(client, clip, monkeypatch):
    from embeddings.runtime.engine import DeadlineExceeded

    def late(**kwargs):
        raise DeadlineExceeded("no answer within 60 s")

    monkeypatch.setattr(clip, "embed", late)
    response = client.post("/syte_test/embeddings", data={"t": "x"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert response["Retry-After"]


def test_the_default_queue_limit_is_reachable_with_the_default_threads_and_parts():
    from pathlib import Path

    from clipsite.config import load

    config, _ = load({}, base_dir=Path("/srv"))
    assert config.server.threads * config.limits.max_parts >= config.runtime.max_queue
