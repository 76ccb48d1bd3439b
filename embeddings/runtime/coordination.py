"""Sharing the cores between worker processes: each worker marks when it is running a forward.

gunicorn's master creates a small shared memory block before it forks the workers (see
clipsite/gunicorn.conf.py); each worker owns one byte of it. The engine marks every forward, whatever
its backend (``busy``). A backend that can choose its threads per call (PyTorch) asks ``others_busy``:
alone, its image forward may use every core (a lightly loaded server: lowest latency); while others
are busy it keeps to its share (a loaded server: no oversubscription, best throughput). ONNX Runtime
fixes a session's threads when it is made, so its image session keeps every core and lets idle threads
sleep instead (measured: `python manage.py bench`). Without the block (tests, a single process) a
worker is always alone.

The block's second half holds each worker's readiness, so that no worker answers 503 while a
sibling could have served: a worker started while a sibling serves (a replacement) takes no
connection until its model is loaded (``wait_for_siblings``), and the process is ready (``/readyz``)
only once no worker that takes connections is still loading (``siblings``).
"""

from __future__ import annotations

import contextlib
import mmap
import threading

SLOTS = 64
# A worker's state, at byte SLOTS + its slot: none yet (or gone), taking connections while its model
# still loads, ready.
ABSENT, LOADING, READY = 0, 1, 2
_shared: mmap.mmap | None = None
_slot = 0
_state_lock = threading.Lock()  # the loading thread and the worker's main thread both write the state


def create_shared() -> None:
    """In gunicorn's master, before forking: an anonymous shared block the workers inherit."""
    global _shared
    if _shared is None:
        _shared = mmap.mmap(-1, 2 * SLOTS)


def free_slot(taken: set[int], fallback: int) -> int:
    """In the master, before forking a worker: the lowest slot no live worker holds. (gunicorn's ages
    only grow: age modulo SLOTS would hand a replacement the slot of a live sibling.)"""
    return min(set(range(SLOTS)) - taken, default=fallback % SLOTS)


def set_slot(slot: int) -> None:
    """In each worker after the fork: its own byte."""
    global _slot
    _slot = slot % SLOTS


def clear_slot(slot: int) -> None:
    """In the master when a worker exits: a worker killed mid-forward must not stay 'busy'."""
    if _shared is not None:
        _shared[slot % SLOTS] = 0
        _shared[SLOTS + slot % SLOTS] = ABSENT


def others_busy() -> bool:
    if _shared is None:
        return False
    busy = _shared[:SLOTS]
    own = busy[_slot]
    return any(busy) if not own else sum(busy) > own


# --- readiness -------------------------------------------------------------------------------------
def mark_ready() -> None:
    """This worker's model is loaded."""
    if _shared is not None:
        with _state_lock:
            _shared[SLOTS + _slot] = READY


def mark_accepting() -> None:
    """This worker now takes connections: still loading, unless its model is ready already."""
    if _shared is not None:
        with _state_lock:
            if _shared[SLOTS + _slot] != READY:
                _shared[SLOTS + _slot] = LOADING


def mark_leaving() -> None:
    """This worker drains or failed: it serves no more, and no sibling waits for it."""
    if _shared is not None:
        with _state_lock:
            _shared[SLOTS + _slot] = ABSENT


def siblings() -> dict[str, int] | None:
    """How many other workers are ready, and how many take connections while still loading (None alone)."""
    if _shared is None:
        return None
    states = [s for i, s in enumerate(_shared[SLOTS:]) if i != _slot]
    return {"ready": states.count(READY), "loading": states.count(LOADING)}


def wait_for_siblings(loaded, keep_waiting) -> bool:
    """Before a worker takes its first connection: while a sibling serves, wait until ``loaded()``.

    A replacement worker (after a crash, a recycle or a watchdog exit) would otherwise answer 503 to
    every request the kernel hands it while it loads. The first workers of a server take connections
    at once, so that /healthz and /readyz answer while they load. ``keep_waiting()`` is called about
    every 0.2 s (the caller beats gunicorn's heartbeat there) and stops the wait when false.
    Returns whether it waited.
    """
    others = siblings()
    if not others or not others["ready"] or loaded():
        return False
    pause = threading.Event()
    while not loaded() and keep_waiting() and siblings()["ready"]:  # all siblings gone: answer probes
        pause.wait(0.2)
    return True


def mark_busy(busy: bool) -> None:
    if _shared is not None:
        _shared[_slot] = 1 if busy else 0


@contextlib.contextmanager
def busy():
    """Mark this worker busy for the duration of one forward."""
    mark_busy(True)
    try:
        yield
    finally:
        mark_busy(False)
