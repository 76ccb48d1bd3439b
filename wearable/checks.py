"""System checks of the wearable settings: a bad template stops the start, not the first request."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def check_prompt_templates(app_configs=None, **kwargs):
    templates = settings.WEARABLE_PROMPT_TEMPLATES
    if not templates:
        return [
            checks.Error(
                "WEARABLE_PROMPT_TEMPLATES is empty.",
                hint='Give at least one template, e.g. "a photo of a {}." (templates are separated by |).',
                obj="WEARABLE_PROMPT_TEMPLATES",
                id="wearable.E001",
            )
        ]
    return [
        checks.Error(
            f"The prompt template {template!r} has no {{}} for the category's name.",
            hint='Every template needs "{}", e.g. "a photo of a {}."; templates are separated by |.',
            obj="WEARABLE_PROMPT_TEMPLATES",
            id="wearable.E002",
        )
        for template in templates
        if "{}" not in template
    ]
