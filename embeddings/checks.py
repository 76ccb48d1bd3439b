"""System checks: each bad configuration value stops the start with its own id, naming the variable."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def check_environment(app_configs=None, **kwargs):
    return [
        checks.Error(problem.message, hint=problem.hint, obj=problem.variable, id=problem.check_id)
        for problem in settings.CLIPSITE_PROBLEMS
    ]
