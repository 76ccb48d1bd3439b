from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from embeddings.runtime.testmodel import PRESETS, build_test_model


class Command(BaseCommand):
    help = (
        "Build a CLIP model with random weights, a real architecture (tiny, vit-b-32, vit-l-14) and the real "
        "CLIP tokenizer, saved in the model-clip/ + processor-clip/ layout. Same seed, same weights."
    )

    def add_arguments(self, parser):
        parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
        parser.add_argument("--out", required=True, help="folder to write (model-clip/ and processor-clip/)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a model")

    def handle(self, *args, preset, out, seed, force, **options):
        out = Path(out)
        if (out / "model-clip" / "config.json").exists() and not force:
            self.stdout.write(f"{out} already holds a model (use --force to rebuild)")
            return
        try:
            build_test_model(preset, out, seed=seed)
        except OSError as exc:
            raise CommandError(f"cannot write {out}: {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"Built random-weight {preset} (seed {seed}) in {out}"))
