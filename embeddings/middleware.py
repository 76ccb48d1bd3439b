"""Request edges: the original spec's doubled leading slash, the request id of API calls, and each
request's line in the log and its metrics."""

from __future__ import annotations

import re
import time
import uuid

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.urls import Resolver404, resolve

from access.identity import client_address
from embeddings import errors, memory, metrics, multipart, views
from embeddings.logs import RequestStats, current_request_id, current_request_stats, log_request
from embeddings.runtime.state import runtime

API_PREFIXES = ("/syte_test/", errors.OPENAI_PREFIX)
_PRINTABLE = re.compile(r"^[\x20-\x7e]{1,128}$")
# The original spec names the header request_id; gunicorn passes it on with header_map="dangerous".
_REQUEST_ID_HEADERS = ("HTTP_REQUEST_ID", "HTTP_X_REQUEST_ID")


def clean_request_id(value: str | None) -> str:
    """The client's id when it is short printable ASCII, else a fresh UUID4 (never echoed raw)."""
    if value is not None:
        value = value.strip()
        if _PRINTABLE.match(value):
            return value
    return str(uuid.uuid4())


class ApiEdgeMiddleware:
    """The edge of every request, before any other middleware:

    - health probes and /metrics are answered at once, whatever the Host header (a container's
      HEALTHCHECK calls 127.0.0.1, and Prometheus scrapes a worker's address, while DJANGO_ALLOWED_HOSTS
      names the public host); they are neither logged nor counted;
    - a doubled leading slash is collapsed (the original spec writes ``HOST:8081//syte_test/...``);
    - every API request gets its id, echoed in the ``request_id`` response header and in its log lines;
    - a body that declares more than CLIP_MAX_REQUEST_BYTES (on any path: the demo page's and the
      admin's forms too) is refused before anything reads it;
    - every other request is counted (by route, status and error code), timed, and has one log line.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info.startswith("//"):
            request.path_info = "/" + request.path_info.lstrip("/")
            request.path = request.path_info
        probe = _PROBES.get(request.path_info)
        if probe is not None and request.method in ("GET", "HEAD"):
            return _with_length(probe(request))
        started = time.perf_counter()
        if request.path_info.startswith(API_PREFIXES):
            raw = next((request.META[h] for h in _REQUEST_ID_HEADERS if request.META.get(h)), None)
            request.request_id = clean_request_id(raw)
        request_id = getattr(request, "request_id", None)
        stats = RequestStats()
        response = _refuse_oversized_body(request, request_id)
        if response is None:
            token = current_request_id.set(request_id or "-")  # every log line of this request names it
            stats_token = current_request_stats.set(stats)  # the services note its items and batches
            metrics.IN_FLIGHT.inc()
            try:
                # in flight before a SIGTERM: it finishes, drain or not; its decodes held against the
                # worker's memory budget until it ends (embeddings/memory.py)
                with runtime.admitted(), memory.request_memory():
                    response = self.get_response(request)
                let_go_of_the_body(request, response)
            finally:
                metrics.IN_FLIGHT.dec()
                current_request_stats.reset(stats_token)
                current_request_id.reset(token)
            if request_id and not response.has_header("request_id"):
                response["request_id"] = request_id
        _record(request, response, request_id, stats, time.perf_counter() - started)
        return response

    def process_exception(self, request, exception):
        """A database failure under a view outside DRF (the demo page reading a staff session, the admin)
        is the 503 the API answers (DRF's views map it themselves: embeddings/errors.py), never a 500."""
        error = errors.as_api_error(exception)
        if isinstance(error, errors.DatabaseUnavailable):
            return _error_response(request, getattr(request, "request_id", None), error)
        return None


def let_go_of_the_body(request, response) -> None:
    """Drop the request's body and what was parsed from it once the answer is made. Django's and DRF's
    request, view and response objects refer to each other in cycles, which only a full garbage
    collection frees: without this, a 99 MB upload stayed reachable long after its answer."""
    drf_request = (getattr(response, "renderer_context", None) or {}).get("request")
    if drf_request is not None:
        for name in ("_data", "_full_data", "_files"):
            if name in drf_request.__dict__:
                setattr(drf_request, name, None)
    for name in ("_body", "_post", "_files"):
        request.__dict__.pop(name, None)


def _record(request, response, request_id: str | None, stats: RequestStats, seconds: float) -> None:
    """Count, time and log one answered request."""
    endpoint, status = endpoint_of(request), response.status_code
    metrics.REQUESTS.labels(endpoint, str(status)).inc()
    metrics.REQUEST_SECONDS.labels(endpoint).observe(seconds)
    if status >= 400:
        # The API's errors carry their code; other 4xx/5xx (Django's own pages) count by status.
        metrics.REJECTIONS.labels(getattr(response, "error_code", None) or f"http_{status}").inc()
    log_request(
        request_id=request_id or "-",
        method=request.method,
        endpoint=endpoint,
        status=status,
        latency_ms=1000 * seconds,
        stats=stats,
        # The peer's address; behind a proxy, the proxy's (access/ decides who the client is).
        client=str(client_address(request) or ""),
        path=request.path,
        user_agent=request.META.get("HTTP_USER_AGENT", ""),
        size=_body_size(response),
    )


def _body_size(response) -> int | None:
    """The bytes of the answer's body: known, except for a stream without a Content-Length."""
    if not response.streaming:
        return len(response.content)
    length = response.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def endpoint_of(request) -> str:
    """The route that served ``request`` (``/syte_test/embeddings``), never its raw path: a bounded label."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        if request.path_info.startswith("/" + settings.STATIC_URL.lstrip("/")):
            return "/" + settings.STATIC_URL.lstrip("/") + "*"  # whitenoise answers before any route
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "unmatched"
    route = match.route
    if route.startswith("^"):  # a regular expression: the API's fallback, ^syte_test/
        route = route.strip("^$") + "*"
    return "/" + route


def _refuse_oversized_body(request, request_id: str | None):
    """A 413 (or 400 for an unreadable length) before the body is read, in the API's shape on its paths."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    try:
        multipart.check_declared_length(request.META)
    except errors.ApiError as exc:
        return _error_response(request, request_id, exc)
    return None


def _error_response(request, request_id: str | None, exc: errors.ApiError):
    """An API error answered outside DRF: in the API's shape on its paths, in plain words elsewhere."""
    if request_id is not None:
        body = errors.error_body(request_id, exc.code, exc.message, status=exc.status_code, path=request.path_info)
        response = JsonResponse(body, status=exc.status_code)
        response["request_id"] = request_id
    else:
        response = HttpResponse(exc.message, status=exc.status_code, content_type="text/plain; charset=utf-8")
    if exc.retry_after is not None:
        response["Retry-After"] = str(exc.retry_after)
    response.error_code = exc.code
    return _with_length(response)


def _with_length(response):
    """Answers made here skip the middleware that would add Content-Length (and spare clients chunking)."""
    response["Content-Length"] = str(len(response.content))
    return response


_PROBES = {"/healthz": views.healthz, "/readyz": views.readyz, "/metrics": views.metrics_view}
