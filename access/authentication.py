"""DRF authentication, permission and throttle of the API: keys, staff on the demo page, rate limits."""

from __future__ import annotations

from django.core import signing
from django.db import DatabaseError
from rest_framework import authentication, exceptions, permissions, throttling

from access import ratelimit
from access.identity import address_identity, client_identity
from access.services import KEY_PREFIX, TooManyFailedLookups, api_key_check
from clipsite.config import current
from embeddings import errors

DEMO_TOKEN_SALT = "clipsite.demo-page"
DEMO_TOKEN_MAX_AGE_S = 12 * 3600


def presented_key(request) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    value = request.META.get("HTTP_X_API_KEY", "").strip()
    return value or None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """A request with a key is authenticated by it; a wrong or revoked key is a 401 whatever the setting,
    and an address that has sent too many of them a 429 before its next new key is looked up."""

    def authenticate(self, request):
        raw = presented_key(request)
        if raw is None:
            return None
        try:
            client = api_key_check(raw=raw, address=address_identity(request))
        except TooManyFailedLookups as exc:
            message = "Too many API keys sent from this address were not valid."
            raise exceptions.Throttled(wait=exc.wait, detail=message) from None
        if client is None:
            raise exceptions.AuthenticationFailed("The API key is not valid (unknown or revoked).")
        return client, client

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="clipsite"'


class OpenAiKeyAuthentication(ApiKeyAuthentication):
    """The OpenAI-compatible paths. OpenAI's SDKs always send some key, so where none is required an
    unknown one is taken as no key (as vLLM and infinity do), and one that is not even shaped like ours
    costs no database query (nor does one from an address past its failed lookups); a known key still
    counts as itself. With CLIP_REQUIRE_API_KEY a wrong key is the 401 it is everywhere, and a database
    that does not answer a 503, never a 500."""

    def authenticate(self, request):
        raw = presented_key(request)
        required = current().access.require_api_key
        if raw is None or (not required and not raw.startswith(KEY_PREFIX)):
            return None
        try:
            return super().authenticate(request)
        except (exceptions.AuthenticationFailed, exceptions.Throttled):
            if required:
                raise
            return None
        except DatabaseError as exc:
            if required:
                message = "The database is not answering, so the key cannot be checked."
                raise errors.DatabaseUnavailable(message) from exc
            return None  # no key needed: served as a client without one


def demo_token(user) -> str:
    """What the demo page's script sends for its logged-in staff user (the page holds it; other sites
    cannot read it, so it is no CSRF hole)."""
    return signing.TimestampSigner(salt=DEMO_TOKEN_SALT).sign(str(user.pk))


class DemoPageAuthentication(authentication.BaseAuthentication):
    """The demo page's own requests, made for a logged-in staff user (header ``X-Demo-Token``)."""

    def authenticate(self, request):
        token = request.META.get("HTTP_X_DEMO_TOKEN")
        if not token:
            return None
        from django.contrib.auth import get_user_model

        try:
            user_id = signing.TimestampSigner(salt=DEMO_TOKEN_SALT).unsign(token, max_age=DEMO_TOKEN_MAX_AGE_S)
        except signing.BadSignature:
            return None
        user = get_user_model().objects.filter(pk=user_id, is_active=True, is_staff=True).first()
        return (user, "demo-page") if user is not None else None


class RequireApiKey(permissions.BasePermission):
    """With CLIP_REQUIRE_API_KEY, only a valid key (or the demo page's staff) may call the API."""

    def has_permission(self, request, view) -> bool:
        if not current().access.require_api_key:
            return True
        user = getattr(request, "user", None)
        return bool(user is not None and getattr(user, "is_authenticated", False))


def rate_limit_wait(request) -> float | None:
    """Count ``request`` against CLIP_RATE_LIMIT for its client (access/identity.py): None when it is
    allowed, else the seconds to wait. The API's throttle and the demo page's forms both ask this."""
    rate = current().access.rate_limit  # read each time: tests (and a reload) may change it
    if not rate:
        return None
    limit, period = ratelimit.parse_rate(rate)
    return ratelimit.take(f"rate-{client_identity(request)}", limit=limit, period=period)


class ClientRateThrottle(throttling.BaseThrottle):
    """CLIP_RATE_LIMIT per client, counted in the store every worker shares (access/ratelimit.py)."""

    def allow_request(self, request, view) -> bool:
        self._wait = rate_limit_wait(request)
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait
