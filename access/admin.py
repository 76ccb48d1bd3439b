"""API keys in admin: a key is shown once, when it is created; revoking refuses it within seconds."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from access.models import ApiKey
from access.services import api_key_create, api_key_revoke


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("name",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ("name", "prefix", "created_at", "revoked_at", "is_active")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at", "revoked_at")
    actions = ("revoke",)

    @admin.display(boolean=True, description="active")
    def is_active(self, obj: ApiKey) -> bool:
        return obj.active

    def get_fields(self, request, obj=None):
        return ("name",) if obj is None else ("name", "prefix", "created_at", "revoked_at")

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = api_key_create(name=form.cleaned_data["name"])
        obj.pk, obj.prefix, obj.digest, obj.created_at = key.pk, key.prefix, key.digest, key.created_at
        messages.warning(request, f"The new key for {key.name}, shown only this once: {raw}")

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            api_key_revoke(key=key)
        messages.success(request, f"Revoked {len(keys)} key(s) at {timezone.now():%Y-%m-%d %H:%M} UTC.")
