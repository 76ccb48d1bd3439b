"""Django admin: staff edit the categories (seen by every worker on its next request) and review answers."""

from __future__ import annotations

import csv
import json

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Prefetch
from django.http import HttpResponse
from django.utils import timezone

from embeddings.runtime.state import runtime
from wearable import services
from wearable.models import Category, CategoryEmbedding, Feedback, Prediction

MODEL_NOT_LOADED = "model not loaded"


def model_in_use() -> str | None:
    """The name of the model this process serves, or None while it is not loaded."""
    return runtime.engine().name if runtime.ready else None


def _errors_as_messages(request, form, prefix: str = "") -> None:
    for field, errors in form.errors.items():
        label = form.fields[field].label if field in form.fields else None
        for error in errors:
            messages.error(request, f"{prefix}{label or field}: {error}" if field != "__all__" else f"{prefix}{error}")


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ("name", "enabled", "display_order", "prompts_used", "vector_cached", "updated_at")
    list_display_links = ("name",)
    list_editable = ("enabled", "display_order")
    list_filter = ("enabled",)
    search_fields = ("name", "prompts")
    ordering = ("display_order", "name")
    fields = ("name", "enabled", "display_order", "prompts")
    actions = ("enable_categories", "disable_categories")
    list_per_page = 200

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        name = model_in_use()
        if name is None:
            return queryset
        stored = CategoryEmbedding.objects.filter(model_name=name).only("id", "category_id", "prompt")
        return queryset.prefetch_related(Prefetch("embeddings", queryset=stored, to_attr="embeddings_in_use"))

    @admin.display(description="prompts")
    def prompts_used(self, obj: Category) -> str:
        texts = obj.prompt_texts()
        source = "own" if obj.prompts.strip() else "templates"
        return f"{len(texts)} ({source}): {texts[0]}" + (" ..." if len(texts) > 1 else "")

    @admin.display(description="vector cached for the model in use")
    def vector_cached(self, obj: Category) -> str:
        stored = getattr(obj, "embeddings_in_use", None)
        if stored is None:
            return MODEL_NOT_LOADED
        return "yes" if set(obj.prompt_texts()) <= {e.prompt for e in stored} else "no (computed on first use)"

    def changelist_view(self, request, extra_context=None):
        extra_context = {"subtitle": f"Model in use: {model_in_use() or MODEL_NOT_LOADED}", **(extra_context or {})}
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        formset = getattr(changelist, "formset", None)
        if request.method == "POST" and formset is not None and formset.errors:
            for form in formset.forms:
                _errors_as_messages(request, form, prefix=f"{form.instance}: ")
        return response

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if request.method == "POST":
            _errors_as_messages(request, context["adminform"].form)
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def save_model(self, request, obj, form, change):
        try:
            services.category_save(category=obj)
        except ValidationError as exc:
            self.message_user(request, " ".join(exc.messages), level=messages.ERROR)

    @admin.action(description="Enable the selected categories", permissions=["change"])
    def enable_categories(self, request, queryset):
        changed = services.category_set_enabled(categories=queryset, enabled=True)
        self.message_user(request, f"Enabled {changed} categor{'y' if changed == 1 else 'ies'}.", messages.SUCCESS)

    @admin.action(description="Disable the selected categories", permissions=["change"])
    def disable_categories(self, request, queryset):
        changed = services.category_set_enabled(categories=queryset, enabled=False)
        self.message_user(request, f"Disabled {changed} categor{'y' if changed == 1 else 'ies'}.", messages.SUCCESS)


class AnswerWasWrongFilter(admin.SimpleListFilter):
    """Wrong: the latest feedback does not list the answer's top-1 category among the right ones."""

    title = "answer was wrong"
    parameter_name = "answer_was_wrong"

    def lookups(self, request, model_admin):
        return (("yes", "Yes"), ("no", "No"), ("none", "No feedback"))

    def queryset(self, request, queryset):
        value = self.value()
        if value == "yes":
            return queryset.filter(answer_was_wrong=True)
        if value == "no":
            return queryset.filter(answer_was_wrong=False)
        if value == "none":
            return queryset.filter(answer_was_wrong__isnull=True)
        return queryset


class FeedbackInline(admin.TabularInline):
    model = Feedback
    fields = ("created_at", "categories", "answer_was_wrong")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = ("created_at", "request_id", "top_answer", "feedback_categories", "answer_was_wrong", "model_name")
    list_filter = (AnswerWasWrongFilter, "model_name", "created_at")
    search_fields = ("request_id", "image_sha256")
    date_hierarchy = "created_at"
    fields = (
        "request_id",
        "created_at",
        "model_name",
        "top_categories",
        "scores",
        "image_sha256",
        "image_stored",
        "answer_was_wrong",
    )
    readonly_fields = fields
    inlines = (FeedbackInline,)
    actions = ("export_csv", "export_jsonl")

    def get_queryset(self, request):
        return super().get_queryset(request).defer("image").prefetch_related("feedback")

    def has_add_permission(self, request):
        return False

    @admin.display(description="answer")
    def top_answer(self, obj: Prediction) -> str:
        return ", ".join(obj.top_categories)

    @admin.display(description="feedback: right categories")
    def feedback_categories(self, obj: Prediction) -> str:
        feedback = list(obj.feedback.all())
        return ", ".join(feedback[-1].categories) if feedback else "-"

    @admin.display(description="image stored", boolean=True)
    def image_stored(self, obj: Prediction) -> bool:
        return Prediction.objects.filter(pk=obj.pk, image__isnull=False).exists()

    @admin.action(description="Export as CSV (with feedback)")
    def export_csv(self, request, queryset):
        rows = services.prediction_export_rows(predictions=queryset)
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{_export_name("csv")}"'
        writer = csv.writer(response)
        writer.writerow(services.EXPORT_FIELDS)
        for row in rows:
            writer.writerow([_csv_cell(row[field]) for field in services.EXPORT_FIELDS])
        return response

    @admin.action(description="Export as JSON Lines (with feedback)")
    def export_jsonl(self, request, queryset):
        rows = services.prediction_export_rows(predictions=queryset)
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        response = HttpResponse(body, content_type="application/x-ndjson; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{_export_name("jsonl")}"'
        return response


# A spreadsheet runs a cell starting with one of these as a formula (OWASP's CSV injection advice).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, list | dict | bool):
        return json.dumps(value, ensure_ascii=False)  # starts with [, {, t or f: never a formula
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        # Only text: a number such as -3.5 is no formula. The JSON Lines export keeps the raw text.
        return "'" + value
    return value


def _export_name(extension: str) -> str:
    return f"wearable-predictions-{timezone.now():%Y%m%d-%H%M%S}.{extension}"
