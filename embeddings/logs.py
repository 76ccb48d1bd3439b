"""Logging: every line of a request carries its request_id, and health probes stay out of the log."""

from __future__ import annotations

import contextvars
import logging

_PROBES = ("/healthz", "/readyz")
# Set by ApiEdgeMiddleware for the request a thread is serving; "-" outside any request.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Give every record the request_id of the request being served (the handler's format prints it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            # Django logs a request's 4xx/5xx line after the middleware has returned, with the request.
            from_request = getattr(getattr(record, "request", None), "request_id", None)
            record.request_id = from_request or current_request_id.get()
        return True


class NotAProbe(logging.Filter):
    """Drop Django's 'Service Unavailable: /readyz' lines: a 503 there is the probe working, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return getattr(request, "path", None) not in _PROBES
