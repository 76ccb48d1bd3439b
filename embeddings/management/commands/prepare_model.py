from django.core.management.base import BaseCommand, CommandError

from clipsite.config import current
from embeddings.runtime.loading import ModelLoadError
from embeddings.runtime.prepare import prepare


class Command(BaseCommand):
    help = (
        "Prepare the configured model before serving, once, under a lock: fetch a hub id into CLIP_MODELS_DIR "
        "(or build the random-weight test model when nothing is configured), choose the backend, export it, "
        "check its vectors against float32 PyTorch and write the manifest the workers read. "
        "gunicorn workers only load what this made; scripts/start.sh runs it first."
    )

    def handle(self, *args, **options):
        settings = current().runtime
        try:
            source, manifest = prepare(settings)
        except ModelLoadError as exc:
            raise CommandError(f"cannot prepare CLIP_MODEL={settings.model!r}: {exc}") from exc
        if source.test_model:
            self.stderr.write(
                self.style.WARNING(
                    f"WARNING: serving a RANDOM-WEIGHT TEST MODEL ({source.name}) from {source.model_dir}; "
                    "its vectors carry no meaning. Set CLIP_MODEL to a real model."
                )
            )
        self.stdout.write(f"Model {source.name or source.model_dir} ({source.kind}) at {source.model_dir}")
        style = self.style.SUCCESS if manifest.faithful else self.style.WARNING
        self.stdout.write(style(f"Prepared: {manifest.describe()}. {manifest.note}"))
