"""System checks: a bad configuration stops the start with a message naming the variable."""

from __future__ import annotations

from django.core import checks

from clipsite.env import CONFIG_ERRORS


@checks.register(checks.Tags.compatibility)
def check_environment(app_configs=None, **kwargs):
    return [
        checks.Error(
            message,
            hint=f"Fix or unset the environment variable {name}; README.md lists the accepted values.",
            obj=name,
            id="embeddings.E001",
        )
        for name, message in CONFIG_ERRORS
    ]
