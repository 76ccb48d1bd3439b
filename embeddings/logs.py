"""Logging: every line of a request carries its request_id, each request has one line of its own, the
counters have a line at an interval, JSON lines on demand, and health probes stay out of the log."""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

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


# --- What a request did, for its log line -------------------------------------------------------------
@dataclass
class RequestStats:
    """Items a request sent to the model and the batches they ran in (the services fill it)."""

    images: int = 0
    texts: int = 0
    batches: list[int] = field(default_factory=list)


# Set by ApiEdgeMiddleware for the request a thread is serving; None outside any request.
current_request_stats: contextvars.ContextVar[RequestStats | None] = contextvars.ContextVar(
    "request_stats", default=None
)


def note_embedded(*, images: int, texts: int, batches: list[int]) -> None:
    """Count a request's images and texts and the batches they rode in (nothing outside a request)."""
    stats = current_request_stats.get()
    if stats is not None:
        stats.images += images
        stats.texts += texts
        stats.batches.extend(b for b in batches if b not in stats.batches)


request_logger = logging.getLogger("clipsite.requests")


def log_request(
    *, request_id: str, method: str, endpoint: str, status: int, latency_ms: float, stats: RequestStats
) -> None:
    """The one line of a request: its route (never its path, query or headers), status, latency and items."""
    fields = {
        "request_id": request_id,
        "method": method,
        "endpoint": endpoint,
        "status": status,
        "latency_ms": round(latency_ms, 1),
        "images": stats.images,
        "texts": stats.texts,
        "batches": stats.batches,
    }
    request_logger.info(
        "%s %s %d %.1f ms images=%d texts=%d batches=%s",
        method,
        endpoint,
        status,
        latency_ms,
        stats.images,
        stats.texts,
        ",".join(map(str, stats.batches)) or "-",
        extra=fields,
    )


# --- JSON lines (LOG_FORMAT=json) ------------------------------------------------------------------------
# Only these attributes of a record are written: a record's ``request`` (Django's), headers, bodies and
# anything else a caller passes never reach the log.
_JSON_EXTRAS = ("method", "endpoint", "status", "latency_ms", "images", "texts", "batches", "counters")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, request_id, message (+ a request's fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for name in _JSON_EXTRAS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


# --- The counters line ------------------------------------------------------------------------------------
counters_logger = logging.getLogger("clipsite.counters")
_counters_lock = threading.Lock()
_counters_thread: threading.Thread | None = None


def log_counters() -> dict:
    """One tick: this worker's counters since it started (requests, items, errors by code), as one line."""
    from embeddings import metrics

    counts = metrics.counters()
    counters_logger.info(
        "counters requests=%d %s items %s errors %s",
        counts["requests"],
        _pairs(counts["requests_by_status"]),
        _pairs(counts["items"]),
        _pairs(counts["errors"]),
        extra={"counters": counts},
    )
    return counts


def _pairs(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "-"


def start_counters_log(interval_s: float) -> None:
    """Log the counters every ``interval_s`` seconds from a daemon thread, once per process (0: never).

    Server processes start it with the model's warm-up; tests call ``log_counters`` instead.
    """
    global _counters_thread
    if interval_s <= 0:
        return
    with _counters_lock:
        if _counters_thread is not None:
            return

        def tick() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    log_counters()
                except Exception:  # noqa: BLE001 - a failed line must not end the thread
                    counters_logger.exception("Cannot log the counters")

        _counters_thread = threading.Thread(target=tick, name="clip-counters", daemon=True)
        _counters_thread.start()
