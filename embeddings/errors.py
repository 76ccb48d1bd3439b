"""The one error table of the API: each error class carries its HTTP status, stable code and Retry-After.

Every code README lists is a class here. ``api_exception_handler`` turns any exception into the one
response shape; views never catch.
"""

from __future__ import annotations

import logging

from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApiError(drf_exceptions.APIException):
    """Base of every error the API reports; ``key`` names the form part at fault, if any.

    Each subclass is one row of the table: its HTTP status, its stable code, its default message and,
    for the errors a client should retry, ``retry_after`` in seconds.
    """

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_request"
    default_detail = "The request is not valid."
    retry_after: int | None = None

    def __init__(self, message: str | None = None, *, key: str | None = None):
        self.message = message or self.default_detail
        self.key = key
        self.code = self.default_code
        super().__init__(detail=self.message, code=self.code)


class BadRequest(ApiError):
    default_detail = "The request was refused: it exceeds one of the server's safety limits."


class EmptyRequest(BadRequest):
    default_code = "empty_request"
    default_detail = "The request holds no parts: send at least one image file or text field."


class EmptyText(BadRequest):
    default_code = "empty_text"
    default_detail = "A text part is empty."


class InvalidText(BadRequest):
    default_code = "invalid_text"
    default_detail = "A text part is not valid UTF-8."


class TextTooLong(BadRequest):
    default_code = "text_too_long"


class InvalidImage(BadRequest):
    default_code = "invalid_image"
    default_detail = "The file is not an image that can be decoded (or it is truncated or corrupt)."


class DuplicateKey(BadRequest):
    default_code = "duplicate_key"


class InvalidKey(BadRequest):
    default_code = "invalid_key"


class InvalidParameter(BadRequest):
    default_code = "invalid_parameter"


class MalformedMultipart(BadRequest):
    default_code = "malformed_multipart"
    default_detail = "The body is not well-formed multipart/form-data."


class InvalidContentLength(BadRequest):
    default_code = "invalid_content_length"
    default_detail = "The Content-Length header is not a number."


class MalformedRequest(BadRequest):
    default_code = "malformed_request"
    default_detail = "The body is not valid JSON."


class TooLarge(ApiError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"


class RequestTooLarge(TooLarge):
    default_code = "request_too_large"
    default_detail = "The request body is over the size limit."


class FileTooLarge(TooLarge):
    default_code = "file_too_large"


class ImageTooLarge(TooLarge):
    default_code = "image_too_large"
    default_detail = "The image has more pixels than the server will decode."


class RequestTooManyPixels(TooLarge):
    default_code = "too_many_pixels"
    default_detail = "The request's images decode to more pixels together than the server allows."


class TooManyParts(TooLarge):
    default_code = "too_many_parts"


class KeyTooLong(TooLarge):
    default_code = "key_too_long"


class UnsupportedMediaType(ApiError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    default_code = "unsupported_media_type"
    default_detail = "The body must be multipart/form-data."


class UnsupportedImage(ApiError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    default_code = "unsupported_image"


class NotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    default_code = "not_found"
    default_detail = "There is nothing at this path."


class MethodNotAllowed(ApiError):
    status_code = status.HTTP_405_METHOD_NOT_ALLOWED
    default_code = "method_not_allowed"


class NotAuthenticated(ApiError):
    """DRF raises its own NotAuthenticated / AuthenticationFailed; they answer with this row's code."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "not_authenticated"
    default_detail = "Send a valid API key: Authorization: Bearer KEY, or X-API-Key: KEY."


class PermissionDenied(ApiError):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "permission_denied"


class Throttled(ApiError):
    """DRF's Throttled answers with this row's code, and Retry-After from its wait."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "throttled"


class NotAcceptable(ApiError):
    status_code = status.HTTP_406_NOT_ACCEPTABLE
    default_code = "not_acceptable"


class NotReady(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "not_ready"
    default_detail = "The model is still loading; try again in a few seconds."
    retry_after = 5


class Overloaded(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "overloaded"
    default_detail = "The server is at capacity; try again shortly."
    retry_after = 5


class Timeout(ApiError):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_code = "timeout"
    default_detail = "The request waited longer than the server's deadline for the model; try again."
    retry_after = 5


class InternalError(ApiError):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    default_code = "internal_error"
    default_detail = "The server failed to handle this request; it has been logged."


# DRF's own exceptions, each mapped onto our stable code (and its status).
_DRF_CODES = {
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.ParseError: "malformed_request",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.PermissionDenied: PermissionDenied.default_code,
    drf_exceptions.NotAuthenticated: NotAuthenticated.default_code,
    drf_exceptions.AuthenticationFailed: NotAuthenticated.default_code,
    drf_exceptions.Throttled: Throttled.default_code,
}


OPENAI_PREFIX = "/v1/"
# OpenAI's error types, by status: its SDKs raise their exception classes from the status alone.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(
    request_id: str | None, code: str, message: str, key: str | None = None, *, status: int = 400, path: str = ""
) -> dict:
    """The one error shape; on the OpenAI-compatible paths (/v1/) in OpenAI's: the same code and
    message, ``param`` for our ``key``, and ``type`` from the status."""
    if path.startswith(OPENAI_PREFIX):
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"request_id": request_id, "error": {"message": message, "type": kind, "param": key, "code": code}}
    return {"request_id": request_id, "error": {"code": code, "message": message, "key": key}}


def _request_id_of(context: dict) -> str | None:
    request = context.get("request")
    return getattr(request, "request_id", None) if request is not None else None


def api_exception_handler(exc: Exception, context: dict) -> Response:
    """DRF's EXCEPTION_HANDLER: every API error leaves in one JSON shape with the request_id."""
    request_id = _request_id_of(context)
    headers = {}
    exc = as_api_error(exc)
    if isinstance(exc, ApiError):
        status_code, code, message, key = exc.status_code, exc.code, exc.message, exc.key
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, Http404):
        status_code, code, message, key = 404, "not_found", NotFound.default_detail, None
    elif isinstance(exc, drf_exceptions.APIException):
        status_code = exc.status_code
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), "bad_request")
        message, key = _plain_detail(exc.detail), None
        if isinstance(exc, drf_exceptions.MethodNotAllowed):
            allowed = context.get("view").allowed_methods if context.get("view") else []
            headers["Allow"] = ", ".join(allowed)
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(max(1, int(-(-wait // 1))))
        if getattr(exc, "auth_header", None):  # set by DRF on 401s: how to authenticate
            headers["WWW-Authenticate"] = exc.auth_header
    else:
        logger.exception("Unhandled error in %s", context.get("view").__class__.__name__)
        error = InternalError()
        status_code, code, message, key = error.status_code, error.code, error.message, None
    request = context.get("request")
    path = request.path_info if request is not None else ""
    body = error_body(request_id, code, message, key, status=status_code, path=path)
    response = Response(body, status=status_code, headers=headers)
    response.error_code = code  # what the edge middleware counts the rejection under
    if request_id:
        response["request_id"] = request_id
    return response


def _runtime_errors() -> dict[type[Exception], type[ApiError]]:
    """The runtime knows nothing of HTTP: its expected failures, and Django's guards, as API errors."""
    from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
    from django.db import InterfaceError, OperationalError

    from embeddings.runtime.engine import DeadlineExceeded, EngineStopped, QueueFull
    from embeddings.runtime.state import RuntimeNotReady

    return {
        QueueFull: Overloaded,
        DeadlineExceeded: Timeout,
        RuntimeNotReady: NotReady,
        EngineStopped: NotReady,  # the worker is stopping; another one answers the retry
        RequestDataTooBig: RequestTooLarge,
        SuspiciousOperation: BadRequest,  # too many fields or files, and Django's other guards
        # The database is down, silent past DATABASE_TIMEOUT, refusing connections or holding a lock:
        # on any path (a key to check, feedback to record, a staff session), never a 500. Its other
        # errors (a constraint, a missing table on PostgreSQL) are faults of ours, and stay 500s.
        OperationalError: DatabaseUnavailable,
        InterfaceError: DatabaseUnavailable,
    }


def as_api_error(exc: Exception) -> Exception:
    """``exc`` as the API error that answers it, or ``exc`` itself when none does."""
    if isinstance(exc, ApiError):
        return exc
    for runtime_type, api_type in _runtime_errors().items():
        if isinstance(exc, runtime_type):
            if api_type is DatabaseUnavailable:  # the client never sees why: the log says it, in one line
                logger.warning("The database failed, answered 503 database_unavailable: %s", exc)
            return api_type()
    return exc


def _plain_detail(detail) -> str:
    if isinstance(detail, list | tuple):
        return " ".join(_plain_detail(d) for d in detail)
    if isinstance(detail, dict):
        return " ".join(f"{k}: {_plain_detail(v)}" for k, v in detail.items())
    return str(detail)


# --- The OpenAI-compatible API (/v1/) --------------------------------------------------------------
class UnknownModel(NotFound):
    default_code = "model_not_found"
    default_detail = "This server serves another model: GET /v1/models names it."


class DimensionsUnsupported(BadRequest):
    default_code = "dimensions_unsupported"


# --- The wearable API (wearable/) ------------------------------------------------------------------
class NoImage(BadRequest):
    default_code = "no_image"
    default_detail = "Send exactly one image file part; the request has none."


class TooManyImages(BadRequest):
    default_code = "too_many_images"
    default_detail = "Send exactly one image file part; the request has more than one."


class UnexpectedText(BadRequest):
    default_code = "unexpected_text"
    default_detail = "This endpoint takes one image file part and no text part."


class NoCategories(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "no_categories"
    default_detail = "No wearable category is enabled: enable some in the admin (Wearable categories > Categories)."


class UnknownRequestId(NotFound):
    default_code = "unknown_request_id"
    default_detail = "No wearable answer has this request_id."


class UnknownCategory(BadRequest):
    default_code = "unknown_category"


class InvalidFeedback(BadRequest):
    default_code = "invalid_feedback"


class DatabaseUnavailable(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "database_unavailable"
    default_detail = "The database is not answering; try again in a few seconds."
    retry_after = 5


# Answered by the server's edge (clipsite/workers.py) before the application sees a request, and the
# connection closed: on any path, never in an endpoint's own answers.
class MalformedHttp(BadRequest):
    default_code = "malformed_http"
    default_detail = "The request is not valid HTTP/1.1."


class RequestTimeout(ApiError):
    status_code = status.HTTP_408_REQUEST_TIMEOUT
    default_code = "request_timeout"
    default_detail = "The client took too long to send its request."


class UriTooLong(ApiError):
    status_code = status.HTTP_414_REQUEST_URI_TOO_LONG
    default_code = "uri_too_long"
    default_detail = "The request line is too long."


class HeadersTooLarge(ApiError):
    status_code = status.HTTP_431_REQUEST_HEADER_FIELDS_TOO_LARGE
    default_code = "headers_too_large"
    default_detail = "The request's headers are too large."


EDGE_ERRORS = (MalformedHttp, RequestTimeout, UriTooLong, HeadersTooLarge)
