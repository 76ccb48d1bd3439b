"""Logging: every line of a request carries its request_id, each request has one line of its own, the
counters have a line at an interval, JSON lines on demand, and health probes stay out of the log.

One record is one line, whatever a client sends: what a client chose (a path, a User-Agent) is written
escaped (``escaped``), and both formatters escape whatever else could break a line (``PlainFormatter``,
``JsonFormatter``). gunicorn's access log is off (clipsite/gunicorn.conf.py): this module's line is the
one line of a request.
"""

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

# The longest path and User-Agent a line holds (characters, before escaping).
MAX_LOGGED_CHARS = 300


def escaped(value: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """A client's value as printable text for a quoted field: every character that is not printable
    (controls, line and paragraph separators, NUL, C1 controls such as CSI) as ``\\xNN``, ``\\uNNNN``
    or ``\\UNNNNNNNN``, a backslash and a double quote escaped too, and at most ``limit`` characters of
    it (then ``...``)."""
    cut = value[:limit]
    if cut.isprintable() and "\\" not in cut and '"' not in cut:
        out = cut
    else:
        out = "".join(_escape_char(c) if not c.isprintable() or c in '\\"' else c for c in cut)
    return out + "..." if len(value) > limit else out


def _escape_char(c: str) -> str:
    if c in '\\"':
        return "\\" + c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (backslashes left as they are)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else _escape_char(c) for c in text)


def log_request(
    *,
    request_id: str,
    method: str,
    endpoint: str,
    status: int,
    latency_ms: float,
    stats: RequestStats,
    client: str = "",
    path: str = "",
    user_agent: str = "",
    size: int | None = None,
) -> None:
    """The one line of a request: its route, status, latency and items, then who asked (``client``: the
    address), its path (never its query, which may hold a key), the body size of the answer and the
    User-Agent, the last two escaped (``escaped``)."""
    method, path, user_agent = escaped(method, 20), escaped(path), escaped(user_agent)
    fields = {
        "request_id": request_id,
        "method": method,
        "endpoint": endpoint,
        "status": status,
        "latency_ms": round(latency_ms, 1),
        "images": stats.images,
        "texts": stats.texts,
        "batches": stats.batches,
        "client": escaped(client, 64),
        "path": path,
        "bytes": size,
        "user_agent": user_agent,
    }
    request_logger.info(
        '%s %s %d %.1f ms images=%d texts=%d batches=%s client=%s path="%s" bytes=%s ua="%s"',
        method,
        endpoint,
        status,
        latency_ms,
        stats.images,
        stats.texts,
        ",".join(map(str, stats.batches)) or "-",
        fields["client"] or "-",
        path,
        "-" if size is None else size,
        user_agent,
        extra=fields,
    )


# --- Plain lines (LOG_FORMAT=plain) ----------------------------------------------------------------------
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s"


class PlainFormatter(logging.Formatter):
    """One line a record: the message's characters that are not printable (a newline, ESC, NUL, ...)
    escaped; a traceback keeps its lines, each indented, so that every line that starts a record is one."""

    def __init__(self, fmt: str | None = PLAIN_FORMAT, *args, **kwargs):
        super().__init__(fmt, *args, **kwargs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = _printable(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + _printable(line) for line in text.split("\n"))


# --- JSON lines (LOG_FORMAT=json) ------------------------------------------------------------------------
# Only these attributes of a record are written: a record's ``request`` (Django's), headers, bodies and
# anything else a caller passes never reach the log.
_JSON_EXTRAS = (
    "method",
    "endpoint",
    "status",
    "latency_ms",
    "images",
    "texts",
    "batches",
    "client",
    "path",
    "bytes",
    "user_agent",
    "counters",
)
# What json.dumps leaves as it is but a reader may take for the end of a line (str.splitlines does) or
# a terminal for a command: DEL, the C1 controls, and the line and paragraph separators.
_JSON_UNSAFE = {c: f"\\u{c:04x}" for c in [0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]}


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
        return json.dumps(out, ensure_ascii=False, default=str).translate(_JSON_UNSAFE)


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
