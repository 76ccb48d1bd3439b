"""The demo page at ``/`` and the short API reference at ``/api``.

With JavaScript the page posts straight to the API (static/demo/demo.js). Without it, its forms post
here, and this view calls the same services the API calls and renders their answer (or their error,
in plain words) into the page.
"""

from __future__ import annotations

import base64
import io
import math
import uuid

from django.http import HttpResponsePermanentRedirect
from django.shortcuts import render
from django.templatetags.static import static
from django.urls import path
from django.views.decorators.http import require_GET, require_http_methods

from access.authentication import demo_token, rate_limit_wait
from access.identity import client_identity
from clipsite.config import current
from embeddings import errors
from embeddings.multipart import Part
from embeddings.runtime.loading import default_served_name
from embeddings.runtime.state import runtime
from embeddings.services import embeddings_compute
from wearable.services import wearable_predict

EMBEDDINGS_URL = "/syte_test/embeddings"
WEARABLE_URL = "/syte_test/wearable"
TOP_K = 3
THUMBNAIL_SIDE = 320


def human_size(n: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def friendly_messages() -> dict[str, str]:
    """What the page says for each API error code (the script gets the same table)."""
    lim = current().limits
    return {
        "invalid_image": "That file isn't an image we can read. Try a JPEG or PNG.",
        "unsupported_image": "That image format isn't supported here. Try a JPEG or PNG.",
        "file_too_large": f"That file is too large: the limit is {human_size(lim.max_file_bytes)} per file.",
        "request_too_large": f"That's too much to upload at once: the limit is {human_size(lim.max_request_bytes)}.",
        "image_too_large": "That image has too many pixels. Try a smaller one.",
        "too_many_parts": f"That's too many images and texts at once: the limit is {lim.max_parts}.",
        "text_too_long": f"One of the texts is too long: the limit is {lim.max_text_words} words.",
        "invalid_text": "One of the texts isn't valid text.",
        "not_ready": "The model is still loading. Try again in a few seconds.",
        "overloaded": "The server is busy right now. Try again in a moment.",
        "throttled": "That's more requests than this server takes from you in a while. Try again in a minute.",
        "no_categories": "No wearable categories are set up yet: add some in the admin.",
        "database_unavailable": "The server's database isn't answering right now. Try again in a few seconds.",
        "no_image": "Choose an image first.",
        "too_many_images": "Choose one image at a time.",
        "compare_incomplete": "Add at least one image and one text to compare.",
        "network": "Couldn't reach the server. Check your connection and try again.",
        "unknown": "Something went wrong on our side. Try again, or try another image.",
    }


def friendly_message(code: str) -> str:
    messages = friendly_messages()
    return messages.get(code, messages["unknown"])


def model_status() -> dict:
    """What the banner shows: the model's name, and whether it is a random-weight test model."""
    if runtime.ready:
        engine = runtime.engine()
        return {"state": "ready", "name": engine.served_name, "is_test_model": engine.is_test_model}
    settings = current().runtime
    name = settings.served_model_name or default_served_name(settings.model)
    return {"state": "failed" if runtime.status == "failed" else "loading", "name": name or None}


def uploaded_part(upload, key: str) -> Part:
    """A part for the services from one of Django's uploads, under the API's per-file limit."""
    max_bytes = current().limits.max_file_bytes
    if upload.size > max_bytes:
        raise errors.FileTooLarge(f"Part {key!r} is over the limit of {max_bytes} bytes per file.", key=key)
    return Part(key, upload.read(), upload.name or "upload", upload.content_type)


def thumbnail_url(data: bytes) -> str | None:
    """A small JPEG data URL of an upload that decoded fine, so the no-script page shows the photo too."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - the service has already accepted it; a missing preview is fine
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def heat_style(value: float, low: float, high: float) -> str:
    """A cell's colour on the page's blue scale (demo.js's heatStyle draws the same)."""
    t = 0.5 if high == low else (value - low) / (high - low)
    lightness = round(96 - 48 * t)
    color = "#fff" if t > 0.55 else "#0b2540"
    return f"background-color: hsl(205, 75%, {lightness}%); color: {color}"


def wearable_result(request) -> dict:
    files = request.FILES.getlist("image")
    if not files:
        return {"error": friendly_message("no_image")}
    image = uploaded_part(files[0], "image")
    # The endpoint's default top_k (as the script gets): it adapts to a table of fewer categories.
    body = wearable_predict(parts=[image], request_id=str(uuid.uuid4()), client=client_identity(request))
    scores = [
        {**row, "percent": round(100 * row["probability"], 1), "width": max(1.0, round(100 * row["probability"], 1))}
        for row in body["scores"][:TOP_K]
    ]
    return {"filename": image.filename, "thumbnail": thumbnail_url(image.data), "scores": scores}


def compare_result(request) -> dict:
    files = request.FILES.getlist("images")
    texts = [line.strip() for line in request.POST.get("texts", "").splitlines() if line.strip()]
    if not files or not texts:
        return {"error": friendly_message("compare_incomplete")}
    # The keys demo.js sends too: image-1, image-2, ... and text-1, text-2, ...
    images = [uploaded_part(upload, f"image-{i}") for i, upload in enumerate(files, start=1)]
    text_parts = [Part(f"text-{j}", text.encode("utf-8")) for j, text in enumerate(texts, start=1)]
    body = embeddings_compute(parts=images + text_parts, request_id=str(uuid.uuid4()), client=client_identity(request))
    matrix = body["similarity_matrix"]
    low, high = min(min(row) for row in matrix), max(max(row) for row in matrix)
    rows = []
    for image, row in zip(images, matrix, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        cells = [
            {"score": f"{score:.2f}", "best": j == best, "style": heat_style(score, low, high)}
            for j, score in enumerate(row)
        ]
        rows.append(
            {"name": image.filename, "thumbnail": thumbnail_url(image.data), "cells": cells, "best_text": texts[best]}
        )
    return {"texts": texts, "rows": rows}


PANELS = {"wearable": wearable_result, "compare": compare_result}


def _staff(request) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


@require_http_methods(["GET", "POST"])
def index(request):
    """The demo page; a POST is its forms sent without JavaScript."""
    context = {
        "model": model_status(),
        "config": {
            "demoToken": demo_token(request.user) if _staff(request) else None,
            "embeddingsUrl": EMBEDDINGS_URL,
            "wearableUrl": WEARABLE_URL,
            "maxFileBytes": current().limits.max_file_bytes,
            "messages": friendly_messages(),
        },
        "max_file_size": human_size(current().limits.max_file_bytes),
        "embeddings_url": EMBEDDINGS_URL,
        "wearable_url": WEARABLE_URL,
    }
    status, wait = 200, None
    context["keys_required"] = current().access.require_api_key
    if request.method == "POST" and context["keys_required"] and not _staff(request):
        context["form_error"] = "This server wants an API key: log in to the admin as staff to use this page."
        return render(request, "demo/index.html", context, status=401)
    if request.method == "POST":
        panel = request.POST.get("panel")
        handler = PANELS.get(panel)
        if handler is None:
            context["form_error"] = "Choose one of the page's forms to send."
            return render(request, "demo/index.html", context, status=400)
        # The form runs the model as the API does, so CLIP_RATE_LIMIT counts it as the API would.
        wait = rate_limit_wait(request)
        try:
            if wait is not None:
                raise errors.Throttled("Over CLIP_RATE_LIMIT.")
            result = handler(request)
        except Exception as exc:  # noqa: BLE001 - the API's own table says which errors are the client's
            api_error = errors.as_api_error(exc)
            if not isinstance(api_error, errors.ApiError):
                raise
            result, status = {"error": friendly_message(api_error.code)}, api_error.status_code
        context[panel] = result
        context["texts_value"] = request.POST.get("texts", "")
        if "error" in result and status == 200:
            status = 400
    response = render(request, "demo/index.html", context, status=status)
    if wait is not None:
        response["Retry-After"] = str(max(1, math.ceil(wait)))
    return response


@require_GET
def api_reference(request):
    """A short reference of the two endpoints."""
    context = {"model": model_status(), "embeddings_url": EMBEDDINGS_URL, "wearable_url": WEARABLE_URL}
    return render(request, "demo/api.html", context)


def favicon(request):
    """Pages that name no icon (DRF's, the admin's) make browsers ask for /favicon.ico."""
    return HttpResponsePermanentRedirect(static("demo/favicon.svg"))


urlpatterns = [
    path("", index, name="demo"),
    path("api", api_reference, name="api-reference"),
    path("favicon.ico", favicon),
]
