"""Thin DRF views: parse, call a service, serialize."""

from __future__ import annotations

from django.db import DatabaseError
from django.http import HttpResponse, HttpResponseNotFound, JsonResponse
from django.views.decorators.http import require_safe
from rest_framework.renderers import BrowsableAPIRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from access.authentication import (
    ApiKeyAuthentication,
    ClientRateThrottle,
    DemoPageAuthentication,
    OpenAiKeyAuthentication,
    RequireApiKey,
    presented_key,
)
from access.identity import address_identity, client_identity
from access.services import TooManyFailedLookups, api_key_check
from clipsite import database
from clipsite.config import current
from embeddings import errors, metrics, openai_compat, services
from embeddings.multipart import ClipMultiPartParser, check_declared_length
from embeddings.parsers import InputsJSONParser
from embeddings.renderers import FastJSONRenderer
from embeddings.runtime.state import runtime
from embeddings.schema import embeddings_schema, openai_embeddings_schema, openai_model_schema, openai_models_schema
from embeddings.serializers import EmbeddingsForm, ImageUploadForm

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def bool_param(request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = _BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise errors.InvalidParameter(f"{name}={raw!r} is not a boolean: use true or false.", key=name)
    return value


def choice_param(request, name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.strip().lower() not in choices:
        raise errors.InvalidParameter(f"{name}={raw!r} is not one of: {', '.join(choices)}.", key=name)
    return raw.strip().lower()


class ClipApiView(APIView):
    """Base of the API's views: our multipart parser, JSON out (and DRF's page for browsers)."""

    parser_classes = [ClipMultiPartParser]
    renderer_classes = [FastJSONRenderer, BrowsableAPIRenderer]
    # Keys (and the demo page's staff token), never the session: so no CSRF check on API clients.
    authentication_classes = [ApiKeyAuthentication, DemoPageAuthentication]
    permission_classes = [RequireApiKey]
    throttle_classes = [ClientRateThrottle]
    # Read by DRF's browsable page only, to draw its HTML upload form; the views parse parts themselves.
    serializer_class = ImageUploadForm

    def body_limit(self) -> int | None:
        """A limit of this endpoint's own, below the request limit the edge middleware already enforces."""
        return None

    def initial(self, request, *args, **kwargs):
        # The edge middleware refused every body over the request limit; a stricter one is checked here,
        # still before the body is read.
        if request.method in ("POST", "PUT", "PATCH") and self.body_limit() is not None:
            check_declared_length(request.META, self.body_limit())
        super().initial(request, *args, **kwargs)

    def http_method_not_allowed(self, request, *args, **kwargs):
        # A browser opening the URL gets DRF's page with the upload form; any other GET stays a 405.
        if request.method == "GET" and isinstance(getattr(request, "accepted_renderer", None), BrowsableAPIRenderer):
            return Response({"detail": "Send a POST; the form below sends one from this page.", "docs": "/api"})
        return super().http_method_not_allowed(request, *args, **kwargs)

    def form_parts(self, request):
        data = request.data
        return list(getattr(data, "parts", []))

    def client_of(self, request) -> str:
        """Who asks, for the engine's fair share: the client the rate limit counts (access/identity.py)."""
        return client_identity(request)


@embeddings_schema
class EmbeddingsView(ClipApiView):
    """Embed any mix of images (file parts) and texts (plain fields), keyed as sent."""

    serializer_class = EmbeddingsForm

    def post(self, request):
        normalize = bool_param(request, "normalize", True)
        encoding = choice_param(request, "encoding", "float", services.ENCODINGS)
        body = services.embeddings_compute(
            parts=self.form_parts(request),
            request_id=request.request_id,
            normalize=normalize,
            encoding=encoding,
            client=self.client_of(request),
        )
        return Response(body)


class OpenAiView(ClipApiView):
    """The OpenAI-compatible API: a JSON body, JSON answers and errors in OpenAI's shape; the same
    keys, rate limit, limits and engine as the rest of the API."""

    parser_classes = [InputsJSONParser]
    renderer_classes = [FastJSONRenderer]
    authentication_classes = [OpenAiKeyAuthentication]
    serializer_class = None


@openai_embeddings_schema
class OpenAiEmbeddingsView(OpenAiView):
    """Embed texts and images (data:image/...;base64,... strings) given in one ``input`` list."""

    def post(self, request):
        return Response(openai_compat.embeddings_create(body=request.data, client=self.client_of(request)))


@openai_models_schema
class OpenAiModelsView(OpenAiView):
    """The served model."""

    def get(self, request):
        return Response(openai_compat.models_list())


@openai_model_schema
class OpenAiModelView(OpenAiView):
    """The served model, by its id."""

    def get(self, request, model_id: str):
        return Response(openai_compat.model_retrieve(model_id))


def healthz(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    """Readiness: short for anyone (status, workers, the model's served name), never touching the
    database; ``?verbose=1`` adds the details (the model's path, CPU flags, timings, what prepare_model
    measured) for a valid API key or a logged-in staff user, and is 403 for anyone else."""
    verbose = request.GET.get("verbose", "").strip().lower() in ("1", "true", "yes")
    if verbose:
        refused = _details_refused(request)
        if refused is not None:
            return refused
    ready, status, workers = runtime.readiness()
    # The database's state is shown, never a reason to fail: clipsite/database.py says why.
    body = {"status": status, "ready": ready, "database": database.probe.state()}
    if workers is not None:
        body["workers"] = workers
    if ready:
        body["model"] = runtime.engine().served_name
    if verbose and not ready and runtime.error:
        body["error"] = runtime.error
    if verbose and ready:
        engine, manifest = runtime.engine(), runtime.manifest
        body |= {
            "source": engine.name,
            "family": engine.info.family,
            "dim": engine.dim,
            "device": next(iter(engine.backends.values())).device,
            "test_model": engine.is_test_model,
            "ready_seconds": round(runtime.ready_seconds or 0.0, 3),
            "process_seconds_to_ready": round(runtime.process_seconds_to_ready or 0.0, 3),
            "backend": engine.describe(),
            "parity": manifest.parity,
            "faithful": manifest.faithful,
            "why": manifest.note,
            "cpu": manifest.cpu,
            "measured": [{k: v for k, v in c.items() if k not in ("files", "vocabulary")} for c in manifest.candidates],
        }
    return JsonResponse(body, status=200 if ready else 503)


def _details_refused(request) -> JsonResponse | None:
    """None when ``request`` may see /readyz's details: it carries a valid API key, or the session of an
    active staff user. Else the answer: 403, or 503 when the database cannot tell."""
    try:
        raw = presented_key(request)
        address = address_identity(request)  # its failed lookups count as the API's do
        allowed = api_key_check(raw=raw, address=address) is not None if raw is not None else _staff_session(request)
    except TooManyFailedLookups as exc:
        message = "Too many API keys sent from this address were not valid."
        response = JsonResponse(errors.error_body(None, errors.Throttled.default_code, message, status=429), status=429)
        response["Retry-After"] = str(max(1, int(exc.wait)))
        return response
    except DatabaseError:
        error = errors.DatabaseUnavailable()
        response = JsonResponse(
            errors.error_body(None, error.code, error.message, status=error.status_code), status=error.status_code
        )
        response["Retry-After"] = str(error.retry_after)
        return response
    if allowed:
        return None
    message = "The details of /readyz need an API key (Authorization: Bearer KEY) or a staff login."
    return JsonResponse(errors.error_body(None, errors.PermissionDenied.default_code, message, status=403), status=403)


def _staff_session(request) -> bool:
    """Whether the request's session cookie is a logged-in, active staff user's. The probes are answered
    before the session and auth middleware run (embeddings/middleware.py), so the session is read here."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import get_user

    key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if not key:
        return False
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(key)
    user = get_user(request)
    return bool(user.is_active and user.is_staff)


def api_not_found(request, *args, **kwargs):
    request_id = getattr(request, "request_id", None)
    body = errors.error_body(
        request_id, "not_found", errors.NotFound.default_detail, status=404, path=request.path_info
    )
    response = JsonResponse(body, status=404)
    response.error_code = "not_found"
    return response


@require_safe
def metrics_view(request):
    """Prometheus' text format, summed over the workers; 404 with CLIP_METRICS=false."""
    if not current().observability.metrics:
        return HttpResponseNotFound("Not Found", content_type="text/plain; charset=utf-8")
    body, content_type = metrics.exposition()
    return HttpResponse(body, content_type=content_type)
