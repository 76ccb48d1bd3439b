"""Sharing the cores between worker processes: each worker marks when it is running a forward.

gunicorn's master creates a small shared memory block before it forks the workers (see
clipsite/gunicorn.conf.py); each worker owns one byte of it. The engine marks every forward, whatever
its backend (``busy``). A backend that can choose its threads per call (PyTorch) asks ``others_busy``:
alone, its image forward may use every core (a lightly loaded server: lowest latency); while others
are busy it keeps to its share (a loaded server: no oversubscription, best throughput). ONNX Runtime
fixes a session's threads when it is made, so its image session keeps every core and lets idle threads
sleep instead (measured: `python manage.py bench`). Without the block (tests, a single process) a
worker is always alone.
"""

from __future__ import annotations

import contextlib
import mmap

SLOTS = 64
_shared: mmap.mmap | None = None
_slot = 0


def create_shared() -> None:
    """In gunicorn's master, before forking: an anonymous shared block the workers inherit."""
    global _shared
    if _shared is None:
        _shared = mmap.mmap(-1, SLOTS)


def set_slot(worker_age: int) -> None:
    """In each worker after the fork: its own byte (gunicorn numbers workers by age)."""
    global _slot
    _slot = worker_age % SLOTS


def clear_slot(worker_age: int) -> None:
    """In the master when a worker exits: a worker killed mid-forward must not stay 'busy'."""
    if _shared is not None:
        _shared[worker_age % SLOTS] = 0


def others_busy() -> bool:
    if _shared is None:
        return False
    own = _shared[_slot]
    return any(_shared[:]) if not own else sum(_shared[:]) > own


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
