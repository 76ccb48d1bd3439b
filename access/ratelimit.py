"""Counting requests per client in the shared store (settings.CACHES["throttle"]): CLIP_RATE_LIMIT, and
failed key lookups per address.

Each count is a sliding window of ``SLOTS`` slots: a request is counted in the slot of the moment it came,
and counts against the limit while its slot is one of the last ``SLOTS`` (for 90 to 100% of the period).
A request costs a fixed number of operations on the store, whatever the number of clients or the rate:
an atomic increment of its slot (so concurrent workers never lose a count) and one read of the
window's ten slots (one round trip to Redis). Over the limit, its count is taken back, and the wait
is until enough old slots leave the window: never more than the period.

The store is Redis where CLIP_REDIS_URL says (every replica counts together), else ``LocalCounts``:
SQLite files under CLIP_RATE_LIMIT_DIR that every worker process of the machine shares.
"""

from __future__ import annotations

import logging
import math
import time

from diskcache import DjangoCache

logger = logging.getLogger(__name__)

SLOTS = 10
PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A store that fails (Redis down or silent, a disk that refuses writes) is not asked again for this long:
# meanwhile requests are served without counting, rather than each waiting on it or failing.
STORE_RETRY_S = 5.0
_store_down_until = 0.0


class LocalCounts(DjangoCache):
    """diskcache's Django cache, kept open: Django closes every cache after each request, and reopening
    this one's SQLite files costs 2 ms a request (measured), 20 times what counting does."""

    def close(self, **kwargs) -> None:
        pass


def parse_rate(rate: str) -> tuple[int, int]:
    """``"60/min"`` as (60, 60): requests, and the period in seconds (CLIP_RATE_LIMIT's format)."""
    number, _, period = rate.partition("/")
    return int(number), PERIODS[period[0]]


def _store(cache):
    if cache is not None:
        return cache
    from django.core.cache import caches

    return caches["throttle"]


def _slots(name: str, period: int, now: float) -> tuple[list[str], float, float]:
    """The window's slot keys, oldest first (the last is the current one), a slot's length and the
    current slot's start."""
    length = period / SLOTS
    current = math.floor(now / length)
    return [f"rl:{name}:{current - i}" for i in range(SLOTS - 1, -1, -1)], length, current * length


def _wait(counts: list[int], limit: int, length: float, start: float, now: float) -> float | None:
    """None when one more request fits beside ``counts`` (the window's slots, oldest first); else the
    seconds until the oldest slots have left the window and it does."""
    total = sum(counts)
    if total + 1 <= limit:
        return None
    for age, count in enumerate(counts):  # the oldest slot leaves when the window moves by one slot
        total -= count
        if total + 1 <= limit:
            return start + (age + 1) * length - now
    return start + SLOTS * length - now  # unreachable while limit >= 1


def _ask(operation, default):
    """``operation()`` on the store, or ``default`` while the store is failing (logged once per failure)."""
    global _store_down_until
    if time.monotonic() < _store_down_until:
        return default
    try:
        return operation()
    except Exception as exc:  # noqa: BLE001 - whatever the store raises, the request is served uncounted
        _store_down_until = time.monotonic() + STORE_RETRY_S
        logger.warning(
            "The rate-limit store failed (%s: %s): requests are served uncounted for %.0f s",
            type(exc).__name__,
            exc,
            STORE_RETRY_S,
        )
        return default


def _counts(cache, keys: list[str]) -> list[int]:
    found = cache.get_many(keys)
    return [int(found.get(key) or 0) for key in keys]


def _increment(cache, key: str, period: int) -> None:
    try:
        cache.incr(key)
    except ValueError:  # the slot's first request (or it expired): create it; if another won that race, add
        if not cache.add(key, 1, timeout=period + 2):
            cache.incr(key)


def take(name: str, *, limit: int, period: int, now: float | None = None, cache=None) -> float | None:
    """Count one request of ``name`` against ``limit`` per ``period`` seconds: None when it is allowed,
    else the seconds to wait (and it is not counted)."""
    store = _store(cache)
    now = time.time() if now is None else now
    keys, length, start = _slots(name, period, now)

    def operation():
        _increment(store, keys[-1], period)
        counts = _counts(store, keys)
        if sum(counts) <= limit:
            return None
        store.decr(keys[-1])
        counts[-1] -= 1
        return max(_wait(counts, limit, length, start, now) or 0.0, 0.001)

    return _ask(operation, None)


def over(name: str, *, limit: int, period: int, now: float | None = None, cache=None) -> float | None:
    """Whether one more of ``name``'s counts would pass ``limit`` per ``period``: None when not, else the
    seconds until it would not. Counts nothing (``note`` does)."""
    store = _store(cache)
    now = time.time() if now is None else now
    keys, length, start = _slots(name, period, now)
    wait = _ask(lambda: _wait(_counts(store, keys), limit, length, start, now), None)
    return None if wait is None else max(wait, 0.001)


def note(name: str, *, period: int, now: float | None = None, cache=None) -> None:
    """Count one of ``name``'s events (a failed key lookup), to be read by ``over``."""
    store = _store(cache)
    keys, _, _ = _slots(name, period, time.time() if now is None else now)
    _ask(lambda: _increment(store, keys[-1], period), None)
