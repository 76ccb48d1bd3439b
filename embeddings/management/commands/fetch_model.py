from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from clipsite.config import current
from embeddings.runtime.loading import ModelLoadError, fetch_model, has_layout, hub_cache_dir


class Command(BaseCommand):
    help = (
        "Download a Hugging Face CLIP-family model into the model-clip/ + processor-clip/ layout, for offline "
        "use. Without --to it goes where CLIP_MODEL=ID looks for it: CLIP_MODELS_DIR/hub/ORG--NAME."
    )

    def add_arguments(self, parser):
        parser.add_argument("model_id", nargs="?", help="hub id (default: CLIP_MODEL)")
        parser.add_argument("--to", help="destination folder")
        parser.add_argument("--force", action="store_true", help="download again even if present")

    def handle(self, *args, model_id, to, force, **options):
        model_id = model_id or current().runtime.model
        if not model_id:
            raise CommandError("name a model id, or set CLIP_MODEL")
        if Path(model_id).expanduser().is_dir():
            self.stdout.write(f"{model_id} is a local folder: nothing to fetch")
            return
        dest = Path(to) if to else hub_cache_dir(current().runtime.models_dir, model_id)
        if has_layout(dest) and not force:
            self.stdout.write(f"{model_id} is already in {dest}")
            return
        try:
            fetch_model(model_id, dest)
        except ModelLoadError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(f"Fetched {model_id} into {dest}"))
