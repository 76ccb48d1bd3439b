from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Benchmark every bare backend/dtype on this CPU, then the real server (scripts/start.sh) over loopback "
        "with the backend prepare_model chooses, with a random-weight vit-b-32; --peer infinity URL adds an "
        "infinity-emb server on the same model. Writes results.json and results.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", default="artifacts/bench", help="folder for results.json and results.md")
        parser.add_argument("--seconds", type=float, default=6.0, help="seconds per measurement")
        parser.add_argument("--concurrency", default="1,4,16,64", help="client counts, comma-separated")
        parser.add_argument("--memory-requests", type=int, default=10_000)
        parser.add_argument("--model", help="model folder (default: build/reuse var/test-models/vit-b-32-seed0)")
        parser.add_argument(
            "--peer",
            nargs=2,
            metavar=("NAME", "URL"),
            help="another server on the same model, driven through its own API: infinity http://127.0.0.1:7997",
        )
        parser.add_argument(
            "--env", action="append", default=[], metavar="NAME=VALUE", help="set for the server (CLIP_BACKEND=torch)"
        )

    def handle(self, *args, **options):
        from bench.clipbench import run

        env = dict(item.split("=", 1) for item in options["env"] if "=" in item)
        if len(env) != len(options["env"]):
            raise CommandError("--env takes NAME=VALUE")
        try:
            run(
                out=Path(options["out"]),
                seconds=options["seconds"],
                concurrency=tuple(int(c) for c in options["concurrency"].split(",")),
                requests_for_memory=options["memory_requests"],
                model_dir=Path(options["model"]) if options["model"] else None,
                peer=tuple(options["peer"]) if options["peer"] else None,
                env=env,
            )
        except (RuntimeError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
