"""The service's Prometheus metrics: the metric objects, and their exposition for ``/metrics``.

prometheus_client only, no Django: the runtime (engine.py, state.py) records here too. Under gunicorn
the master exports ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports prometheus_client
(clipsite/gunicorn.conf.py), and each worker writes its values to files there, which ``exposition``
sums whichever worker answers. Elsewhere (tests, runserver, management commands) the values live in
this process and the default registry serves them.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)

# prometheus_client chose its value class from the environment when it was first imported.
MULTIPROCESS = values.ValueClass is not values.MutexValue

# Bounded labels only: the route (never the raw path), the status, the error code, the kind.
REQUESTS = Counter("clipsite_requests", "HTTP requests answered, by route and status.", ["endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "clipsite_request_duration_seconds",
    "Time from the request reaching the app to its answer, by route.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ITEMS = Counter("clipsite_items_embedded", "Images and texts embedded by the model (every caller).", ["kind"])
BATCH_SIZE = Histogram(
    "clipsite_batch_size",
    "Items per forward pass of the model, by kind.",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_DEPTH = Gauge(
    "clipsite_queue_depth",
    "Items waiting for the model, by kind (live workers summed).",
    ["kind"],
    multiprocess_mode="livesum",
)
MODEL_LOAD_SECONDS = Gauge(
    "clipsite_model_load_seconds",
    "Seconds the model took to load and warm up (the slowest live worker).",
    multiprocess_mode="livemax",
)
CATEGORY_CACHE = Counter(
    "clipsite_category_cache",
    "Look-ups of the wearable category vectors in a worker's memory: hit, miss (rebuilt) or stale (database down).",
    ["result"],
)
IN_FLIGHT = Gauge(
    "clipsite_requests_in_flight",
    "Requests being served right now (probes and /metrics not counted; live workers summed).",
    multiprocess_mode="livesum",
)
REJECTIONS = Counter("clipsite_rejections", "Requests answered with an error, by its code.", ["code"])
MEMORY_HELD = Gauge(
    "clipsite_worker_memory_held_bytes",
    "Bytes of the workers' memory budgets (CLIP_WORKER_MEMORY_MB) held by request bodies, decodes and "
    "answers being sent (live workers summed).",
    multiprocess_mode="livesum",
)
EDGE_CLOSED = Counter(
    "clipsite_connections_closed",
    "Connections the server's edge closed before a request reached the application, by why "
    "(header_timeout, body_timeout, keepalive_timeout, evicted, shed, malformed_http, headers_too_large, ...).",
    ["reason"],
)


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _totals(counter: Counter) -> dict[tuple[str, ...], float]:
    """This process's values of a counter, by label values (the ``_total`` samples)."""
    out = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels.values())] = sample.value
    return out


def counters() -> dict:
    """This process's counters since it started, for the periodic log line."""
    by_status: dict[str, int] = {}
    for (_, status), value in _totals(REQUESTS).items():
        by_status[status] = by_status.get(status, 0) + int(value)
    return {
        "requests": sum(by_status.values()),
        "requests_by_status": dict(sorted(by_status.items())),
        "items": {kind: int(v) for (kind,), v in sorted(_totals(ITEMS).items())},
        "errors": {code: int(v) for (code,), v in sorted(_totals(REJECTIONS).items())},
    }
