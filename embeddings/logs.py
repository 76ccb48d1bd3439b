"""Logging filters."""

import logging

_PROBES = ("/healthz", "/readyz")


class NotAProbe(logging.Filter):
    """Drop Django's 'Service Unavailable: /readyz' lines: a 503 there is the probe working, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return getattr(request, "path", None) not in _PROBES
