from pathlib import Path

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Benchmark the real server (scripts/start.sh) over loopback against the bare model and the naive "
        "one-request-at-a-time way, with a random-weight vit-b-32; writes results.json and results.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", default="artifacts/bench", help="folder for results.json and results.md")
        parser.add_argument("--seconds", type=float, default=6.0, help="seconds per measurement")
        parser.add_argument("--concurrency", default="1,4,16,64", help="client counts, comma-separated")
        parser.add_argument("--memory-requests", type=int, default=10_000)
        parser.add_argument("--model", help="model folder (default: build/reuse var/test-models/vit-b-32-seed0)")
        parser.add_argument("--no-int8", action="store_true")
        parser.add_argument("--no-layout-comparison", action="store_true")

    def handle(self, *args, **options):
        from bench.clipbench import run

        run(
            out=Path(options["out"]),
            seconds=options["seconds"],
            concurrency=tuple(int(c) for c in options["concurrency"].split(",")),
            requests_for_memory=options["memory_requests"],
            model_dir=Path(options["model"]) if options["model"] else None,
            compare_serving=not options["no_layout_comparison"],
            int8=not options["no_int8"],
        )
