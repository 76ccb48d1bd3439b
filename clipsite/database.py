"""Whether this process reaches the database, as /readyz reports it: probed in the background, every
``PROBE_EVERY_S`` at most, so that a probe never waits on a database that does not answer.

/readyz stays 200 while the database is down (README "Health"): the replica still serves embeddings, the
wearable from the category vectors it holds and keys from their last verdicts, and failing readiness on
a database every replica shares would take them all out of the load balancer at once, turning a
database outage into a whole-service one. Its body says what the last probe found.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import connection

logger = logging.getLogger(__name__)

PROBE_EVERY_S = 10.0


class DatabaseProbe:
    def __init__(self, every_s: float = PROBE_EVERY_S):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._state = "unknown"  # before the first probe ends
        self._probed_at: float | None = None
        self._probing = False

    def state(self) -> str:
        """``ok``, ``unavailable`` or ``unknown`` (not probed yet): the last probe's answer, at once. A
        new probe starts, on a thread of its own, when the last one is older than ``every_s``."""
        with self._lock:
            due = not self._probing and (self._probed_at is None or time.monotonic() - self._probed_at >= self.every_s)
            self._probing = self._probing or due
            state = self._state
        if due:
            threading.Thread(target=self._probe, name="clip-database-probe", daemon=True).start()
        return state

    def _probe(self) -> None:
        try:
            with connection.cursor() as cursor:  # connecting included: within connect_timeout, or the deadline
                cursor.execute("SELECT 1")
            state, reason = "ok", None
        except Exception as exc:  # noqa: BLE001 - whatever fails, the database is not serving this process
            state, reason = "unavailable", exc
        finally:
            connection.close()  # this thread's own connection: it is not kept for the next probe
        with self._lock:
            changed, self._state = state != self._state, state
            self._probed_at, self._probing = time.monotonic(), False
        if changed and reason is not None:
            logger.warning("Database probe: unavailable (%s)", reason)
        elif changed:
            logger.info("Database probe: ok")


probe = DatabaseProbe()
