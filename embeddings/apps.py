from __future__ import annotations

import logging
import os
import sys

from django.apps import AppConfig

logger = logging.getLogger(__name__)

# Exit status that makes gunicorn's master stop instead of restarting the worker (APP_LOAD_ERROR);
# Django's autoreloader also stops on it.
EXIT_MODEL_LOAD_FAILED = 4


class EmbeddingsConfig(AppConfig):
    name = "embeddings"
    verbose_name = "CLIP embeddings"

    def ready(self) -> None:
        from embeddings import checks  # noqa: F401  (registers the system checks)

    @staticmethod
    def warm_up() -> None:
        """Start loading the model in the background, once per process (a server's start calls this).

        Idempotent, and never touches the database. A model that cannot be loaded ends the process
        with a non-zero status: a configured model never silently falls back.
        """
        from django.conf import settings

        from embeddings.conf import runtime_config
        from embeddings.runtime.state import runtime

        if not settings.CLIP_WARMUP:
            return

        def die(exc: Exception) -> None:
            sys.stderr.write(f"clipsite: cannot load the model: {exc}\n")
            sys.stderr.flush()
            os._exit(EXIT_MODEL_LOAD_FAILED)

        runtime.start(runtime_config(), on_failure=die)
