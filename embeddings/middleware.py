"""Request edges: the original spec's doubled leading slash, and the request id of API calls."""

from __future__ import annotations

import re
import uuid

from embeddings.logs import current_request_id

API_PREFIX = "/syte_test/"
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
    """Collapse a doubled leading slash (the original spec writes ``HOST:8081//syte_test/...``) and
    give every API request its id, echoed in the ``request_id`` response header."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info.startswith("//"):
            request.path_info = "/" + request.path_info.lstrip("/")
            request.path = request.path_info
        if request.path_info.startswith(API_PREFIX):
            raw = next((request.META[h] for h in _REQUEST_ID_HEADERS if request.META.get(h)), None)
            request.request_id = clean_request_id(raw)
        request_id = getattr(request, "request_id", None)
        token = current_request_id.set(request_id or "-")  # every log line of this request names it
        try:
            response = self.get_response(request)
        finally:
            current_request_id.reset(token)
        if request_id and not response.has_header("request_id"):
            response["request_id"] = request_id
        return response
