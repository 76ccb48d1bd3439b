"""API keys in admin: a key is shown once, in the page that answers its creation; revoking refuses it
within seconds.

The key is rendered into that one response and kept nowhere else: not in a message (Django's messages
travel in a cookie, or in the session), not in the session, not in a redirect's URL.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse
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
        obj.raw_key = raw  # this request's object only: response_add renders it, nothing stores it

    def response_add(self, request, obj, post_url_continue=None):
        # Answered here, not redirected: a redirect would need the key to travel to the next request.
        # The admin marks its pages never_cache (no-store), this one included.
        return TemplateResponse(
            request,
            "admin/access/apikey/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": f"API key {obj.name} created",
                "key": obj,
                "raw_key": obj.raw_key,
            },
        )

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            api_key_revoke(key=key)
        messages.success(request, f"Revoked {len(keys)} key(s) at {timezone.now():%Y-%m-%d %H:%M} UTC.")
