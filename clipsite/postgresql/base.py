"""Django's PostgreSQL backend (psycopg 3) whose connections stop waiting for a server that does not answer.

The server's own timeouts (statement_timeout, lock_timeout) end a slow query, and TCP's (keep-alives,
tcp_user_timeout; clipsite/settings.py sets them all) end a connection whose packets go unanswered. None of
them ends a wait on a server that is up but silent: a stopped process (SIGSTOP, a guest paused mid-query),
whose kernel goes on acknowledging every packet. A query sent to it waited forever, and every request
thread that touched the database hung behind it. Here each wait for the server gives up after
``OPTIONS["client_timeout"]`` seconds: the connection is closed (its state mid-query is unknown) and the
query fails with OperationalError, which the API answers 503 ``database_unavailable``. Connecting has
its own limit, libpq's ``connect_timeout``.
"""

from __future__ import annotations

import psycopg
from django.db.backends.postgresql import base


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection whose every wait for the server (a query, a commit, a health check) ends
    after ``deadline_s`` seconds; None waits as long as the server takes."""

    deadline_s: float | None = None

    def wait(self, gen, interval=None, timeout=None):
        kwargs = {} if interval is None else {"interval": interval}
        if timeout is not None or not self.deadline_s:  # a caller's own limit (notifies()) stays its own
            return super().wait(gen, **kwargs, timeout=timeout)
        try:
            return super().wait(gen, **kwargs, timeout=self.deadline_s)
        except psycopg.errors._WaitTimeout as exc:  # an OperationalError: psycopg's "wait timeout expired"
            self.close()
            raise psycopg.OperationalError(
                f"the database did not answer within {self.deadline_s:g} s; the connection is closed"
            ) from exc


class DatabaseWrapper(base.DatabaseWrapper):
    """Django's PostgreSQL backend, its connections given ``OPTIONS["client_timeout"]`` as their deadline."""

    def get_connection_params(self):
        params = super().get_connection_params()
        params.pop("client_timeout", None)  # ours, not libpq's: it would refuse the connection string
        return params

    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        # The connection Django made, given the deadline: a subclass that only overrides wait(), so the
        # object is the same and nothing else of Django's or psycopg's connecting is repeated here.
        connection.__class__ = DeadlineConnection
        deadline = self.settings_dict["OPTIONS"].get("client_timeout")  # a number, or a URL's ?client_timeout=
        connection.deadline_s = float(deadline) if deadline else None
        return connection
