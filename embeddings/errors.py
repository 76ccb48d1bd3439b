"""One error tree for the API: each error carries its HTTP status and a stable code.

``api_exception_handler`` is the single table from exceptions to responses; views never catch.
"""

from __future__ import annotations

import logging

from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApiError(drf_exceptions.APIException):
    """Base of every error the API reports; ``key`` names the form part at fault, if any."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_request"
    default_detail = "The request is not valid."

    def __init__(self, message: str | None = None, *, key: str | None = None, code: str | None = None):
        self.message = message or self.default_detail
        self.key = key
        self.code = code or self.default_code
        super().__init__(detail=self.message, code=self.code)


class BadRequest(ApiError):
    pass


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


class MalformedRequest(BadRequest):
    default_code = "malformed_multipart"
    default_detail = "The body is not well-formed multipart/form-data."


class TooLarge(ApiError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"


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


class NotReady(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "not_ready"
    default_detail = "The model is still loading; try again in a few seconds."


class Overloaded(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "overloaded"
    default_detail = "The server is at capacity; try again shortly."


# DRF's own exceptions, mapped onto our stable codes.
_DRF_CODES = {
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.ParseError: "malformed_request",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.PermissionDenied: "permission_denied",
    drf_exceptions.NotAuthenticated: "not_authenticated",
    drf_exceptions.Throttled: "throttled",
}


def error_body(request_id: str | None, code: str, message: str, key: str | None = None) -> dict:
    return {"request_id": request_id, "error": {"code": code, "message": message, "key": key}}


def _request_id_of(context: dict) -> str | None:
    request = context.get("request")
    return getattr(request, "request_id", None) if request is not None else None


def api_exception_handler(exc: Exception, context: dict) -> Response:
    """DRF's EXCEPTION_HANDLER: every API error leaves in one JSON shape with the request_id."""
    request_id = _request_id_of(context)
    headers = {}
    exc = from_runtime(exc)
    if isinstance(exc, ApiError):
        status_code, code, message, key = exc.status_code, exc.code, exc.message, exc.key
        if isinstance(exc, NotReady | Overloaded):
            headers["Retry-After"] = "5"
    elif isinstance(exc, Http404):
        status_code, code, message, key = 404, "not_found", NotFound.default_detail, None
    elif isinstance(exc, drf_exceptions.APIException):
        status_code = exc.status_code
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), "bad_request")
        message, key = _plain_detail(exc.detail), None
        if isinstance(exc, drf_exceptions.MethodNotAllowed):
            allowed = context.get("view").allowed_methods if context.get("view") else []
            headers["Allow"] = ", ".join(allowed)
    else:
        logger.exception("Unhandled error in %s", context.get("view").__class__.__name__)
        status_code, code, key = 500, "internal_error", None
        message = "The server failed to handle this request; it has been logged."
    response = Response(error_body(request_id, code, message, key), status=status_code, headers=headers)
    if request_id:
        response["request_id"] = request_id
    return response


def from_runtime(exc: Exception) -> Exception:
    """The runtime knows nothing of HTTP: its two expected failures map onto API errors here."""
    from django.core.exceptions import RequestDataTooBig, SuspiciousOperation

    from embeddings.runtime.batching import QueueFull
    from embeddings.runtime.state import RuntimeNotReady

    if isinstance(exc, QueueFull):
        return Overloaded()
    if isinstance(exc, RequestDataTooBig):
        return TooLarge("The request body is over the size limit.", code="request_too_large")
    if isinstance(exc, SuspiciousOperation):  # too many fields or files, and Django's other guards
        return BadRequest("The request was refused: it exceeds one of the server's safety limits.")
    if isinstance(exc, RuntimeNotReady):
        return NotReady()
    return exc


def _plain_detail(detail) -> str:
    if isinstance(detail, list | tuple):
        return " ".join(_plain_detail(d) for d in detail)
    if isinstance(detail, dict):
        return " ".join(f"{k}: {_plain_detail(v)}" for k, v in detail.items())
    return str(detail)


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
