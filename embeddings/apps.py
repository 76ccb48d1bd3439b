from __future__ import annotations

import logging
import os
import signal
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
        """Start loading the model in the background, and the counters' log line, once per process (a
        server's start calls this).

        Idempotent, and never touches the database or the network: it loads what ``prepare_model``
        made. A model that cannot be loaded (or is not prepared) ends the process with a non-zero
        status and a message saying why: a configured model never silently falls back.
        """
        from clipsite.config import current
        from embeddings.runtime.state import runtime

        settings = current().runtime
        if not settings.warmup:
            return

        def die(exc: Exception) -> None:
            sys.stderr.write(f"clipsite: cannot load the model: {exc}\n")
            sys.stderr.flush()
            os._exit(EXIT_MODEL_LOAD_FAILED)

        def leave(problem: str) -> None:
            # gunicorn's graceful exit: this worker stops taking requests, answers what it holds (all
            # failed at once with 503 by now) and exits; the master starts a fresh one.
            os.kill(os.getpid(), signal.SIGTERM)

        runtime.start(settings, on_failure=die, on_unhealthy=leave)
        # Only server processes get here (tests run without warm-up): the counters' daemon thread.
        from embeddings.logs import start_counters_log

        start_counters_log(current().observability.log_counters_s)
