"""Creating, revoking and checking API keys. A key is shown once, at creation; only its hash is kept.

Keys are 256 random bits, so one SHA-256 (no slow password hash) makes them unguessable from the table.
Checking a key costs one indexed query, remembered per process for ``CHECK_TTL_S`` so the embeddings
endpoint stays off the database under load: a revoked key is refused within that time by every worker.
The verdicts are kept in a bounded LRU; an expired one still answers while the database is unreachable
(stale-if-error). Lookups that find no key count against the client's address: past
``FAILED_LOOKUPS_PER_MINUTE`` a key this process has never seen valid is refused before any query.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from django.db import DatabaseError, InterfaceError
from django.utils import timezone

from access import ratelimit
from access.models import ApiKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "clip_"
CHECK_TTL_S = 10.0
VERDICTS_KEPT = 10_000  # digests remembered per process: random keys evict the least recently used
# Guessing a key is hopeless (256 bits); this keeps a client that sends random keys off the database.
FAILED_LOOKUPS_PER_MINUTE = 30


@dataclass(frozen=True)
class ApiClient:
    """Who a valid key says is calling (DRF's ``request.user`` for key-authenticated requests)."""

    key_id: int
    name: str
    is_authenticated: bool = True
    is_staff: bool = False


def digest_of(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def api_key_create(*, name: str) -> tuple[ApiKey, str]:
    """A new key named ``name``: the stored row, and the key itself (shown once, never stored)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(name=name.strip(), prefix=raw[: len(KEY_PREFIX) + 6], digest=digest_of(raw))
    return key, raw


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    # Refused at once in this process (the others within CHECK_TTL_S), and so even while the database fails.
    _verdicts.put(key.digest, _Verdict(time.monotonic() + CHECK_TTL_S, None))


class TooManyFailedLookups(Exception):
    """The client's address looked up too many keys that do not exist: retry after ``wait`` seconds."""

    def __init__(self, wait: float):
        super().__init__(f"too many failed key lookups: retry in {wait:.0f} s")
        self.wait = wait


@dataclass(frozen=True)
class _Verdict:
    expires: float  # time.monotonic() past which the database is asked again
    client: ApiClient | None


class Verdicts:
    """The last verdict on each recently presented key's digest, least recently used evicted first."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, _Verdict] = OrderedDict()

    def get(self, digest: str) -> _Verdict | None:
        with self._lock:
            verdict = self._items.get(digest)
            if verdict is not None:
                self._items.move_to_end(digest)
            return verdict

    def put(self, digest: str, verdict: _Verdict) -> None:
        with self._lock:
            self._items[digest] = verdict
            self._items.move_to_end(digest)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_verdicts = Verdicts(VERDICTS_KEPT)
_serving_stale = False  # logged once per outage


def api_key_check(*, raw: str, address: str | None = None) -> ApiClient | None:
    """The client a presented key belongs to, or None for an unknown or revoked key.

    ``address`` (the client's, access/identity.py) is what failed lookups count against; past the limit a
    key this process has not seen valid raises TooManyFailedLookups before any query. When the database
    fails, the key's last verdict answers however old it is; without one, the error is raised.
    """
    global _serving_stale
    digest = digest_of(raw)
    now = time.monotonic()
    known = _verdicts.get(digest)
    if known is not None and known.expires > now:
        return known.client
    failures = f"keyfail-{address}"
    if address is not None and (known is None or known.client is None):
        wait = ratelimit.over(failures, limit=FAILED_LOOKUPS_PER_MINUTE, period=60)
        if wait is not None:
            raise TooManyFailedLookups(wait)
    try:
        row = ApiKey.objects.filter(digest=digest, revoked_at__isnull=True).values_list("id", "name").first()
    except (DatabaseError, InterfaceError) as exc:
        if known is None:
            raise
        if not _serving_stale:
            _serving_stale = True
            logger.warning("The database failed; API keys are checked against their last verdicts: %s", exc)
        return known.client
    _serving_stale = False
    client = ApiClient(key_id=row[0], name=row[1]) if row else None
    if client is None and address is not None:
        ratelimit.note(failures, period=60)
    _verdicts.put(digest, _Verdict(now + CHECK_TTL_S, client))
    return client
