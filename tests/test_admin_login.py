"""Admin logins are throttled (django-axes, clipsite/settings.py AXES_*): after AXES_FAILURE_LIMIT
failures one username from one address is refused, even with the right password, until the cool-off
ends; other users and other addresses are not. Lockouts are database rows, rolled back after each test."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.utils import timezone

pytestmark = pytest.mark.django_db
LOGIN = "/admin/login/"
PASSWORD = "the-right-password-7"


@pytest.fixture
def staff():
    users = get_user_model().objects
    return [users.create_user(name, password=PASSWORD, is_staff=True) for name in ("alice", "bob")]


def log_in(client, username: str, password: str, address: str = "10.0.0.1", **headers):
    """The admin's login form, posted from ``address``; the response and whether it logged in."""
    client.logout()
    response = client.post(
        LOGIN, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=address, headers=headers
    )
    return response, "_auth_user_id" in client.session


def fail(client, username: str, times: int, address: str = "10.0.0.1") -> list[int]:
    return [log_in(client, username, "wrong", address)[0].status_code for _ in range(times)]


def test_the_right_password_logs_in(client, staff):
    response, logged_in = log_in(client, "alice", PASSWORD)
    assert response.status_code == 302 and logged_in


def test_after_the_failure_limit_even_the_right_password_is_refused(client, settings, staff):
    limit = settings.AXES_FAILURE_LIMIT
    # The form answers each failure with its error, then the limit-th failure locks the pair out.
    assert fail(client, "alice", limit) == [200] * (limit - 1) + [429]
    response, logged_in = log_in(client, "alice", PASSWORD)
    assert response.status_code == 429 and not logged_in
    assert "too many login attempts" in response.content.decode()


def test_a_forwarded_for_header_does_not_buy_a_fresh_count(client, settings, staff):
    fail(client, "alice", settings.AXES_FAILURE_LIMIT)
    for forwarded in ("203.0.113.9", "198.51.100.1, 10.0.0.1"):
        response, logged_in = log_in(client, "alice", PASSWORD, headers={"X-Forwarded-For": forwarded})
        assert response.status_code == 429 and not logged_in, forwarded


def test_a_lockout_leaves_other_users_and_other_addresses_alone(client, settings, staff):
    fail(client, "alice", settings.AXES_FAILURE_LIMIT, address="10.0.0.1")
    assert log_in(client, "bob", PASSWORD, address="10.0.0.1")[1]
    assert log_in(client, "alice", PASSWORD, address="10.0.0.2")[1]


def test_a_lockout_ends_after_the_cool_off(client, settings, staff):
    fail(client, "alice", settings.AXES_FAILURE_LIMIT)
    assert log_in(client, "alice", PASSWORD)[0].status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))
    assert log_in(client, "alice", PASSWORD)[1]


def test_a_successful_login_resets_the_count(client, settings, staff):
    fail(client, "alice", settings.AXES_FAILURE_LIMIT - 1)
    assert log_in(client, "alice", PASSWORD)[1]
    assert fail(client, "alice", settings.AXES_FAILURE_LIMIT - 1) == [200] * (settings.AXES_FAILURE_LIMIT - 1)
    assert log_in(client, "alice", PASSWORD)[1]
