"""Sharing the cores between worker processes: the busy map, and the backends that read it."""

from __future__ import annotations

import pytest

from embeddings.runtime import coordination
from embeddings.runtime.backends.torch import TorchBackend


@pytest.fixture
def shared(monkeypatch):
    """A shared block as gunicorn's master makes it, this process in slot 1."""
    monkeypatch.setattr(coordination, "_shared", None)
    coordination.create_shared()
    coordination.set_slot(1)
    yield coordination._shared
    monkeypatch.setattr(coordination, "_shared", None)
    coordination.set_slot(0)


def test_alone_without_a_shared_block():
    assert coordination._shared is None and not coordination.others_busy()


def test_other_workers_busy_or_idle(shared):
    assert not coordination.others_busy()
    with coordination.busy():
        assert shared[1] == 1 and not coordination.others_busy()  # only itself
    shared[2] = 1
    assert coordination.others_busy()
    coordination.clear_slot(2)  # the master, when worker 2 exits mid-forward
    assert not coordination.others_busy() and shared[1] == 0


def test_the_engine_marks_every_forward_busy(shared, clip):
    seen = []
    backend = clip.backends["text"]
    original = backend.text_features

    def spy(ids, mask):
        seen.append(shared[1])
        return original(ids, mask)

    backend.text_features = spy
    try:
        clip.embed_texts(["a cat"])
    finally:
        del backend.text_features
    assert seen == [1] and shared[1] == 0


def test_torch_uses_every_core_for_images_only_while_the_others_are_idle(shared, tiny_model_dir):
    from embeddings.runtime.loading import load_model, resolve_model_source

    backend = TorchBackend(
        load_model(resolve_model_source(str(tiny_model_dir), tiny_model_dir)), threads={"image": 4, "text": 1}
    )
    assert backend.threads_for("image") == 4 and backend.threads_for("text") == 1
    shared[3] = 1
    assert backend.threads_for("image") == 1 and backend.threads_for("text") == 1


# --- readiness: no worker answers 503 while a sibling could serve ------------------------------------
def test_each_worker_state_counts_for_its_siblings_and_leaves_with_it(shared):
    assert coordination.siblings() == {"ready": 0, "loading": 0}
    coordination.mark_accepting()  # this worker (slot 1) takes connections while loading
    shared[coordination.SLOTS + 2] = coordination.READY
    shared[coordination.SLOTS + 3] = coordination.LOADING
    assert coordination.siblings() == {"ready": 1, "loading": 1}  # never itself
    coordination.clear_slot(3)  # the master, when worker 3 exits
    assert coordination.siblings() == {"ready": 1, "loading": 0}
    coordination.mark_ready()
    coordination.mark_accepting()  # the model was ready before the worker took connections: stays ready
    assert shared[coordination.SLOTS + 1] == coordination.READY
    coordination.mark_leaving()
    assert shared[coordination.SLOTS + 1] == coordination.ABSENT


def test_the_first_workers_take_connections_at_once_so_the_probes_answer(shared):
    shared[coordination.SLOTS + 2] = coordination.LOADING  # a sibling loading too: nobody serves yet
    assert coordination.wait_for_siblings(lambda: False, lambda: pytest.fail("must not wait")) is False


def test_a_replacement_waits_for_its_model_while_a_sibling_serves(shared):
    shared[coordination.SLOTS + 2] = coordination.READY
    looks = []

    def loaded() -> bool:
        looks.append(1)
        return len(looks) > 3

    beats = []
    assert coordination.wait_for_siblings(loaded, lambda: beats.append(1) or True) is True
    assert len(looks) == 4 and beats  # gunicorn's heartbeat went on while it waited


def test_a_replacement_stops_waiting_when_told_to_or_when_no_sibling_serves(shared):
    shared[coordination.SLOTS + 2] = coordination.READY
    assert coordination.wait_for_siblings(lambda: False, lambda: False) is True  # SIGTERM: worker.alive false

    def sibling_leaves() -> bool:
        coordination.clear_slot(2)
        return True

    assert coordination.wait_for_siblings(lambda: False, sibling_leaves) is True  # ends: the probes need it


def test_readyz_waits_for_a_sibling_that_takes_connections_while_loading(shared, client, clip):
    shared[coordination.SLOTS + 2] = coordination.READY
    body = client.get("/readyz").json()
    assert body["ready"] is True and body["workers"] == {"ready": 2, "loading": 0}
    shared[coordination.SLOTS + 3] = coordination.LOADING
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert {k: body[k] for k in ("status", "ready", "workers")} == {
        "status": "loading",
        "ready": False,
        "workers": {"ready": 2, "loading": 1},
    }
    coordination.clear_slot(3)
    assert client.get("/readyz").status_code == 200


def test_a_replacement_gets_a_slot_no_live_sibling_holds():
    assert coordination.free_slot(set(), fallback=7) == 0
    assert coordination.free_slot({0, 2}, fallback=70) == 1  # worker 1 died: its replacement (age 65) takes 1
    assert coordination.free_slot(set(range(coordination.SLOTS)), fallback=70) == 70 % coordination.SLOTS
