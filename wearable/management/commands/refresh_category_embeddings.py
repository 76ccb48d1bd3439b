from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from clipsite.config import current
from embeddings.runtime.prepare import prepare
from embeddings.runtime.state import runtime
from wearable import services
from wearable.models import Category, CategoryEmbedding


class Command(BaseCommand):
    help = (
        "Recompute and store the text vectors of every wearable category (enabled or not) for the "
        "configured model (CLIP_MODEL). Running servers keep serving: the vectors they hold are the same."
    )

    def add_arguments(self, parser):
        parser.add_argument("--enabled-only", action="store_true", help="Only the enabled categories.")
        parser.add_argument(
            "--purge-other-models",
            action="store_true",
            help="Also delete the stored vectors of every other model.",
        )

    def handle(self, *args, **options):
        try:
            prepare(current().runtime)  # a command may prepare; gunicorn workers only load
            engine = runtime.load(current().runtime)
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
            raise CommandError(f"cannot load the model: {exc}") from exc
        categories = Category.objects.order_by("display_order", "name")
        if options["enabled_only"]:
            categories = categories.filter(enabled=True)
        categories = list(categories)
        if not categories:
            raise CommandError("There is no category to refresh: add some in the admin.")
        with tqdm(total=len(categories), unit="category", file=self.stderr, disable=options["verbosity"] == 0) as bar:
            stored = services.category_embeddings_refresh(
                engine=engine, categories=categories, on_category=lambda _: bar.update(1)
            )
        if options["purge_other_models"]:
            purged, _ = CategoryEmbedding.objects.exclude(model_name=engine.name).delete()
            self.stdout.write(f"Deleted {purged} vectors of other models.")
        self.stdout.write(
            self.style.SUCCESS(f"Stored {stored} prompt vectors for {len(categories)} categories ({engine.name}).")
        )
