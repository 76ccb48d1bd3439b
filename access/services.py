"""Creating, revoking and checking API keys. A key is shown once, at creation; only its hash is kept.

Keys are 256 random bits, so one SHA-256 (no slow password hash) makes them unguessable from the table.
Checking a key costs one indexed query, remembered per process for ``CHECK_TTL_S`` so the embeddings
endpoint stays off the database under load: a revoked key is refused within that time by every worker.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from django.utils import timezone

from access.models import ApiKey

KEY_PREFIX = "clip_"
CHECK_TTL_S = 10.0


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
    _checked.clear()


_checked: dict[str, tuple[float, ApiClient | None]] = {}
_lock = threading.Lock()


def api_key_check(*, raw: str) -> ApiClient | None:
    """The client a presented key belongs to, or None for an unknown or revoked key."""
    digest = digest_of(raw)
    now = time.monotonic()
    with _lock:
        cached = _checked.get(digest)
    if cached is not None and cached[0] > now:
        return cached[1]
    row = ApiKey.objects.filter(digest=digest, revoked_at__isnull=True).values_list("id", "name").first()
    client = ApiClient(key_id=row[0], name=row[1]) if row else None
    with _lock:
        if len(_checked) > 10_000:  # bounded: random keys must not grow it without end
            _checked.clear()
        _checked[digest] = (now + CHECK_TTL_S, client)
    return client
