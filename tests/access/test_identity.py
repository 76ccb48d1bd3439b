"""One client identity (access/identity.py): the rate limit and the engine's fair share count the same
client, which a client cannot change by sending X-Forwarded-For."""

from __future__ import annotations

import pytest
from django.test import RequestFactory

from access.identity import client_address, client_identity
from access.services import api_key_create
from clipsite.config import load
from embeddings.runtime.engine import Engine
from tests.conftest import ROOT, multipart_body, override

pytestmark = pytest.mark.django_db
URL = "/syte_test/embeddings"


def post(client, remote_addr: str = "127.0.0.1", **headers):
    body, content_type = multipart_body([("t", "a photo of a cat", None)])
    return client.generic("POST", URL, body, content_type=content_type, headers=headers, REMOTE_ADDR=remote_addr)


def address(remote_addr: str, forwarded: str | None = None) -> str:
    extra = {} if forwarded is None else {"HTTP_X_FORWARDED_FOR": forwarded}
    return str(client_address(RequestFactory().get("/", REMOTE_ADDR=remote_addr, **extra)))


@pytest.fixture
def proxies(settings):
    """Requests come through a proxy on 127.0.0.1 or in 10.0.0.0/8."""
    override(settings, access={"trusted_proxies": ("127.0.0.0/8", "10.0.0.0/8")})


def test_varying_x_forwarded_for_does_not_buy_a_fresh_rate_limit_bucket(client, settings, clip):
    override(settings, access={"rate_limit": "2/min"})
    statuses = [post(client, **{"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(4)]
    assert statuses == [200, 200, 429, 429]


def test_x_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_ignored(settings):
    override(settings, access={"trusted_proxies": ("10.0.0.0/8",)})
    assert address("198.51.100.7", "203.0.113.9") == "198.51.100.7"
    override(settings, access={"trusted_proxies": ()})
    assert address("10.0.0.2", "203.0.113.9") == "10.0.0.2"  # none trusted: the default


def test_a_trusted_proxys_x_forwarded_for_names_the_client_for_the_rate_limit(client, settings, clip, proxies):
    override(settings, access={"rate_limit": "2/min"})
    one, other = {"X-Forwarded-For": "203.0.113.5"}, {"X-Forwarded-For": "198.51.100.20"}
    assert [post(client, **one).status_code for _ in range(3)] == [200, 200, 429]
    assert post(client, **other).status_code == 200  # another client behind the same proxy
    assert post(client, remote_addr="10.1.2.3", **one).status_code == 429  # the same client via another proxy


def test_the_right_most_hop_that_is_not_a_trusted_proxy_is_the_client(settings, proxies):
    # The client sent "6.6.6.6" itself; the proxy in front appended the client's real address, and an
    # inner proxy (10.0.0.7) the outer one's.
    assert address("127.0.0.1", "6.6.6.6, 203.0.113.5, 10.0.0.7") == "203.0.113.5"
    assert address("127.0.0.1", "203.0.113.5,10.0.0.7") == "203.0.113.5"
    assert address("127.0.0.1", "10.0.0.9, 10.0.0.7") == "10.0.0.9"  # every hop trusted: from inside


def test_what_a_client_prepends_to_x_forwarded_for_does_not_change_its_bucket(client, settings, clip, proxies):
    override(settings, access={"rate_limit": "2/min"})
    statuses = [post(client, **{"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.5"}).status_code for i in range(3)]
    assert statuses == [200, 200, 429]


def test_a_hop_that_is_not_an_address_falls_back_to_the_last_trusted_proxy(settings, proxies):
    assert address("127.0.0.1", "nonsense") == "127.0.0.1"
    assert address("127.0.0.1", "203.0.113.5, garbage, 10.0.0.7") == "10.0.0.7"
    assert address("127.0.0.1", "") == "127.0.0.1"
    assert address("127.0.0.1", "203.0.113.5:4711") == "203.0.113.5"  # some proxies add the port
    assert address("127.0.0.1", "[2001:db8::1]:443") == "2001:db8::1"
    assert address("127.0.0.1", "::ffff:203.0.113.5") == "203.0.113.5"  # IPv4-mapped
    assert address("127.0.0.1", "x" * 10_000 + ", 203.0.113.5") == "203.0.113.5"


def test_a_long_chain_of_trusted_hops_is_read_only_so_far(settings, proxies):
    chain = ", ".join(["203.0.113.5"] + ["10.0.0.1"] * 100)
    assert address("127.0.0.1", chain) == "10.0.0.1"  # 16 hops read, all trusted: no further


def test_an_ipv6_client_is_its_slash_64(settings):
    factory = RequestFactory()
    first = client_identity(factory.get("/", REMOTE_ADDR="2001:db8:1:2::1"))
    second = client_identity(factory.get("/", REMOTE_ADDR="2001:db8:1:2:ffff:eeee:dddd:cccc"))
    elsewhere = client_identity(factory.get("/", REMOTE_ADDR="2001:db8:1:3::1"))
    assert first == second == "addr-2001:db8:1:2::/64" and elsewhere != first
    assert client_identity(factory.get("/", REMOTE_ADDR="")) == "addr-unknown"  # a Unix socket's peer


def test_the_fair_share_and_the_rate_limit_name_the_same_client(client, settings, clip, proxies, monkeypatch):
    asked = []
    embed = Engine.embed

    def recording(self, **kwargs):
        asked.append(kwargs.get("client"))
        return embed(self, **kwargs)

    monkeypatch.setattr(Engine, "embed", recording)
    _, raw = api_key_create(name="identity")
    post(client, **{"X-Forwarded-For": "203.0.113.5"})
    post(client, **{"X-Forwarded-For": "198.51.100.20"})
    post(client, **{"X-Forwarded-For": "203.0.113.5", "Authorization": f"Bearer {raw}"})
    assert asked[0] == "addr-203.0.113.5" and asked[1] == "addr-198.51.100.20"
    assert asked[2].startswith("key-")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("10.0.0.1/8", "host bits"),
        ("10.0.0.0/33", "not a network"),
        ("proxy.internal", "not a network"),
        ("0.0.0.0/0", "every client"),
        ("10.0.0.0/8, ::/0", "every client"),
    ],
)
def test_trusted_proxies_that_are_not_networks_stop_the_start_with_e053(raw, problem):
    config, problems = load({"CLIP_TRUSTED_PROXIES": raw}, base_dir=ROOT)
    assert [(p.variable, p.check_id) for p in problems] == [("CLIP_TRUSTED_PROXIES", "clipsite.E053")]
    assert problem in problems[0].message and config.access.trusted_proxies == ()


def test_trusted_proxies_are_read_as_networks():
    config, problems = load({"CLIP_TRUSTED_PROXIES": " 10.0.0.0/8 , 192.0.2.1,2001:db8::/32"}, base_dir=ROOT)
    assert problems == [] and config.access.trusted_proxies == ("10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32")
