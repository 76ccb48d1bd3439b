"""Thin DRF views of the wearable API: parse, call a service, serialize."""

from __future__ import annotations

import re

from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from clipsite.config import current
from embeddings import errors
from embeddings.parsers import SafeJSONParser
from embeddings.views import ClipApiView
from wearable import services
from wearable.schema import feedback_schema, wearable_schema

_WHOLE_NUMBER = re.compile(r"^\s*\d{1,9}\s*$")
_MAX_FEEDBACK_CATEGORIES = 1000


def int_param(request, name: str) -> int | None:
    """A whole-number query parameter, or None when absent; anything else is a 400 (never clamped)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not _WHOLE_NUMBER.match(raw):
        raise errors.InvalidParameter(f"{name}={raw[:40]!r} is not a whole number.", key=name)
    return int(raw)


@wearable_schema
class WearableView(ClipApiView):
    """The top wearable categories CLIP sees in one uploaded photo."""

    def post(self, request):
        top_k = int_param(request, "top_k")
        body = services.wearable_predict(
            parts=self.form_parts(request), request_id=request.request_id, top_k=top_k, client=self.client_of(request)
        )
        return Response(body)


def feedback_input(data) -> tuple[str, list[str]]:
    """``request_id`` and ``categories`` from a JSON object or a form (``categories`` repeated)."""
    if hasattr(data, "getlist"):  # a form: FormParser / MultiPartParser give a QueryDict
        request_id, categories = data.get("request_id"), data.getlist("categories") or None
    elif isinstance(data, dict):
        request_id, categories = data.get("request_id"), data.get("categories")
    else:
        raise errors.InvalidFeedback('The body must be a JSON object {"request_id": ..., "categories": [...]}.')
    if not isinstance(request_id, str) or not request_id.strip():
        raise errors.InvalidFeedback(
            '"request_id" must be given, as the request_id of a wearable answer (a string).', key="request_id"
        )
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise errors.InvalidFeedback(
            '"categories" must be given: a JSON list of category names, or a form field repeated once per name.',
            key="categories",
        )
    if len(categories) > _MAX_FEEDBACK_CATEGORIES:
        raise errors.InvalidFeedback(f"At most {_MAX_FEEDBACK_CATEGORIES} categories.", key="categories")
    return request_id.strip(), categories


@feedback_schema
class FeedbackView(ClipApiView):
    """The categories a user says are right for an earlier wearable answer."""

    parser_classes = [SafeJSONParser, FormParser, MultiPartParser]
    serializer_class = None  # a JSON body: DRF's raw-data form fits it

    def body_limit(self) -> int:
        # A request id and a few names: refused before reading when it declares more (the upload limit is
        # for images; parsing megabytes of JSON before checking its shape is pure cost).
        return current().limits.max_json_bytes

    def post(self, request):
        request_id, categories = feedback_input(request.data)
        feedback = services.feedback_create(request_id=request_id, categories=categories)
        body = {
            "request_id": request.request_id,
            "prediction_request_id": feedback.prediction.request_id,
            "categories": feedback.categories,
            "top_categories": feedback.prediction.top_categories,
            "answer_was_wrong": feedback.answer_was_wrong,
        }
        return Response(body, status=201)
