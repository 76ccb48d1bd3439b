"""manage.py embed: bulk vectors equal to the server's, in three formats, resumable, sharded, with bad files
reported (FIFOs, sockets and devices never read) and usage errors refused, a journal of other weights,
backend or dtype refused."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from clipsite.config import current
from embeddings.bulk import JOURNAL_VERSION, Outputs, bulk_embed, parse_shard, shard_of
from embeddings.runtime.prepare import prepare
from embeddings.runtime.state import runtime
from tests.conftest import (
    MODELS,
    PHOTOS,
    assert_same_vectors,
    cosines,
    gradient_image,
    image_bytes,
    override,
    photo_bytes,
)

URL = "/syte_test/embeddings"
TEXTS = ["a photo of an astronaut", "a cat on a couch", "", "a cup of coffee", "a red motorcycle"]


@pytest.fixture
def configured(settings, tiny_model_dir, clip):
    """The configuration names the model the process runtime serves, so the command reuses it."""
    override(
        settings, runtime={"model": str(tiny_model_dir), "models_dir": MODELS, "device": "cpu", "dtype": "float32"}
    )
    assert current().runtime == runtime.settings
    return clip


@pytest.fixture
def collection(tmp_path) -> Path:
    """The real photos in nested folders, a large JPEG (decoded at reduced scale), a transparent PNG, and
    entries the walk passes over."""
    root = tmp_path / "collection"
    for i, photo in enumerate(sorted(PHOTOS.glob("*.jpg"))):
        folder = root / ("people" if i % 2 else "things") / ("deep" if i == 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (root / "big.JPG").write_bytes(image_bytes(gradient_image(2400, 1800, seed=3), "JPEG", quality=90))
    (root / "clear.png").write_bytes(image_bytes(gradient_image(300, 200, mode="RGBA", seed=4)))
    (root / "README.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(photo_bytes("chelsea.jpg"))
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(photo_bytes("rocket.jpg"))
    return root


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def embed(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("embed", *[str(a) for a in args], stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def counts(stdout: str) -> dict[str, int]:
    found = re.search(r"Embedded (\d+), skipped (\d+) \(already in the journal\), bad (\d+), of (\d+) images", stdout)
    assert found, stdout
    return dict(zip(("embedded", "skipped", "bad", "images"), map(int, found.groups()), strict=True))


def read_out(out: Path, dim: int) -> list[dict]:
    """OUT's rows, each with its ``embedding`` as a float32 vector; checks each format's shape."""
    if out.suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        for row in rows:
            row["embedding"] = np.asarray(row["embedding"], np.float32)
    elif out.suffix == ".npy":
        matrix = np.load(out)
        index = [json.loads(line) for line in Outputs.of(out).index.read_text().splitlines()]
        assert matrix.dtype == np.float32 and matrix.shape == (len(index), dim)
        assert [row["row"] for row in index] == list(range(len(index)))
        rows = [row | {"embedding": matrix[row["row"]]} for row in index]
    else:
        table = pq.read_table(out)
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
        assert table.schema.metadata[b"clipsite.normalized"] == b"true"
        rows = table.to_pylist()
        for row in rows:
            row["embedding"] = np.asarray(row["embedding"], np.float32)
            if row["kind"] == "image":
                assert row.pop("line") is None and row.pop("text") is None
    for row in rows:
        assert row["embedding"].shape == (dim,)
    return rows


def image_paths(root: Path) -> list[str]:
    """What the walk takes: the images below ``root`` (hidden entries aside), sorted by their path below it."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png")]
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return [str(p) for p in sorted(files, key=lambda p: p.relative_to(root).as_posix())]


def by_path(rows: list[dict]) -> dict[str, dict]:
    return {(r["path"] if r["kind"] == "image" else f"{r['path']}:{r['line']}"): r for r in rows}


def server_vector(client, data: bytes | str, name: str = "x.jpg") -> np.ndarray:
    if isinstance(data, bytes):
        upload = io.BytesIO(data)
        upload.name = name
        data = upload
    response = client.post(URL, data={"part": data})
    assert response.status_code == 200, response.content
    return np.asarray(response.json()["vectors"]["part"], np.float32)


def test_the_commands_vectors_are_the_servers(client, configured, collection, texts_file, tmp_path):
    out = tmp_path / "vectors.jsonl"
    stdout, stderr = embed(collection, "--texts", texts_file, "--out", out, "--batch-size", 3)
    assert counts(stdout) == {"embedded": 11, "skipped": 0, "bad": 0, "images": 7}
    assert "item/s" in stderr  # the progress bar
    rows = by_path(read_out(out, configured.dim))
    assert set(rows) == set(image_paths(collection)) | {f"{texts_file}:{n}" for n in (1, 2, 4, 5)}
    for path in image_paths(collection):
        assert_same_vectors(rows[path]["embedding"], server_vector(client, Path(path).read_bytes(), Path(path).name))
    for number, text in enumerate(TEXTS, start=1):
        if text:
            row = rows[f"{texts_file}:{number}"]
            assert row["kind"] == "text" and row["text"] == text and row["line"] == number
            assert_same_vectors(row["embedding"], server_vector(client, text))


@pytest.mark.parametrize("fmt", ["jsonl", "npy", "parquet"])
def test_each_format_round_trips_paths_and_sha256(configured, collection, texts_file, tmp_path, fmt):
    out = tmp_path / "out" / f"vectors.{fmt}"  # its folder is made
    embed(collection, "--texts", texts_file, "--out", out)
    rows = read_out(out, configured.dim)
    images = [r for r in rows if r["kind"] == "image"]
    assert [r["path"] for r in images] == image_paths(collection)  # the walk's order on a first run
    for row in images:
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    texts = [r for r in rows if r["kind"] == "text"]
    assert [(r["line"], r["text"]) for r in texts] == [(n, t) for n, t in enumerate(TEXTS, start=1) if t]
    for row in texts:
        assert row["path"] == str(texts_file)
        assert row["sha256"] == hashlib.sha256(row["text"].encode()).hexdigest()
    norms = np.linalg.norm(np.stack([r["embedding"] for r in rows]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)  # the server's default: unit length
    assert not list(out.parent.glob("*.tmp"))
    assert Outputs.of(out).errors.read_text() == ""


@pytest.mark.parametrize("fmt", ["jsonl", "npy", "parquet"])
def test_nothing_to_embed_writes_an_empty_output(configured, tmp_path, fmt):
    (tmp_path / "empty").mkdir()
    stdout, _ = embed(tmp_path / "empty", "--out", tmp_path / f"v.{fmt}")
    assert counts(stdout) == {"embedded": 0, "skipped": 0, "bad": 0, "images": 0}
    assert read_out(tmp_path / f"v.{fmt}", configured.dim) == []


def test_another_format_is_written_from_the_same_journal_without_embedding(configured, collection, tmp_path):
    embed(collection, "--out", tmp_path / "v.parquet")
    stdout, _ = embed(collection, "--out", tmp_path / "v.npy")
    assert counts(stdout)["embedded"] == 0
    parquet, npy = read_out(tmp_path / "v.parquet", configured.dim), read_out(tmp_path / "v.npy", configured.dim)
    assert [r["path"] for r in parquet] == [r["path"] for r in npy]
    # The same stored floats, not two forward passes: equal to the bit.
    assert np.array_equal(np.stack([r["embedding"] for r in parquet]), np.stack([r["embedding"] for r in npy]))


def test_a_rerun_embeds_only_new_and_changed_files(client, configured, collection, tmp_path):
    out = tmp_path / "vectors.parquet"
    assert counts(embed(collection, "--out", out)[0]) == {"embedded": 7, "skipped": 0, "bad": 0, "images": 7}
    (collection / "things" / "new.png").write_bytes(image_bytes(gradient_image(64, 80, seed=9)))
    changed = collection / "clear.png"
    changed.write_bytes(image_bytes(gradient_image(300, 200, seed=10)))
    removed = next((collection / "people").glob("*.jpg"))
    removed.unlink()
    stdout, _ = embed(collection, "--out", out)
    assert counts(stdout) == {"embedded": 2, "skipped": 5, "bad": 0, "images": 7}
    # The changed file's old vector and the removed file's:
    assert "journal entries dropped (changed, deleted or in another shard): 2" in stdout
    rows = by_path(read_out(out, configured.dim))
    assert set(rows) == set(image_paths(collection)) and str(removed) not in rows
    assert rows[str(changed)]["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert_same_vectors(rows[str(changed)]["embedding"], server_vector(client, changed.read_bytes(), changed.name))
    journal = Outputs.of(out).journal.read_text().splitlines()
    assert len(journal) == 1 + 7  # compacted to the header and this run's items
    assert counts(embed(collection, "--out", out)[0]) == {"embedded": 0, "skipped": 7, "bad": 0, "images": 7}


class Killed(Exception):
    pass


def test_a_run_killed_after_a_batch_resumes_without_redoing_it(configured, collection, tmp_path):
    out = tmp_path / "vectors.npy"

    def kill_after_the_first_batch(step):
        if step.embedded:
            raise Killed

    with pytest.raises(Killed):
        bulk_embed(paths=[collection], out=out, batch_size=3, progress=kill_after_the_first_batch)
    assert not out.exists()  # OUT appears whole or not at all
    journal = Outputs.of(out).journal
    assert len(journal.read_text().splitlines()) == 1 + 3
    with open(journal, "ab") as f:
        f.write(b'{"kind":"image","path":"' + str(collection).encode() + b"/things/ro")  # killed mid-write
    stdout, _ = embed(collection, "--out", out, "--batch-size", 3)
    assert counts(stdout) == {"embedded": 4, "skipped": 3, "bad": 0, "images": 7}
    rows = read_out(out, configured.dim)
    assert [r["path"] for r in rows] == image_paths(collection)


def test_a_second_run_on_the_same_out_waits_for_the_first_then_resumes(configured, collection, tmp_path):
    out = tmp_path / "v.jsonl"
    outputs = Outputs.of(out)
    reports = []
    with open(outputs.lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a first run (a Kubernetes pod still terminating) holds OUT
        second = threading.Thread(target=lambda: reports.append(bulk_embed(paths=[collection], out=out)))
        second.start()
        second.join(1.0)
        assert second.is_alive() and not outputs.journal.exists()
    second.join(60)
    assert reports[0].embedded == 7 and out.exists()


def test_the_default_batch_is_clip_max_batch_and_another_configuration_gets_its_own_engine(
    settings, configured, collection, tmp_path
):
    embed(collection, "--out", tmp_path / "runtime.jsonl")  # with the process's runtime
    override(settings, runtime={"max_batch": 2})  # no longer what the runtime serves: the run opens its own engine
    steps = []

    def kill_after_the_first_batch(step):
        steps.append(step.embedded)
        if step.embedded:
            raise Killed

    with pytest.raises(Killed):
        bulk_embed(paths=[collection], out=tmp_path / "own.jsonl", progress=kill_after_the_first_batch)
    assert steps[-1] == 2  # CLIP_MAX_BATCH images in the first batch
    report = bulk_embed(paths=[collection], out=tmp_path / "own.jsonl")
    assert (report.embedded, report.skipped) == (5, 2)
    own, theirs = read_out(tmp_path / "own.jsonl", configured.dim), read_out(tmp_path / "runtime.jsonl", configured.dim)
    assert [r["path"] for r in own] == [r["path"] for r in theirs]
    assert_same_vectors(np.stack([r["embedding"] for r in own]), np.stack([r["embedding"] for r in theirs]))


def test_bad_files_are_reported_with_the_apis_codes_and_the_rest_embedded(
    client, settings, configured, collection, tmp_path
):
    override(settings, limits={"max_image_pixels": 1_000_000, "max_file_bytes": 200_000})
    big = image_bytes(gradient_image(2400, 1800, seed=3), "JPEG", quality=90)  # over 200 KB; the photos are under
    bad = {
        "not-an-image.jpg": b"this is just text",
        "truncated.jpg": photo_bytes("coffee.jpg")[:20_000],
        "wide.png": image_bytes(Image.new("RGB", (1200, 1000), (10, 20, 30))),  # 1.2 megapixels
        "big.JPG": big,
    }
    for name, data in bad.items():
        (collection / name).write_bytes(data)
    assert len(big) > 200_000 > max(len(photo_bytes(p.name)) for p in PHOTOS.glob("*.jpg"))
    out = tmp_path / "vectors.parquet"
    stdout, _ = embed(collection, "--out", out)  # returns: exit status 0
    assert counts(stdout) == {"embedded": 6, "skipped": 0, "bad": 4, "images": 10}
    errors = {Path(e["path"]).name: e for e in map(json.loads, Outputs.of(out).errors.read_text().splitlines())}
    codes = {name: e["code"] for name, e in errors.items()}
    assert codes == {
        "not-an-image.jpg": "invalid_image",
        "truncated.jpg": "invalid_image",
        "wide.png": "image_too_large",
        "big.JPG": "file_too_large",
    }
    for name, data in bad.items():  # the server answers the same files with the same codes
        upload = io.BytesIO(data)
        upload.name = name
        assert client.post(URL, data={"f": upload}).json()["error"]["code"] == codes[name]
    assert errors["wide.png"]["sha256"] == hashlib.sha256(bad["wide.png"]).hexdigest()
    assert errors["big.JPG"]["sha256"] is None  # never read
    assert "4 bad, listed in" in stdout and "wide.png: image_too_large" in stdout
    assert len(read_out(out, configured.dim)) == 6


def test_bad_texts_are_reported_and_blank_lines_skipped(settings, configured, tmp_path):
    override(settings, limits={"max_text_words": 4})
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"\xef\xbb\xbfa red car\r\n\r\ncaf\xe9\none two three four five\na blue bicycle")
    out = tmp_path / "v.jsonl"
    stdout, _ = embed("--texts", texts, "--out", out)
    assert "Embedded 2, skipped 0 (already in the journal), bad 2, of 0 images and 4 texts" in stdout
    errors = [json.loads(line) for line in Outputs.of(out).errors.read_text().splitlines()]
    assert [(e["line"], e["code"]) for e in errors] == [(3, "invalid_text"), (4, "text_too_long")]
    assert [(r["line"], r["text"]) for r in read_out(out, configured.dim)] == [(1, "a red car"), (5, "a blue bicycle")]


def test_shards_are_disjoint_cover_everything_and_ignore_the_root(configured, collection, texts_file, tmp_path):
    embed(collection, "--texts", texts_file, "--out", tmp_path / "all.jsonl")
    everything = set(by_path(read_out(tmp_path / "all.jsonl", configured.dim)))
    parts = []
    for i in range(3):
        embed(collection, "--texts", texts_file, "--out", tmp_path / f"part-{i}.jsonl", "--shard", f"{i}/3")
        parts.append(set(by_path(read_out(tmp_path / f"part-{i}.jsonl", configured.dim))))
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything)
    assert all(parts)  # 11 items: none of the three is empty

    elsewhere = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(collection, elsewhere)
    embed(elsewhere, "--out", tmp_path / "moved-1.jsonl", "--shard", "1/3")
    moved = {Path(r["path"]).relative_to(elsewhere) for r in read_out(tmp_path / "moved-1.jsonl", configured.dim)}
    here = {Path(p).relative_to(collection) for p in parts[1] if not p.startswith(str(texts_file))}
    assert moved == here


def test_the_shard_hash_is_stable_across_processes_and_machines():
    # Pinned: SHA-256 of the key, never Python's hash(), which changes with each process (PYTHONHASHSEED).
    keys = ("people/astronaut.jpg", "things/deep/rocket.jpg", "text:1", "text:2")
    assert [shard_of(key, 4) for key in keys] == [2, 0, 1, 2]
    assert [shard_of(key, 3) for key in keys] == [2, 1, 1, 1]
    assert parse_shard(" 2/4 ").index == 2 and parse_shard("0/1").count == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "3/3"], r"--shard '3/3' is not I/N with 0 <= I < N"),
        (["--shard", "1"], r"--shard '1' is not I/N"),
        (["--shard", "a/b"], r"is not I/N"),
        (["--shard=-1/2"], r"is not I/N"),
        (["--shard", "0/0"], r"is not I/N"),
        (["--batch-size", "0"], r"--batch-size 0 is not a positive number"),
        (["--batch-size", "100000"], r"--batch-size 100000 is over \d+, the most images the engine admits"),
    ],
)
def test_usage_errors_are_command_errors(configured, collection, tmp_path, args, message):
    with pytest.raises(CommandError, match=message) as refused:
        embed(collection, "--out", tmp_path / "v.jsonl", *args)
    assert refused.value.returncode == 2  # the embed Job fails the index at once: a retry cannot help
    assert not (tmp_path / "v.jsonl").exists()


def test_unknown_extension_missing_paths_and_no_input_are_command_errors(configured, collection, tmp_path):
    with pytest.raises(CommandError, match=r"unknown extension '\.csv'; use \.jsonl, \.npy or \.parquet"):
        embed(collection, "--out", tmp_path / "v.csv")
    with pytest.raises(CommandError, match="no-such-folder: no such file or folder"):
        embed(collection, tmp_path / "no-such-folder", "--out", tmp_path / "v.jsonl")
    with pytest.raises(CommandError, match="--texts .*missing.txt: no such file"):
        embed("--texts", tmp_path / "missing.txt", "--out", tmp_path / "v.jsonl")
    with pytest.raises(CommandError, match="name at least one PATH"):
        embed("--out", tmp_path / "v.jsonl")
    with pytest.raises(CommandError, match="the following arguments are required: --out"):
        embed(collection)


def test_a_model_not_prepared_is_a_command_error(settings, configured, collection, tmp_path):
    override(settings, runtime={"model": "openai/clip-vit-base-patch32", "models_dir": tmp_path / "models"})
    with pytest.raises(CommandError, match=r"cannot load CLIP_MODEL=.*prepare_model"):
        embed(collection, "--out", tmp_path / "v.jsonl")


def test_a_journal_of_another_model_is_refused(configured, collection, tmp_path):
    out = tmp_path / "v.jsonl"
    header = {"clipsite_journal": JOURNAL_VERSION, "model": "other", "dim": 7}
    Outputs.of(out).journal.write_text(json.dumps(header) + "\n")
    with pytest.raises(CommandError, match="model 'other' there, .* now; dimensions 7 there, .*choose another --out"):
        embed(collection, "--out", out)


def test_a_journal_of_an_older_clipsite_is_refused_for_want_of_a_fingerprint(configured, collection, tmp_path):
    out = tmp_path / "v.jsonl"
    header = {"clipsite_journal": 1, "model": configured.name, "dim": configured.dim, "normalized": True}
    Outputs.of(out).journal.write_text(json.dumps(header) + "\n")
    with pytest.raises(CommandError, match="older clipsite, without the fingerprint of the weights") as refused:
        embed(collection, "--out", out)
    assert refused.value.returncode == 2


def test_a_rerun_after_the_weights_changed_at_the_same_path_is_refused(settings, collection, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("clipsite-prepared"))
    override(settings, runtime={"model": str(folder), "models_dir": MODELS, "backend": "torch", "dtype": "float32"})
    prepare(current().runtime)
    out = tmp_path / "v.jsonl"
    embed(collection, "--out", out)
    dim = json.loads(Outputs.of(out).journal.read_text().splitlines()[0])["dim"]
    before = read_out(out, dim)
    weights = folder / "model-clip" / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("visual_projection.weight"))
    tensors[name] = tensors[name].flip(0)  # new weights, same file, same path
    save_file(tensors, weights, metadata={"format": "pt"})
    prepare(current().runtime)  # prepare_model saw the files change: a new manifest, a new fingerprint
    with pytest.raises(CommandError, match=r"weights \(prepare_model's fingerprint .*\) '\w+' there, '\w+' now") as no:
        embed(collection, "--out", out)
    assert no.value.returncode == 2 and "delete it (and OUT)" in str(no.value)
    stdout, _ = embed(collection, "--out", tmp_path / "new.jsonl")
    assert counts(stdout)["embedded"] == 7
    after = np.stack([r["embedding"] for r in read_out(tmp_path / "new.jsonl", dim)])
    assert cosines(after, np.stack([r["embedding"] for r in before])).max() < 0.999  # the old vectors were stale


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backend", {"image": "openvino", "text": "openvino"}, "backend image=openvino,text=openvino there"),
        ("dtype", {"image": "bfloat16", "text": "bfloat16"}, "dtype image=bfloat16,text=bfloat16 there"),
    ],
)
def test_a_journal_of_another_backend_or_dtype_is_refused(configured, collection, tmp_path, field, value, message):
    out = tmp_path / "v.jsonl"
    embed(collection, "--out", out)
    journal = Outputs.of(out).journal
    header, *entries = journal.read_text().splitlines(keepends=True)
    recorded = json.loads(header)
    served = {tower: f"{b.name}/{b.dtype}" for tower, b in configured.backends.items()}
    assert {t: f"{recorded['backend'][t]}/{recorded['dtype'][t]}" for t in served} == served
    assert recorded["fingerprint"] == runtime.manifest.fingerprint
    journal.write_text(json.dumps(recorded | {field: value}) + "\n" + "".join(entries))
    with pytest.raises(CommandError, match=re.escape(message)) as refused:
        embed(collection, "--out", out)
    assert refused.value.returncode == 2


def test_fifos_sockets_and_devices_are_reported_never_read(configured, collection, tmp_path, monkeypatch):
    os.mkfifo(collection / "x.jpg")  # opened for reading, a FIFO waits for a writer: for ever
    monkeypatch.chdir(collection)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind("s.png")  # relative: a socket's path is limited to 108 bytes
    (collection / "null.jpg").symlink_to("/dev/null")  # a link to a device
    (collection / "link.jpg").symlink_to(image_paths(collection)[0])  # a link to a file: read
    (collection / "gone.jpg").symlink_to(collection / "nowhere.jpg")
    out = tmp_path / "v.jsonl"
    reports = []
    run = threading.Thread(target=lambda: reports.append(bulk_embed(paths=[collection], out=out)), daemon=True)
    run.start()
    run.join(60)
    try:
        assert not run.is_alive(), "the run blocked reading the FIFO"
    finally:
        listening.close()
        if run.is_alive():  # a writer that closes at once: the blocked read ends, and so does the thread
            os.close(os.open(collection / "x.jpg", os.O_WRONLY | os.O_NONBLOCK))
            run.join(30)
    errors = {Path(e["path"]).name: e for e in map(json.loads, Outputs.of(out).errors.read_text().splitlines())}
    assert {name: e["code"] for name, e in errors.items()} == {
        "x.jpg": "not_a_regular_file",
        "s.png": "not_a_regular_file",
        "null.jpg": "not_a_regular_file",
        "gone.jpg": "unreadable_file",
    }
    assert "a FIFO (named pipe), not a regular file" in errors["x.jpg"]["message"]
    assert "a socket" in errors["s.png"]["message"] and "a character device" in errors["null.jpg"]["message"]
    assert (reports[0].embedded, reports[0].failed) == (8, 4)  # the 7 photos and the link to one
    assert str(collection / "link.jpg") in {r["path"] for r in read_out(out, configured.dim)}


def test_a_fifo_named_as_the_texts_file_is_refused(configured, tmp_path):
    os.mkfifo(tmp_path / "texts.txt")
    started = time.monotonic()
    with pytest.raises(CommandError, match="texts.txt: not a regular file") as refused:
        embed("--texts", tmp_path / "texts.txt", "--out", tmp_path / "v.jsonl")
    assert refused.value.returncode == 2 and time.monotonic() - started < 60


def test_verbosity_zero_shows_no_progress_bar(configured, collection, tmp_path):
    _, stderr = embed(collection, "--out", tmp_path / "v.jsonl", "-v", "0")
    assert "item/s" not in stderr


def test_a_file_name_that_is_not_utf8_is_embedded_under_a_stable_printable_path(configured, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: Python holds the name with a lone surrogate
    (folder / name).write_bytes(photo_bytes("chelsea.jpg"))
    out = tmp_path / "v.jsonl"
    assert counts(embed(folder, "--out", out)[0])["embedded"] == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["path"].endswith("caf\\xe9.jpg")
    assert counts(embed(folder, "--out", out)[0])["skipped"] == 1  # the same path on a re-run
