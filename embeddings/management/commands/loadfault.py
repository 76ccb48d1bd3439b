from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "The load-and-fault run: start the real server (2 workers) on loopback, send a mix of valid, invalid and "
        "abusive requests to both endpoints with hostile connections beside them (bench/hostile.py), SIGKILL "
        "one worker and SIGTERM another along the way, and report statuses, unexpected 5xx, p50/p99 and "
        "memory against its bound. Bounded in requests and time; writes artifacts/loadfault/."
    )

    def add_arguments(self, parser):
        parser.add_argument("--requests", type=int, default=20_000)
        parser.add_argument("--concurrency", type=int, default=64)
        parser.add_argument(
            "--seconds", type=float, default=900.0, help="stop sending after this long, whatever is left"
        )
        parser.add_argument("--model", help="model folder (default: build/reuse var/test-models/vit-b-32-seed0)")
        parser.add_argument("--out", default="artifacts/loadfault")
        parser.add_argument(
            "--idle-sockets", type=int, default=600, help="idle connections the hostile mix holds open at once"
        )

    def handle(self, *args, **options):
        from bench.loadfault import markdown, run

        report = run(
            out=Path(options["out"]),
            requests=options["requests"],
            concurrency=options["concurrency"],
            seconds=options["seconds"],
            model_dir=Path(options["model"]) if options["model"] else None,
            idle_sockets=options["idle_sockets"],
        )
        self.stdout.write(markdown(report))
        if not report["ok"]:
            raise CommandError("the load-and-fault run failed: see the report above")
