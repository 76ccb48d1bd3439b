"""WSGI entry point: checks the configuration, then starts loading the prepared model in the background."""

import os
import sys

# Workers load only what prepare_model made: nothing of the Hugging Face hub is ever asked for here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clipsite.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()


def _stop_on_bad_configuration() -> None:
    from django.core import checks

    problems = [m for m in checks.run_checks() if m.is_serious()]
    if problems:
        for message in problems:
            sys.stderr.write(f"clipsite: {message}\n")
        sys.exit(4)  # gunicorn's APP_LOAD_ERROR: the master stops instead of restarting workers


_stop_on_bad_configuration()

from embeddings.apps import EmbeddingsConfig  # noqa: E402

EmbeddingsConfig.warm_up()
