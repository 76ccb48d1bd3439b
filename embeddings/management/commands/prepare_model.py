from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from embeddings.runtime.loading import ModelLoadError, resolve_model_source


class Command(BaseCommand):
    help = (
        "Make sure the configured model is on disk before serving: fetch a hub id once into CLIP_MODELS_DIR, "
        "check a folder, or build the random-weight test model when nothing is configured."
    )

    def handle(self, *args, **options):
        try:
            source = resolve_model_source(settings.CLIP_MODEL, settings.CLIP_MODELS_DIR)
        except ModelLoadError as exc:
            raise CommandError(f"cannot use CLIP_MODEL={settings.CLIP_MODEL!r}: {exc}") from exc
        if source.test_model:
            self.stderr.write(
                self.style.WARNING(
                    f"WARNING: serving a RANDOM-WEIGHT TEST MODEL ({source.name}) from {source.model_dir}; "
                    "its vectors carry no meaning. Set CLIP_MODEL to a real model."
                )
            )
        self.stdout.write(f"Model {source.name or source.model_dir} ({source.kind}) at {source.model_dir}")
