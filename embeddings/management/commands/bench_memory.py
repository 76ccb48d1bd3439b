from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "What one replica needs per model preset: the real server with --workers workers, its memory (PSS of "
        "its processes summed, and each worker's RSS, PSS and private) at ready and after mixed traffic. "
        "Writes memory.json and memory.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--presets", default="vit-b-32,vit-l-14", help="random-weight presets, comma-separated")
        parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY of each server")
        parser.add_argument("--seconds", type=float, default=20.0, help="seconds of traffic before the second look")
        parser.add_argument("--out", default="artifacts/bench", help="folder for memory.json and memory.md")

    def handle(self, *args, **options):
        from bench.memory import run
        from embeddings.runtime.testmodel import PRESETS

        presets = [p.strip() for p in options["presets"].split(",") if p.strip()]
        unknown = [p for p in presets if p not in PRESETS]
        if unknown or not presets:
            raise CommandError(f"unknown preset {unknown}; choose from {', '.join(PRESETS)}")
        if options["workers"] < 1:
            raise CommandError("--workers takes a positive number")
        try:
            run(presets=presets, workers=options["workers"], seconds=options["seconds"], out=Path(options["out"]))
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise CommandError(str(exc)) from exc
