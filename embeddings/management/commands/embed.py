from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from clipsite.config import current
from embeddings.bulk import BulkFailed, BulkUsageError, bulk_embed, parse_shard
from embeddings.runtime.loading import ModelLoadError


class _LogLines:
    """tqdm's stream when stderr is not a terminal (a Kubernetes log): each refresh a line of its own,
    where a terminal would redraw one line with carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Command(BaseCommand):
    help = (
        "Embed image files and folders (walked recursively, sorted; hidden entries and files not named as "
        "images passed over) and the lines of --texts FILE with the prepared model, exactly as the server "
        "would, into OUT.jsonl, OUT.npy (+ OUT.index.jsonl) or OUT.parquet. Resumable: a journal beside OUT "
        "records each batch, and a re-run skips what it holds (same path, same SHA-256); a journal of other "
        "weights, backend or dtype is refused. Bad files (and FIFOs, sockets, devices: never read) go to "
        "OUT.errors.jsonl with the API's error codes and do not fail the run. Run prepare_model first."
    )

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
        parser.add_argument("--texts", metavar="FILE", help="also embed these texts, one per line (UTF-8)")
        parser.add_argument("--out", required=True, metavar="OUT", help="OUT.jsonl, OUT.npy or OUT.parquet")
        parser.add_argument(
            "--batch-size", type=int, metavar="N", help="images (or texts) per engine call (default: CLIP_MAX_BATCH)"
        )
        parser.add_argument(
            "--shard",
            default="0/1",
            metavar="I/N",
            help="embed only shard I of N (0 <= I < N), chosen by each file's path below its PATH",
        )

    def handle(self, *args, paths, texts, out, batch_size, shard, verbosity, **options):
        terminal = self.stderr.isatty()
        bars = []  # made at the first report, once the model is loaded and the walk done: its rate is the run's

        def on_progress(step):
            if not bars:
                bars.append(
                    tqdm(
                        total=step.total,
                        unit="item",
                        file=self.stderr if terminal else _LogLines(self.stderr),
                        mininterval=0.1 if terminal else 30,
                        disable=verbosity == 0,
                    )
                )
            bar = bars[0]
            bar.set_postfix(embedded=step.embedded, skipped=step.skipped, bad=step.failed, refresh=False)
            bar.update(step.done - bar.n)

        try:
            report = bulk_embed(
                paths=paths,
                texts_file=texts,
                out=out,
                batch_size=batch_size,
                shard=parse_shard(shard),
                progress=on_progress,
            )
        except BulkUsageError as exc:  # exit 2, like argparse's: a Job fails the index at once, no retry
            raise CommandError(str(exc), returncode=2) from exc
        except BulkFailed as exc:
            raise CommandError(str(exc)) from exc
        except ModelLoadError as exc:
            raise CommandError(f"cannot load CLIP_MODEL={current().runtime.model!r}: {exc}") from exc
        finally:
            for bar in bars:
                bar.close()
        self._summary(report, verbosity)

    def _summary(self, report, verbosity: int) -> None:
        outputs = report.outputs
        if report.test_model:
            self.stderr.write(
                self.style.WARNING(
                    f"WARNING: a RANDOM-WEIGHT TEST MODEL ({report.model}): its vectors carry no meaning."
                )
            )
        self.stdout.write(
            f"Embedded {report.embedded}, skipped {report.skipped} (already in the journal), bad {report.failed}, "
            f"of {report.images} images and {report.texts} texts in shard {report.shard}, with {report.model}."
        )
        notes = []
        if report.passed_over:
            notes.append(f"passed over {report.passed_over} (hidden, or not named as images)")
        if report.blank_lines:
            notes.append(f"blank lines skipped: {report.blank_lines}")
        if report.truncated:
            notes.append(f"texts cut to the model's context: {report.truncated}")
        if report.dropped:
            notes.append(f"journal entries dropped (changed, deleted or in another shard): {report.dropped}")
        if notes and verbosity >= 1:
            self.stdout.write("; ".join(notes) + ".")
        written = f"{outputs.out}" + (f" and {outputs.index}" if outputs.index else "")
        self.stdout.write(
            self.style.SUCCESS(f"Wrote {report.rows} rows (dim {report.dim}) to {written}; journal {outputs.journal}.")
        )
        bad = sum(report.errors_by_code.values())
        if bad:
            codes = ", ".join(f"{code} {n}" for code, n in sorted(report.errors_by_code.items()))
            self.stdout.write(self.style.WARNING(f"{bad} bad, listed in {outputs.errors} ({codes}):"))
            if verbosity >= 1:
                for item in report.first_errors:
                    where = f"{item.path}:{item.line}" if item.line is not None else item.path
                    self.stdout.write(f"  {where}: {item.code}: {item.message}")
                if bad > len(report.first_errors):
                    self.stdout.write(f"  ... and {bad - len(report.first_errors)} more")
