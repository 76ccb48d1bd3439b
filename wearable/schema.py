"""The OpenAPI description of the wearable API and its feedback (drf-spectacular); answers only."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers

from embeddings.schema import (
    FEEDBACK_ERRORS,
    NOT_FROM_FEEDBACK,
    NOT_FROM_PARTS,
    REQUEST_ID_ECHO,
    REQUEST_ID_HEADER,
    WEARABLE_ERRORS,
    error_responses,
)

ONE_IMAGE = {
    "type": "object",
    "description": "Exactly one image part, under any key, and nothing else.",
    "properties": {"image": {"type": "string", "format": "binary", "description": "A photo (any key)."}},
    "required": ["image"],
    "additionalProperties": False,
}


class CategoryScoreSerializer(serializers.Serializer):
    category = serializers.CharField()
    score = serializers.FloatField(help_text="100 x cosine similarity, 2 decimals.")
    probability = serializers.FloatField(help_text="The family's zero-shot probability, 4 decimals.")


class WearableAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    model = serializers.CharField()
    top_categories = serializers.ListField(child=serializers.CharField(), help_text="Names, best first.")
    scores = serializers.ListField(child=CategoryScoreSerializer(), help_text="Best first.")


class FeedbackSerializer(serializers.Serializer):
    request_id = serializers.CharField(help_text="The request_id of a wearable answer.")
    categories = serializers.ListField(
        child=serializers.CharField(),
        help_text="The names that are right (any case; `[]`: none is). In a form, the field repeated.",
    )


class FeedbackAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    prediction_request_id = serializers.CharField()
    categories = serializers.ListField(child=serializers.CharField())
    top_categories = serializers.ListField(child=serializers.CharField())
    answer_was_wrong = serializers.BooleanField(help_text="Its top-1 category is not among the right ones.")


wearable_schema = extend_schema_view(
    post=extend_schema(
        summary="The top wearable categories in one photo",
        tags=["wearable"],
        request={"multipart/form-data": ONE_IMAGE},
        parameters=[
            OpenApiParameter(
                "top_k",
                {"type": "integer", "minimum": 1},
                description="How many categories, 1 to the number enabled (default WEARABLE_TOP_K); never clamped.",
            ),
            REQUEST_ID_HEADER,
            REQUEST_ID_ECHO,
        ],
        responses={
            200: OpenApiResponse(WearableAnswerSerializer, description="The top categories, best first."),
            **error_responses(extra=WEARABLE_ERRORS, without=NOT_FROM_PARTS),
        },
    )
)

feedback_schema = extend_schema_view(
    post=extend_schema(
        summary="Which categories are right for an earlier wearable answer",
        tags=["wearable"],
        request=FeedbackSerializer,  # JSON, or a form with `categories` repeated
        parameters=[REQUEST_ID_HEADER, REQUEST_ID_ECHO],
        responses={
            201: OpenApiResponse(FeedbackAnswerSerializer, description="Stored against the latest such answer."),
            **error_responses(extra=FEEDBACK_ERRORS, without=NOT_FROM_FEEDBACK),
        },
    )
)
