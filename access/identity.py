"""Who a request's client is: the one answer for the rate limits and for the engine's fair share.

A key is its client; the demo page's staff user is theirs; anyone else is their address. The address is
REMOTE_ADDR, the peer of the connection, unless that peer is one of CLIP_TRUSTED_PROXIES: then it is the
right-most hop of X-Forwarded-For that is not a trusted proxy, since each proxy appends the address it
was connected from and only the hops that trusted proxies wrote can be believed. Everything left of
that hop is whatever the client sent.
"""

from __future__ import annotations

import functools
import ipaddress

from access.services import ApiClient
from clipsite.config import current

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Hops of X-Forwarded-For read from the right, at most: more trusted proxies in a row than any deployment has.
MAX_HOPS = 16
# An IPv6 host is handed a whole /64 (SLAAC, privacy addresses) and may use any address in it: the /64 is
# the client, or each request could come from a fresh address, as a spoofed X-Forwarded-For once could.
IPV6_CLIENT_PREFIX = 64


def parse_address(text: str) -> Address | None:
    """An address as REMOTE_ADDR or a hop of X-Forwarded-For writes it (bare, ``1.2.3.4:80`` or
    ``[2001:db8::1]:80``; an IPv4-mapped IPv6 address is its IPv4 one), or None when it is none."""
    text = text.strip()[:64]
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)  # checked at boot (clipsite.E053)


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(request) -> Address | None:
    """The client's address (above); None where the peer has none (a Unix socket)."""
    peer = parse_address(request.META.get("REMOTE_ADDR", ""))
    networks = _networks(current().access.trusted_proxies)
    if peer is None or not _trusted(peer, networks):
        return peer
    hops = request.META.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", MAX_HOPS)[-MAX_HOPS:]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            # Not an address, so no trusted proxy wrote it: the last hop that one did write is the client
            # (a proxy that passes a client's header on unchanged gives its own address, never a choice).
            return peer
        if not _trusted(address, networks):
            return address
        peer = address
    return peer  # every hop is a trusted proxy: the request began inside


def axes_client_ip(request) -> str:
    """The client's address for django-axes' login lockouts (AXES_CLIENT_IP_CALLABLE)."""
    address = client_address(request)
    return str(address) if address is not None else ""


def address_identity(request) -> str:
    """``addr-ADDRESS`` (``addr-NETWORK/64`` for IPv6): who a request without a key or staff user is."""
    address = client_address(request)
    if address is None:
        return "addr-unknown"
    if address.version == 6:
        return f"addr-{ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)}"
    return f"addr-{address}"


def client_identity(request) -> str:
    """Who asks: ``key-ID`` for an API key, ``staff-ID`` for the demo page's staff user, else
    ``address_identity``. The rate limit counts per identity, and the engine shares its queue by it."""
    user = getattr(request, "user", None)
    if isinstance(user, ApiClient):
        return f"key-{user.key_id}"
    if user is not None and getattr(user, "is_authenticated", False) and getattr(user, "is_staff", False):
        return f"staff-{user.pk}"
    return address_identity(request)
