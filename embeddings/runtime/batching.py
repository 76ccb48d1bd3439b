"""Batching across requests: one inference thread owns the model; request threads queue items.

Request threads decode and preprocess their own inputs (in parallel with inference), put one item per
image or text on a bounded queue and wait. The inference thread takes the oldest kind waiting,
gathers up to ``max_batch`` items of that kind (waiting at most ``max_wait_ms`` for more while the
batch is not full and more are on the way), runs one forward and hands each request its rows.
Nothing else in the project batches.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More items are waiting than the queue holds: the caller should answer 503 and not pile up."""


@dataclass
class _Item:
    payload: object
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Owns one inference thread; ``run(kind, payloads)`` blocks until those rows are computed."""

    def __init__(
        self,
        forwards: dict[str, Callable[[list], np.ndarray]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        name: str = "clip-inference",
        switch_interval: float | None = None,
    ):
        self._forwards = forwards
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queues: dict[str, deque[_Item]] = {kind: deque() for kind in forwards}
        self._cond = threading.Condition()
        self._queued = 0
        self._stopped = False
        self.batches_run = 0
        self.items_run = 0
        if switch_interval:
            # The inference thread gives the GIL back at every torch op; with many request threads
            # around, Python's default 5 ms switch interval makes it wait that long to get it again.
            sys.setswitchinterval(min(sys.getswitchinterval(), switch_interval))
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, kind: str, payloads: Sequence) -> np.ndarray:
        """Queue ``payloads`` (one row each) and wait for their rows, in order."""
        if not payloads:
            raise ValueError("nothing to run")
        items = [_Item(p) for p in payloads]
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            if self._queued + len(items) > self.max_queue:
                raise QueueFull(f"{self._queued} items already waiting")
            self._queues[kind].extend(items)
            self._queued += len(items)
            self._cond.notify_all()
        return np.stack([item.future.result() for item in items])

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- the inference thread -----------------------------------------------------------------
    def _oldest_kind(self) -> str | None:
        waiting = [(q[0].queued_at, kind) for kind, q in self._queues.items() if q]
        return min(waiting)[1] if waiting else None

    def _take(self, kind: str, batch: list[_Item]) -> None:
        queue = self._queues[kind]
        while queue and len(batch) < self.max_batch:
            batch.append(queue.popleft())
            self._queued -= 1

    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        with self._cond:
            while not self._stopped and self._queued == 0:
                self._cond.wait()
            if self._stopped:
                return None
            kind = self._oldest_kind()
            batch: list[_Item] = []
            self._take(kind, batch)
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                self._take(kind, batch)
            return kind, batch

    def _loop(self) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            kind, batch = taken
            self._forward(kind, batch)

    def _forward(self, kind: str, batch: list[_Item]) -> None:
        forward = self._forwards[kind]
        try:
            rows = forward([item.payload for item in batch])
        except Exception:  # noqa: BLE001 - find the item at fault: a bad item fails only its own request
            if len(batch) == 1:
                logger.exception("Inference failed for one %s item", kind)
                batch[0].future.set_exception(RuntimeError("inference failed"))
                return
            for item in batch:
                self._forward(kind, [item])
            return
        self.batches_run += 1
        self.items_run += len(batch)
        for item, row in zip(batch, rows, strict=True):
            item.future.set_result(row)
