"""The OpenAPI description of the API (drf-spectacular): answer shapes, error codes, the health probes.

The serializers here describe answers only; no view runs them. The error codes are read from the one
error table (embeddings/errors.py), so a code added there is documented here without another edit.
"""

from __future__ import annotations

from collections import defaultdict

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

from clipsite.config import current
from embeddings import errors

# The errors only the wearable endpoints raise, and only feedback: the rest may come from any endpoint.
WEARABLE_ERRORS = (
    errors.NoImage,
    errors.TooManyImages,
    errors.UnexpectedText,
    errors.NoCategories,
    errors.DatabaseUnavailable,
)
FEEDBACK_ERRORS = (errors.UnknownRequestId, errors.UnknownCategory, errors.InvalidFeedback)
OPENAI_ERRORS = (errors.UnknownModel, errors.DimensionsUnsupported)
# What a multipart endpoint never answers: a JSON body's error, and 404 (its path exists).
NOT_FROM_PARTS = (errors.NotFound, errors.MalformedRequest)
# What feedback never answers: errors of parts (ours is not its multipart reader), images and the model.
NOT_FROM_FEEDBACK = (
    errors.EmptyRequest,
    errors.EmptyText,
    errors.InvalidText,
    errors.TextTooLong,
    errors.InvalidImage,
    errors.DuplicateKey,
    errors.InvalidKey,
    errors.InvalidParameter,
    errors.MalformedMultipart,
    errors.FileTooLarge,
    errors.ImageTooLarge,
    errors.RequestTooManyPixels,
    errors.TooManyParts,
    errors.KeyTooLong,
    errors.UnsupportedImage,
    errors.NotReady,
    errors.Overloaded,
    errors.Timeout,
)


# Bases that only group a status: never raised themselves.
_ABSTRACT = (errors.ApiError, errors.TooLarge)


def _error_classes(base: type[errors.ApiError] = errors.ApiError) -> list[type[errors.ApiError]]:
    """Every error class of the table, in the order errors.py declares them."""
    found = [] if base in _ABSTRACT else [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found


def _drf_only() -> list[tuple[str, int]]:
    """DRF's own errors that api_exception_handler maps onto a code of no class here: the API keys'
    and the rate limit's (access/)."""
    ours = {cls.default_code for cls in _error_classes()}
    return [(code, cls.status_code) for cls, code in errors._DRF_CODES.items() if code not in ours]


def _codes_by_status(entries) -> dict[int, list[str]]:
    by_status = defaultdict(list)
    for code, status in entries:
        if code not in by_status[status]:
            by_status[status].append(code)
    return dict(by_status)


def error_table() -> dict[str, int]:
    """Every error code the API may answer with, and its HTTP status."""
    return {code: status for code, status in [(c.default_code, c.status_code) for c in _error_classes()] + _drf_only()}


# The schema's enum of codes (SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"] names it ErrorCodeEnum).
ERROR_CODES = sorted(error_table())
ENCODINGS = ["float", "base64"]  # the embeddings endpoint's encoding, the OpenAI one's encoding_format


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.ChoiceField(choices=ERROR_CODES, help_text="Stable: clients may branch on it.")
    message = serializers.CharField(help_text="For people; may change.")
    key = serializers.CharField(allow_null=True, help_text="The part (or parameter) at fault, where there is one.")


class ErrorSerializer(serializers.Serializer):
    """The one shape of every error of the API."""

    request_id = serializers.CharField(allow_null=True)
    error = ErrorDetailSerializer()


_STATUS_WORDS = {
    400: "The request is not valid",
    401: "No valid API key (with CLIP_REQUIRE_API_KEY), or a wrong or revoked one",
    403: "Not allowed",
    404: "Not found",
    405: "Another method than POST",
    406: "An Accept header the API cannot answer",
    413: "Over a limit",
    415: "Not a media type (or image format) the endpoint takes",
    429: "Over CLIP_RATE_LIMIT: retry after the Retry-After header's seconds",
    500: "A fault of the server's, logged with the request id",
    503: "Not ready or over capacity: retry after the Retry-After header's seconds",
    504: "The request waited longer than the server's deadline for the model (Retry-After)",
}


def error_responses(*, extra=(), without=(), serializer=None) -> dict[int, OpenApiResponse]:
    """The error responses of an operation: the generic errors less ``without``, plus ``extra``; each
    status with the codes it may carry."""
    generic = [c for c in _error_classes() if not issubclass(c, WEARABLE_ERRORS + FEEDBACK_ERRORS + OPENAI_ERRORS)]
    classes = [c for c in generic if not issubclass(c, tuple(without))] + list(extra)
    entries = [(c.default_code, c.status_code) for c in classes] + _drf_only()
    return {
        status: OpenApiResponse(
            serializer or ErrorSerializer,
            description=f"{_STATUS_WORDS.get(status, 'Error')}. Codes: " + ", ".join(f"`{c}`" for c in codes) + ".",
        )
        for status, codes in sorted(_codes_by_status(entries).items())
    }


def errors_description() -> str:
    """The table of error codes, for the schema's description."""
    rows = "\n".join(
        f"| {status} | {', '.join(f'`{c}`' for c in codes)} |"
        for status, codes in sorted(_codes_by_status(error_table().items()).items())
    )
    return (
        "Every error has one shape: "
        '`{"request_id": str | null, "error": {"code": str, "message": str, "key": str | null}}`, '
        "`key` naming the part at fault where there is one.\n\n| status | codes |\n|---|---|\n" + rows
    )


# --- Request parts ---------------------------------------------------------------------------------
REQUEST_ID_HEADER = OpenApiParameter(
    "request_id",
    str,
    OpenApiParameter.HEADER,
    description=(
        "The client's id of the request (also read from `Request-Id` and `X-Request-ID`): echoed in the answer "
        "when it is 1 to 128 printable ASCII characters, else a fresh UUID4 is used."
    ),
)
REQUEST_ID_ECHO = OpenApiParameter(
    "request_id", str, OpenApiParameter.HEADER, response=True, description="The request's id, as in the body."
)

MULTIPART_PARTS = {
    "type": "object",
    "description": (
        "Any keys, each once: a part with a filename is an image (JPEG, PNG, WebP, GIF, BMP, TIFF), "
        "a part without one is a text (UTF-8)."
    ),
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "An image file (any key)."},
        "text": {"type": "string", "description": "A text (any key)."},
    },
    "additionalProperties": {"type": "string", "description": "More texts (or images, sent with a filename)."},
}


# --- Answers -------------------------------------------------------------------------------------
@extend_schema_field(
    {
        "oneOf": [
            {"type": "array", "items": {"type": "number", "format": "float"}},
            {"type": "string", "format": "byte"},
        ],
        "description": "float32 numbers (`encoding=float`), or base64 of little-endian float32 (`encoding=base64`).",
    }
)
class VectorField(serializers.Field):
    pass


class SimilaritySerializer(serializers.Serializer):
    image = serializers.CharField()
    text = serializers.CharField()
    score = serializers.FloatField(help_text="100 x cosine similarity, 2 decimals.")


class EmbeddingsAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    model = serializers.CharField()
    dim = serializers.IntegerField()
    normalized = serializers.BooleanField()
    encoding = serializers.ChoiceField(choices=ENCODINGS)
    texts_vectors = serializers.ListField(child=VectorField(), help_text="In the order the text parts came.")
    images_vectors = serializers.ListField(child=VectorField(), help_text="In the order the image parts came.")
    texts_keys = serializers.ListField(child=serializers.CharField())
    images_keys = serializers.ListField(child=serializers.CharField())
    vectors = serializers.DictField(child=VectorField(), help_text="Every part's vector, by its key.")
    similarities = serializers.ListField(
        child=SimilaritySerializer(), help_text="Pairs whose keys agree after `image` / `text` (`image-1`, `text-1`)."
    )
    similarity_matrix = serializers.ListField(
        child=serializers.ListField(child=serializers.FloatField()),
        required=False,
        help_text="Images x texts, 100 x cosine: present when both kinds came.",
    )
    truncated = serializers.ListField(
        child=serializers.CharField(), help_text="Keys of texts longer than the model's context, which were cut."
    )


embeddings_schema = extend_schema_view(
    post=extend_schema(
        summary="Vectors of any mix of images and texts, and their similarities",
        tags=["embeddings"],
        request={"multipart/form-data": MULTIPART_PARTS},
        parameters=[
            OpenApiParameter("normalize", bool, default=True, description="L2-normalised vectors, or raw projections."),
            OpenApiParameter(
                "encoding",
                str,
                enum=["float", "base64"],
                default="float",
                description="`base64`: each vector as base64 of little-endian float32.",
            ),
            REQUEST_ID_HEADER,
            REQUEST_ID_ECHO,
        ],
        responses={
            200: OpenApiResponse(EmbeddingsAnswerSerializer, description="A vector per part, keyed as sent."),
            **error_responses(without=NOT_FROM_PARTS),
        },
    )
)


# --- The health probes (plain Django views, answered by the edge middleware) ---------------------
class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok"])


class WorkersSerializer(serializers.Serializer):
    ready = serializers.IntegerField()
    loading = serializers.IntegerField(help_text="Taking connections while their model still loads.")


WORKERS_HELP = "Under gunicorn: this server's workers. Ready only once none that takes connections still loads."
DATABASE_HELP = (
    "What this process's last probe of the database found (probed every 10 s at most, in the background; "
    "unknown before the first ends). Shown only: a database that is down never fails readiness."
)


class NotReadySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["idle", "loading", "draining", "failed"])
    ready = serializers.BooleanField()
    database = serializers.ChoiceField(choices=["ok", "unavailable", "unknown"], help_text=DATABASE_HELP)
    workers = WorkersSerializer(required=False, help_text=WORKERS_HELP)
    error = serializers.CharField(required=False, help_text="With verbose=1: why loading failed.")


VERBOSE_HELP = "Only with verbose=1 (an API key or a staff login)."


class CpuSerializer(serializers.Serializer):
    model = serializers.CharField(required=False)
    cores = serializers.IntegerField(required=False)
    flags = serializers.ListField(child=serializers.CharField(), required=False)
    amx = serializers.BooleanField(required=False)
    native_bf16 = serializers.BooleanField(required=False)
    device = serializers.CharField(required=False)


class MeasuredSerializer(serializers.Serializer):
    backend = serializers.CharField()
    dtype = serializers.CharField()
    runs = serializers.CharField(required=False, help_text="The dtype it really computes in on this CPU.")
    parity = serializers.DictField(child=serializers.FloatField(), required=False)
    ms_per_item = serializers.DictField(
        child=serializers.FloatField(), required=False, help_text="Per tower, on a short batch, best of 3."
    )
    skipped = serializers.CharField(required=False)
    error = serializers.CharField(required=False)


class ReadySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ready"])
    ready = serializers.BooleanField()
    database = serializers.ChoiceField(choices=["ok", "unavailable", "unknown"], help_text=DATABASE_HELP)
    workers = WorkersSerializer(required=False, help_text=WORKERS_HELP)
    model = serializers.CharField(help_text="Its served name (CLIP_SERVED_MODEL_NAME): what answers call it.")
    source = serializers.CharField(required=False, help_text=f"CLIP_MODEL: a hub id or a folder. {VERBOSE_HELP}")
    family = serializers.CharField(required=False, help_text=VERBOSE_HELP)
    dim = serializers.IntegerField(required=False, help_text=VERBOSE_HELP)
    device = serializers.CharField(required=False, help_text=VERBOSE_HELP)
    test_model = serializers.BooleanField(required=False, help_text=f"A random-weight test model. {VERBOSE_HELP}")
    ready_seconds = serializers.FloatField(required=False, help_text=VERBOSE_HELP)
    process_seconds_to_ready = serializers.FloatField(required=False, help_text=VERBOSE_HELP)
    backend = serializers.DictField(
        child=serializers.CharField(), required=False, help_text=f'Per tower, e.g. "onnx/float32". {VERBOSE_HELP}'
    )
    parity = serializers.DictField(
        child=serializers.FloatField(),
        required=False,
        help_text=f"Per tower, cosine to float32 PyTorch. {VERBOSE_HELP}",
    )
    faithful = serializers.BooleanField(required=False, help_text=VERBOSE_HELP)
    why = serializers.CharField(required=False, help_text=VERBOSE_HELP)
    cpu = CpuSerializer(
        required=False,
        help_text=f"What the CPU offers, as prepare_model found it (on a GPU: the device). {VERBOSE_HELP}",
    )
    measured = MeasuredSerializer(
        many=True,
        required=False,
        help_text=f"Each backend/dtype prepare_model tried, and what it measured. {VERBOSE_HELP}",
    )


class HealthzSchemaView(APIView):
    """``GET /healthz`` in the schema, never routed: the edge middleware answers with embeddings.views.healthz."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="The process serves",
        description="Answered whatever the Host header, before any other check.",
        tags=["health"],
        operation_id="healthz",
        responses={200: HealthSerializer},
    )
    def get(self, request):
        from embeddings.views import healthz

        return healthz(request._request)


class ReadyzSchemaView(APIView):
    """``GET /readyz`` in the schema, never routed: the edge middleware answers with embeddings.views.readyz."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="The model is loaded and has embedded a warm-up input",
        description=(
            "Whether this server serves, and the model's served name; 503 before it is ready. Never touches the "
            "database. With verbose=1 and an API key or a staff login: the model's source, its backend per tower, "
            "their measured parity and why, the CPU and the timings; without either, verbose=1 is 403."
        ),
        tags=["health"],
        operation_id="readyz",
        parameters=[
            OpenApiParameter("verbose", bool, default=False, description="The details (an API key or a staff login).")
        ],
        responses={
            200: ReadySerializer,
            403: OpenApiResponse(ErrorSerializer, description="verbose=1 without an API key or a staff login."),
            503: OpenApiResponse(NotReadySerializer, description="The model is not loaded (yet)."),
        },
    )
    def get(self, request):
        from embeddings.views import readyz

        return readyz(request._request)


# --- Hooks (SPECTACULAR_SETTINGS) ------------------------------------------------------------------
def documented_endpoints(endpoints):
    """PREPROCESSING_HOOKS: the canonical paths only (not the trailing-slash aliases), and the probes."""
    kept = [e for e in endpoints if not e[0].endswith("/")]
    return kept + [
        ("/healthz", r"^healthz$", "GET", HealthzSchemaView.as_view()),
        ("/readyz", r"^readyz$", "GET", ReadyzSchemaView.as_view()),
    ]


def describe_errors(result, generator, request, public):
    """POSTPROCESSING_HOOKS: the table of error codes, from embeddings/errors.py, in the description."""
    info = result.setdefault("info", {})
    info["description"] = (info.get("description", "") + "\n\n" + errors_description()).strip()
    return result


# --- API keys (access/) -----------------------------------------------------------------------------
class ApiKeyScheme(OpenApiAuthenticationExtension):
    """How a client presents its key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""

    target_class = "access.authentication.ApiKeyAuthentication"
    match_subclasses = True  # the OpenAI-compatible paths' (which take an unknown key as none where none is required)
    name = ["ApiKey", "ApiKeyHeader"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "An API key (`create_api_key`, or the admin)."},
            {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, another header."},
        ]

    def get_security_requirement(self, auto_schema):
        either = [{"ApiKey": []}, {"ApiKeyHeader": []}]
        # Without CLIP_REQUIRE_API_KEY a request without a key is served too (a wrong key never is).
        return either if current().access.require_api_key else [*either, {}]


# --- The OpenAI-compatible API (/v1/) --------------------------------------------------------------
class OpenAiErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField(help_text="OpenAI's error type, from the status.")
    param = serializers.CharField(allow_null=True, help_text="The field (or input[i]) at fault, where there is one.")
    code = serializers.ChoiceField(choices=ERROR_CODES, help_text="The same stable codes as the rest of the API.")


class OpenAiErrorSerializer(serializers.Serializer):
    """An error on /v1/: OpenAI's shape, so its SDKs raise their own exceptions with our message."""

    request_id = serializers.CharField(allow_null=True)
    error = OpenAiErrorDetailSerializer()


class OpenAiEmbeddingsRequestSerializer(serializers.Serializer):
    model = serializers.CharField(required=False, help_text="The served model (GET /v1/models); may be left out.")
    input = serializers.JSONField(
        help_text="A string or a list of strings. A `data:image/<type>;base64,...` string is an image, any other "
        "a text; one list may mix both, and the answer keeps its order."
    )
    encoding_format = serializers.ChoiceField(choices=ENCODINGS, required=False, default="float")
    dimensions = serializers.IntegerField(
        required=False, help_text="Only the model's own dimension: shortening is not offered (dimensions_unsupported)."
    )
    user = serializers.CharField(required=False, help_text="Accepted, and not used.")


class OpenAiEmbeddingSerializer(serializers.Serializer):
    object = serializers.CharField(help_text='Always "embedding".')
    index = serializers.IntegerField()
    embedding = VectorField()


class OpenAiUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(help_text="Tokens the model read, over the texts (images count 0).")
    total_tokens = serializers.IntegerField()


class OpenAiEmbeddingsAnswerSerializer(serializers.Serializer):
    object = serializers.CharField(help_text='Always "list".')
    data = OpenAiEmbeddingSerializer(many=True, help_text="L2-normalised, in the order of input.")
    model = serializers.CharField()
    usage = OpenAiUsageSerializer()


class OpenAiModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text='Always "model".')
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class OpenAiModelsSerializer(serializers.Serializer):
    object = serializers.CharField(help_text='Always "list".')
    data = OpenAiModelSerializer(many=True)


def _openai_errors(extra=(), without=()) -> dict[int, OpenApiResponse]:
    return error_responses(extra=extra, without=(*NOT_FROM_PARTS[:1], *without), serializer=OpenAiErrorSerializer)


# What a JSON endpoint never answers: the multipart reader's errors.
_NOT_FROM_JSON = (errors.MalformedMultipart, errors.DuplicateKey, errors.InvalidKey, errors.KeyTooLong)
# What listing the model never answers: anything about inputs.
_NOT_FROM_MODELS = (
    *_NOT_FROM_JSON,
    *NOT_FROM_FEEDBACK,
    errors.MalformedRequest,
    errors.RequestTooLarge,
    errors.InvalidContentLength,
    errors.UnsupportedMediaType,
)

openai_embeddings_schema = extend_schema_view(
    post=extend_schema(
        summary="OpenAI-compatible: vectors of texts and images, in input's order",
        description="For tools that speak OpenAI's embeddings API: point their base URL at this server's /v1.",
        tags=["openai"],
        operation_id="openai_embeddings",
        request=OpenAiEmbeddingsRequestSerializer,
        parameters=[REQUEST_ID_HEADER, REQUEST_ID_ECHO],
        responses={
            200: OpenApiResponse(OpenAiEmbeddingsAnswerSerializer, description="A vector per input, in order."),
            **_openai_errors(extra=(*OPENAI_ERRORS, errors.DatabaseUnavailable), without=_NOT_FROM_JSON),
        },
    )
)
openai_models_schema = extend_schema_view(
    get=extend_schema(
        summary="OpenAI-compatible: the served model",
        tags=["openai"],
        operation_id="openai_models",
        responses={200: OpenAiModelsSerializer, **_openai_errors(without=_NOT_FROM_MODELS)},
    )
)
openai_model_schema = extend_schema_view(
    get=extend_schema(
        summary="OpenAI-compatible: the served model, by its id",
        tags=["openai"],
        operation_id="openai_model",
        responses={
            200: OpenAiModelSerializer,
            **_openai_errors(extra=(errors.UnknownModel,), without=_NOT_FROM_MODELS),
        },
    )
)
