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
