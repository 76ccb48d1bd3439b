"""Bulk embedding for batch jobs (``manage.py embed``): walk, shard, embed, journal, write.

One run embeds the image files found under some paths (and the lines of a texts file) with the model
the server serves, exactly as ``POST /syte_test/embeddings`` would one at a time: the same engine,
the same decoding (``services.image_of``, the same limits), the same default unit-length vectors.

- **The walk**: each PATH in the order given; a folder is walked recursively and its files are taken in
  the sorted order of their path below it. Entries whose name starts with a dot are passed over (with
  what is below them), and so are files not named as images (``IMAGE_SUFFIXES``); a file named as a
  PATH is always taken. Links to files are followed, links to folders are not. Only regular files are
  read: a FIFO, a socket or a device (or a link to one) is reported as ``not_a_regular_file``, never
  opened for reading, so a named pipe cannot hold the run forever.
- **Shards**: ``--shard I/N`` keeps the items whose key falls in shard I of N by SHA-256 (never
  Python's ``hash()``, which changes per process): an image's key is its path below the PATH it was
  found under, so the split does not depend on where the collection is mounted; a text's is its line
  number.
- **The journal** (``STEM.journal.jsonl`` beside OUT) is the durable record: a header naming the
  model, the fingerprint of its weights (the prepared manifest's), and the backend and dtype of each
  tower, then one JSON line per item embedded, appended and fsync'd per batch. A run reads it first
  and skips every item whose path (texts: file and line) and SHA-256 it already holds, so a run killed
  at any point resumes where its last batch ended. A journal whose header differs from this run's
  (other weights at the same path, another backend or dtype) is refused: its vectors are not this
  run's. At the end OUT is written from the journal (a temporary file, then ``os.replace``) with the
  items of this run only: a changed file is embedded again and its old vector dropped; a deleted file,
  or one now in another shard, is dropped. The journal is then compacted to the same items and kept,
  so the next run resumes from it.
- **Bad items** (not an image, too large, unreadable, not a regular file, a text too long...) are
  written to ``STEM.errors.jsonl`` with the API's error codes (and two of ours, ``unreadable_file`` and
  ``not_a_regular_file``) and do not stop the run. They are tried again on every run.

Memory: one batch of model inputs, plus a few hundred bytes per item for the index of the journal and
of this run's items. OUT is streamed from the journal (npy through a memory map, parquet in row groups
of ``PARQUET_ROW_GROUP`` rows), never held whole.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import orjson
from PIL import Image

from clipsite.config import current
from embeddings import errors, services
from embeddings.multipart import Part
from embeddings.runtime.engine import DeadlineExceeded, Engine, EngineStopped, InferenceFailed, QueueFull
from embeddings.runtime.prepare import Manifest
from embeddings.runtime.state import open_engine, runtime

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "npy", "parquet")
# What Pillow names the formats decode_image accepts (SUPPORTED_FORMATS) as; other files in a folder are
# passed over (a README, a checksum list), so they are neither read nor reported as bad.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
)
# 2: the header names the weights' fingerprint and each tower's backend and dtype.
JOURNAL_VERSION = 2
PARQUET_ROW_GROUP = 8192
# Codes of ours (the API never reads files): a file that cannot be read, and an entry that is not a file.
UNREADABLE = "unreadable_file"
NOT_REGULAR = "not_a_regular_file"
SHOWN_ERRORS = 20


class BulkUsageError(ValueError):
    """The arguments cannot work (a bad --shard, an unknown extension, a missing path...): the message says why."""


class BulkFailed(RuntimeError):
    """The engine failed mid-run; what was embedded until then is in the journal and the next run resumes."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def holds(self, key: str) -> bool:
        return self.count == 1 or shard_of(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` with 0 <= I < N, as a Shard."""
    index, slash, count = (text or "").strip().partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not slash or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise BulkUsageError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. 0/4 ... 3/4)")
    return shard


def shard_of(key: str, count: int) -> int:
    """Which of ``count`` shards ``key`` falls in: the same on every machine, process and Python."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Outputs:
    """OUT and the files beside it."""

    out: Path
    format: str
    journal: Path
    errors: Path
    index: Path | None  # npy only: one line per row, naming its path and sha256
    lock: Path

    @classmethod
    def of(cls, out: str | Path) -> Outputs:
        out = Path(out)
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise BulkUsageError(
                f"--out {str(out)!r}: unknown extension {out.suffix or '(none)'!r}; use .jsonl, .npy or .parquet"
            )
        if out.is_dir():
            raise BulkUsageError(f"--out {str(out)!r} is a folder; name a file (e.g. {out / 'vectors.parquet'})")
        if fmt == "parquet":
            try:  # found out now, not after the last batch
                import pyarrow.parquet  # noqa: F401
            except ImportError as exc:
                raise BulkUsageError("--out .parquet needs pyarrow (requirements.txt); use .npy or .jsonl") from exc
        stem = out.with_suffix("")
        return cls(
            out=out,
            format=fmt,
            journal=stem.with_name(stem.name + ".journal.jsonl"),
            errors=stem.with_name(stem.name + ".errors.jsonl"),
            index=stem.with_name(stem.name + ".index.jsonl") if fmt == "npy" else None,
            lock=stem.with_name(stem.name + ".lock"),
        )


@dataclass(frozen=True)
class BadItem:
    kind: str
    path: str
    line: int | None
    sha256: str | None
    code: str
    message: str

    def record(self) -> dict:
        out = {"kind": self.kind, "path": self.path}
        if self.line is not None:
            out["line"] = self.line
        return out | {"sha256": self.sha256, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class BulkProgress:
    """Where a run stands; ``done`` = ``embedded + skipped + failed`` of ``total`` items in the shard."""

    total: int
    embedded: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.embedded + self.skipped + self.failed


@dataclass(frozen=True)
class BulkReport:
    outputs: Outputs
    model: str
    test_model: bool
    dim: int
    shard: Shard
    images: int  # this shard's image files
    texts: int  # this shard's text lines (blank lines aside)
    embedded: int
    skipped: int  # already in the journal with the same sha256
    failed: int
    rows: int  # written to OUT
    dropped: int  # journal entries no longer wanted: changed, deleted, or now in another shard
    passed_over: int  # entries the walk did not take: hidden, or files not named as images
    blank_lines: int
    truncated: int  # texts cut to the model's context, as the server cuts them
    errors_by_code: dict[str, int] = field(default_factory=dict)
    first_errors: list[BadItem] = field(default_factory=list)  # the first SHOWN_ERRORS


# --- the engine ------------------------------------------------------------------------------------
@contextlib.contextmanager
def batch_engine() -> Iterator[tuple[Engine, Manifest]]:
    """The configured model's engine and its manifest, loaded the way a server worker loads them
    (``open_engine``, from the manifest prepare_model wrote): this process's runtime when it already
    serves this configuration, else one opened for the run and closed after. Raises ModelLoadError
    (ModelNotPrepared) as a worker does.
    """
    settings = current().runtime
    if runtime.ready and runtime.settings == settings:
        yield runtime.engine(), runtime.manifest
        return
    engine, manifest = open_engine(settings)
    try:
        engine.warm_up()
        if not manifest.faithful:
            logger.warning("The backend is below the parity floor: %s. %s", manifest.describe(), manifest.note)
        yield engine, manifest
    finally:
        engine.close()


def _batch_size(asked: int | None, engine: Engine) -> int:
    """``--batch-size``, or the engine's batch; at most what the engine admits from one client at once."""
    size = asked or engine.settings.max_batch
    pixels = math.prod(engine.preprocess_image(Image.new("RGB", (64, 64))).shape[-2:])
    limit = max(1, min(engine.client_share, engine.settings.max_queue_pixels // pixels))
    if size > limit:
        raise BulkUsageError(
            f"--batch-size {size} is over {limit}, the most images the engine admits at once "
            "(half of CLIP_MAX_QUEUE, and CLIP_MAX_QUEUE_PIXELS)"
        )
    return size


# --- what to embed ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Found:
    path: str  # as recorded: the PATH as given joined with the path below it
    rel: str  # the path below the PATH it was found under (POSIX): its shard key
    file: str


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _recorded(path: str) -> str:
    """A path as the outputs record it: a name that is not UTF-8 (Python holds its bytes as lone
    surrogates, which no JSON or Parquet writer takes) with those bytes as ``\\xNN``, stable across runs."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _walk(root: str, bad: Callable[[BadItem], None]) -> tuple[list[_Found], int]:
    """The image files under ``root`` sorted by their path below it, and how many entries were passed over."""
    if not os.path.isdir(root):
        path = os.path.normpath(root)
        return [_Found(_recorded(path), _recorded(os.path.basename(path)), root)], 0
    passed_over = 0
    found = []

    def unreadable(exc: OSError) -> None:
        path = _recorded(os.path.normpath(exc.filename or root))
        bad(BadItem("image", path, None, None, UNREADABLE, f"cannot list this folder: {exc.strerror}"))

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        kept = [d for d in dirs if not _hidden(d)]
        passed_over += len(dirs) - len(kept)
        dirs[:] = kept
        for name in files:
            if _hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                passed_over += 1
                continue
            file = os.path.join(folder, name)
            rel = PurePath(os.path.relpath(file, root)).as_posix()
            found.append(_Found(_recorded(os.path.normpath(file)), _recorded(rel), file))
    found.sort(key=lambda f: f.rel)
    return found, passed_over


def _image_files(roots: list[str], bad: Callable[[BadItem], None]) -> tuple[list[_Found], int]:
    """Every root's image files, in the order the roots were given; a path found twice counts once."""
    seen, found, passed_over = set(), [], 0
    for root in roots:
        files, skipped = _walk(root, bad)
        passed_over += skipped
        for f in files:
            if f.path not in seen:
                seen.add(f.path)
                found.append(f)
    return found, passed_over


def _text_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, its bytes without the line break) of every line of the texts file."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows editors write
            yield number, raw


def _text_key(line: int) -> str:
    return f"text:{line}"


def _entry_key(kind: str, path: str, line: int | None) -> str:
    """What identifies an item in the journal (with its sha256 beside it); NUL is in no path."""
    return path if kind == "image" else f"text\0{path}\0{line}"


# --- the journal -----------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a journal's vectors depend on, in its header: a journal that differs in any of them is refused.
_IDENTITY = ("model", "dim", "fingerprint", "backend", "dtype")
_IDENTITY_WORDS = {
    "model": "model",
    "dim": "dimensions",
    "fingerprint": "weights (prepare_model's fingerprint of the model's files)",
    "backend": "backend",
    "dtype": "dtype",
}


class Journal:
    """The append-only record of what was embedded: a header line, then one JSON line per item.

    ``latest`` maps each item's key to (sha256, ordinal) of its last entry; a torn last line (a run
    killed mid-write) is cut off when the journal is opened.
    """

    def __init__(self, path: Path, *, model: str, dim: int, fingerprint: str, backend: dict, dtype: dict):
        self.path, self.model, self.dim = path, model, dim
        self.identity = {"model": model, "dim": dim, "fingerprint": fingerprint, "backend": backend, "dtype": dtype}
        self.latest: dict[str, tuple[bytes, int]] = {}
        self.entries = 0
        self._file = None

    @classmethod
    def of(cls, path: Path, engine: Engine, manifest: Manifest) -> Journal:
        """The journal of a run with ``engine``: its model, weights, and each tower's backend and dtype."""
        return cls(
            path,
            model=engine.name,
            dim=engine.dim,
            fingerprint=manifest.fingerprint,
            backend={tower: b.name for tower, b in engine.backends.items()},
            dtype={tower: b.dtype for tower, b in engine.backends.items()},
        )

    @property
    def header(self) -> dict:
        return {"clipsite_journal": JOURNAL_VERSION, **self.identity, "normalized": True}

    def open(self) -> Journal:
        good_end = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                good_end = self._read(f)
            size = self.path.stat().st_size
            if good_end == 0:
                self.path.unlink()  # not even a whole header: killed as it began
            elif size > good_end:
                logger.warning("%s: cutting off %d bytes of a torn last entry", self.path, size - good_end)
                os.truncate(self.path, good_end)
        new = good_end == 0
        self._file = open(self.path, "ab")
        if new:
            self._file.write(orjson.dumps(self.header) + b"\n")
            self._sync()
            _fsync_dir(self.path.parent)
        return self

    def _read(self, f) -> int:
        """Index the entries; returns where the last whole, sound line ends."""
        first = f.readline()
        if not first.endswith(b"\n"):
            return 0
        try:
            header = orjson.loads(first)
        except orjson.JSONDecodeError:
            header = None
        if isinstance(header, dict) and header.get("clipsite_journal") == 1:
            raise BulkUsageError(
                f"{self.path} was written by an older clipsite, without the fingerprint of the weights, so a "
                "run cannot tell whether its vectors are this model's: delete it (and OUT) to embed again, "
                "or choose another --out"
            )
        if not isinstance(header, dict) or header.get("clipsite_journal") != JOURNAL_VERSION:
            raise BulkUsageError(f"{self.path} is not a journal of this version: move it away, or choose another --out")
        changed = [name for name in _IDENTITY if header.get(name) != self.identity[name]]
        if changed:
            differences = "; ".join(
                f"{_IDENTITY_WORDS[name]} {_shown(header.get(name))} there, {_shown(self.identity[name])} now"
                for name in changed
            )
            raise BulkUsageError(
                f"{self.path} holds vectors this run would not compute ({differences}): delete it (and OUT) "
                "to embed everything again, or choose another --out"
            )
        end = f.tell()
        for line in f:
            entry = self._parse(line)
            if entry is None:
                break  # a torn tail; nothing sound follows a torn line, fsync'd batches come before it
            self._note(entry)
            end += len(line)
        return end

    def _parse(self, line: bytes) -> dict | None:
        if not line.endswith(b"\n"):
            return None
        try:
            entry = orjson.loads(line)
            if len(base64.b64decode(entry["vector"], validate=True)) != 4 * self.dim:
                return None
            bytes.fromhex(entry["sha256"])
            if not isinstance(entry["path"], str) or entry["kind"] not in ("image", "text"):
                return None
            if entry["kind"] == "text" and not (isinstance(entry["line"], int) and isinstance(entry["text"], str)):
                return None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return entry

    def _note(self, entry: dict) -> None:
        key = _entry_key(entry["kind"], entry["path"], entry.get("line"))
        self.latest[key] = (bytes.fromhex(entry["sha256"]), self.entries)
        self.entries += 1

    def holds(self, key: str, sha: bytes) -> bool:
        held = self.latest.get(key)
        return held is not None and held[0] == sha

    def append(self, entries: list[dict], vectors: np.ndarray) -> None:
        """Record one batch durably: written, flushed and fsync'd before this returns."""
        lines = []
        for entry, vector in zip(entries, vectors, strict=True):
            entry = entry | {"vector": base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")}
            lines.append(orjson.dumps(entry) + b"\n")
        self._file.write(b"".join(lines))
        self._sync()
        for entry in entries:
            self._note(entry)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def entries_read(self) -> Iterator[tuple[int, bytes, dict]]:
        """(ordinal, raw line, entry) of every entry, in order."""
        with open(self.path, "rb") as f:
            f.readline()
            for ordinal, line in enumerate(f):
                yield ordinal, line, orjson.loads(line)


def _shown(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    return repr(value)


# --- writing OUT -----------------------------------------------------------------------------------
def _meta(entry: dict) -> dict:
    out = {"kind": entry["kind"], "path": entry["path"]}
    if entry["kind"] == "text":
        out |= {"line": entry["line"], "text": entry["text"]}
    return out | {"sha256": entry["sha256"]}


def _vector(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["vector"]), dtype="<f4")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _sync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class _JsonlWriter:
    def __init__(self, outputs: Outputs, rows: int, dim: int, model: str):
        self.path, self.out = _tmp(outputs.out), outputs.out
        self._file = open(self.path, "wb")

    def write(self, entry: dict) -> None:
        record = _meta(entry) | {"embedding": _vector(entry)}
        self._file.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def finish(self) -> list[tuple[Path, Path]]:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return [(self.path, self.out)]


class _NpyWriter:
    """The float32 matrix through a memory map (its size is known before the first row), and the index."""

    def __init__(self, outputs: Outputs, rows: int, dim: int, model: str):
        self.outputs = outputs
        self.path, self.index_path = _tmp(outputs.out), _tmp(outputs.index)
        self._matrix = np.lib.format.open_memmap(self.path, mode="w+", dtype="<f4", shape=(rows, dim))
        self._index = open(self.index_path, "wb")
        self._row = 0

    def write(self, entry: dict) -> None:
        self._matrix[self._row] = _vector(entry)
        self._index.write(orjson.dumps({"row": self._row} | _meta(entry)) + b"\n")
        self._row += 1

    def finish(self) -> list[tuple[Path, Path]]:
        self._matrix.flush()
        del self._matrix
        _sync_file(self.path)
        self._index.flush()
        os.fsync(self._index.fileno())
        self._index.close()
        # The index first: a run killed between the two renames leaves the old matrix with the new index,
        # which the next run puts right (a reader can check: the index has as many lines as the matrix rows).
        return [(self.index_path, self.outputs.index), (self.path, self.outputs.out)]


class _ParquetWriter:
    def __init__(self, outputs: Outputs, rows: int, dim: int, model: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.dim = pa, dim
        self.path, self.out = _tmp(outputs.out), outputs.out
        self.schema = pa.schema(
            [
                ("kind", pa.string()),
                ("path", pa.string()),
                ("line", pa.int64()),
                ("text", pa.string()),
                ("sha256", pa.string()),
                ("embedding", pa.list_(pa.float32(), dim)),
            ],
            metadata={"clipsite.model": model, "clipsite.dim": str(dim), "clipsite.normalized": "true"},
        )
        self._writer = pq.ParquetWriter(self.path, self.schema)
        self._rows: list[dict] = []
        self._vectors: list[np.ndarray] = []
        self._empty = rows == 0

    def write(self, entry: dict) -> None:
        self._rows.append(_meta(entry))
        self._vectors.append(_vector(entry))
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        pa = self.pa
        flat = np.concatenate(self._vectors) if self._vectors else np.zeros(0, "<f4")
        columns = {name: [row.get(name) for row in self._rows] for name in ("kind", "path", "line", "text", "sha256")}
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim)
        self._writer.write_table(pa.table({**columns, "embedding": embedding}, schema=self.schema))
        self._rows, self._vectors = [], []

    def finish(self) -> list[tuple[Path, Path]]:
        if self._rows or self._empty:
            self._flush()
        self._writer.close()
        _sync_file(self.path)
        return [(self.path, self.out)]


_WRITERS = {"jsonl": _JsonlWriter, "npy": _NpyWriter, "parquet": _ParquetWriter}


# --- the run ---------------------------------------------------------------------------------------
def bulk_embed(
    *,
    paths: list[str | Path],
    texts_file: str | Path | None = None,
    out: str | Path,
    batch_size: int | None = None,
    shard: Shard | None = None,
    progress: Callable[[BulkProgress], None] | None = None,
) -> BulkReport:
    """Embed the images under ``paths`` (and the lines of ``texts_file``) in ``shard`` into ``out``,
    resuming from its journal; ``progress`` is called as items are done. See the module's docstring.

    Raises BulkUsageError for arguments that cannot work, ModelLoadError when the model is not prepared,
    BulkFailed when the engine fails (the journal keeps what was done).
    """
    outputs = Outputs.of(out)
    roots = [str(p) for p in paths]
    for root in roots:
        if not os.path.exists(root):
            raise BulkUsageError(f"{root}: no such file or folder")
    texts = os.path.normpath(texts_file) if texts_file is not None else None
    if texts is not None and not os.path.isfile(texts):
        what = "not a regular file" if os.path.exists(texts) else "no such file"  # a FIFO would block the run
        raise BulkUsageError(f"--texts {texts}: {what}")
    if not roots and texts is None:
        raise BulkUsageError("name at least one PATH (image files or folders) or --texts FILE")
    if batch_size is not None and batch_size < 1:
        raise BulkUsageError(f"--batch-size {batch_size} is not a positive number")
    shard = shard or Shard(0, 1)
    with batch_engine() as (engine, manifest):
        batch_size = _batch_size(batch_size, engine)
        outputs.out.parent.mkdir(parents=True, exist_ok=True)
        with open(outputs.lock, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("Another run is writing %s: waiting for it to finish", outputs.out)
                fcntl.flock(lock, fcntl.LOCK_EX)  # then resume from what it journaled
            journal = Journal.of(outputs.journal, engine, manifest).open()
            try:
                run = _Run(engine=engine, journal=journal, outputs=outputs, batch_size=batch_size, progress=progress)
                return run.execute(roots=roots, texts=texts, shard=shard)
            finally:
                journal.close()


class NotARegularFile(Exception):
    """A FIFO, a socket, a device...: never read (the message names which)."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise NotARegularFile(f"it is {kind}, not a regular file: skipped, never read")


class _Run:
    def __init__(self, *, engine: Engine, journal: Journal, outputs: Outputs, batch_size: int, progress):
        self.engine, self.journal, self.outputs = engine, journal, outputs
        self.batch_size = batch_size
        self.on_progress = progress
        self.limits = current().limits
        self.current: dict[str, bytes] = {}  # key -> sha256 of every item of this run read soundly
        self.state = BulkProgress(total=0)
        self.errors_by_code: Counter[str] = Counter()
        self.first_errors: list[BadItem] = []
        self.truncated = 0
        self._errors_file = None

    # bookkeeping
    def _advance(self, *, embedded: int = 0, skipped: int = 0, failed: int = 0) -> None:
        s = self.state
        self.state = BulkProgress(s.total, s.embedded + embedded, s.skipped + skipped, s.failed + failed)
        if self.on_progress is not None:
            self.on_progress(self.state)

    def _bad(self, item: BadItem, *, counted: bool = True) -> None:
        self._errors_file.write(orjson.dumps(item.record()) + b"\n")
        self.errors_by_code[item.code] += 1
        if len(self.first_errors) < SHOWN_ERRORS:
            self.first_errors.append(item)
        if counted:
            self._advance(failed=1)

    def execute(self, *, roots: list[str], texts: str | None, shard: Shard) -> BulkReport:
        errors_tmp = _tmp(self.outputs.errors)
        self._errors_file = open(errors_tmp, "wb")
        try:
            # Folders that cannot be listed are reported, not counted: they are not items of the shard.
            found, passed_over = _image_files(roots, lambda item: self._bad(item, counted=False))
            images = [f for f in found if shard.holds(f.rel)]
            del found
            lines, blank = 0, 0
            if texts is not None:
                for number, raw in _text_lines(texts):
                    if not raw.strip():
                        blank += 1
                    elif shard.holds(_text_key(number)):
                        lines += 1
            self.state = BulkProgress(total=len(images) + lines)
            self._advance()
            self._embed_images(images)
            if texts is not None:
                self._embed_texts(texts, shard)
            self._errors_file.flush()
            os.fsync(self._errors_file.fileno())
        finally:
            self._errors_file.close()
        rows, dropped = self._write_out()
        os.replace(errors_tmp, self.outputs.errors)
        _fsync_dir(self.outputs.out.parent)
        return BulkReport(
            outputs=self.outputs,
            model=self.engine.name,
            test_model=self.engine.is_test_model,
            dim=self.engine.dim,
            shard=shard,
            images=len(images),
            texts=lines,
            embedded=self.state.embedded,
            skipped=self.state.skipped,
            failed=self.state.failed,
            rows=rows,
            dropped=dropped,
            passed_over=passed_over,
            blank_lines=blank,
            truncated=self.truncated,
            errors_by_code=dict(self.errors_by_code),
            first_errors=list(self.first_errors),
        )

    # images
    def _read(self, found: _Found) -> bytes:
        """The file's bytes; FileTooLarge (from its size, before reading) over the server's limit per file,
        NotARegularFile for a FIFO, a socket or a device (never opened for reading: a FIFO would block)."""
        limit = self.limits.max_file_bytes
        too_large = errors.FileTooLarge(f"The file is over the limit of {limit} bytes per file (CLIP_MAX_FILE_BYTES).")
        info = os.stat(found.file)  # through a link: a link to a regular file is read
        _check_regular(info.st_mode)
        if info.st_size > limit:
            raise too_large
        # Without blocking, should it have become a FIFO since the stat; then checked again, opened.
        with open(os.open(found.file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as f:
            _check_regular(os.fstat(f.fileno()).st_mode)
            data = f.read(limit + 1)
        if len(data) > limit:  # it grew since
            raise too_large
        return data

    def _embed_images(self, images: list[_Found]) -> None:
        pending: list[tuple[dict, np.ndarray]] = []
        for found in images:
            try:
                data = self._read(found)
            except errors.ApiError as exc:
                self._bad(BadItem("image", found.path, None, None, exc.code, exc.message))
                continue
            except NotARegularFile as exc:
                self._bad(BadItem("image", found.path, None, None, NOT_REGULAR, str(exc)))
                continue
            except OSError as exc:
                self._bad(BadItem("image", found.path, None, None, UNREADABLE, f"cannot read it: {exc.strerror}"))
                continue
            sha = hashlib.sha256(data).digest()
            self.current[found.path] = sha
            if self.journal.holds(found.path, sha):
                self._advance(skipped=1)
                continue
            try:
                # The server's own decoding of one uploaded image: its limits, its draft, its pixel budget.
                part = Part(key=found.path, data=data, filename=os.path.basename(found.path))
                decoded = services.image_of(part, self.engine, pixel_budget=self.limits.max_request_pixels)
                del data
                pixels = self.engine.preprocess_image(decoded.image)
                del decoded
            except errors.ApiError as exc:
                self._bad(BadItem("image", found.path, None, sha.hex(), exc.code, exc.message))
                continue
            pending.append(({"kind": "image", "path": found.path, "sha256": sha.hex()}, pixels))
            if len(pending) >= self.batch_size:
                self._flush_images(pending)
                pending = []
        if pending:
            self._flush_images(pending)

    def _timeout(self, n: int) -> float:
        return self.engine.settings.timeout_s * math.ceil(n / self.engine.settings.max_batch)

    def _flush_images(self, pending: list[tuple[dict, np.ndarray]]) -> None:
        out = self._embed(images=[p for _, p in pending])
        self.journal.append([e for e, _ in pending], services.l2_normalize(out.images))
        self._advance(embedded=len(pending))

    def _embed(self, **items):
        n = sum(len(v) for v in items.values())
        try:
            return self.engine.embed(**items, timeout=self._timeout(n), client="bulk")
        except (InferenceFailed, DeadlineExceeded, EngineStopped, QueueFull) as exc:
            raise BulkFailed(
                f"the engine failed ({type(exc).__name__}: {exc}); what was embedded before is kept in "
                f"{self.journal.path}: run again to resume"
            ) from exc

    # texts
    def _embed_texts(self, texts: str, shard: Shard) -> None:
        pending: list[tuple[dict, str]] = []
        for number, raw in _text_lines(texts):
            if not raw.strip() or not shard.holds(_text_key(number)):
                continue
            sha = hashlib.sha256(raw).digest()
            key = _entry_key("text", texts, number)
            try:
                # The server's own check of a text part: the character limit, UTF-8, the word limit.
                text = services.text_of(Part(key=f"{texts}:{number}", data=raw))
            except errors.ApiError as exc:
                self._bad(BadItem("text", texts, number, sha.hex(), exc.code, exc.message))
                continue
            self.current[key] = sha
            if self.journal.holds(key, sha):
                self._advance(skipped=1)
                continue
            entry = {"kind": "text", "path": texts, "line": number, "text": text, "sha256": sha.hex()}
            pending.append((entry, text))
            if len(pending) >= self.batch_size:
                self._flush_texts(pending)
                pending = []
        if pending:
            self._flush_texts(pending)

    def _flush_texts(self, pending: list[tuple[dict, str]]) -> None:
        out = self._embed(texts=[t for _, t in pending])
        self.truncated += sum(out.truncated)
        self.journal.append([e for e, _ in pending], services.l2_normalize(out.texts))
        self._advance(embedded=len(pending))

    # OUT
    def _write_out(self) -> tuple[int, int]:
        """Write OUT (and the npy index) from the journal's entries of this run's items, then compact the
        journal to them; returns (rows, entries dropped)."""
        keep = set()
        for key, sha in self.current.items():
            held = self.journal.latest.get(key)
            if held is not None and held[0] == sha:
                keep.add(held[1])
        self.journal.close()
        dropped = self.journal.entries - len(keep)
        writer = _WRITERS[self.outputs.format](self.outputs, len(keep), self.engine.dim, self.engine.name)
        compacted = None
        if dropped:
            compacted = open(_tmp(self.journal.path), "wb")
            compacted.write(orjson.dumps(self.journal.header) + b"\n")
        try:
            for ordinal, line, entry in self.journal.entries_read():
                if ordinal in keep:
                    writer.write(entry)
                    if compacted is not None:
                        compacted.write(line)
            renames = writer.finish()
            if compacted is not None:
                compacted.flush()
                os.fsync(compacted.fileno())
        finally:
            if compacted is not None:
                compacted.close()
        for tmp, final in renames:
            os.replace(tmp, final)
        if compacted is not None:
            os.replace(_tmp(self.journal.path), self.journal.path)
        _fsync_dir(self.outputs.out.parent)
        return len(keep), dropped
