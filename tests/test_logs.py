"""The log: one line per request (route, status, latency, items, batches), JSON lines on demand, the
counters line, and never a key or an image's bytes."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from PIL import PngImagePlugin

from clipsite.config import load
from embeddings.logs import JsonFormatter, RequestIdFilter, log_counters, start_counters_log
from tests.conftest import ROOT, gradient_image, image_bytes, multipart_body, override

EMBEDDINGS = "/syte_test/embeddings"


def upload(data: bytes, name: str):
    f = io.BytesIO(data)
    f.name = name
    return f


@contextlib.contextmanager
def console_output(formatter: logging.Formatter | None = None, level: int | None = None):
    """What the console handler (settings LOGGING) writes meanwhile, optionally with another formatter."""
    console = next(h for h in logging.getLogger().handlers if getattr(h, "name", "") == "console")
    root = logging.getLogger()
    stream, old_formatter, old_level = io.StringIO(), console.formatter, root.level
    old_stream = console.setStream(stream)
    if formatter is not None:
        console.setFormatter(formatter)
    if level is not None:
        root.setLevel(level)
    try:
        yield stream
    finally:
        console.setStream(old_stream)
        console.setFormatter(old_formatter)
        root.setLevel(old_level)


def two_images_three_texts() -> dict:
    parts = {f"image-{i}": upload(image_bytes(gradient_image(seed=i)), f"{i}.png") for i in range(2)}
    return parts | {f"text-{i}": f"a photo number {i}" for i in range(3)}


def request_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " clipsite.requests " in line]


def test_each_request_has_one_line_with_route_status_latency_items_and_batches(client, clip):
    with console_output() as out:
        response = client.post(EMBEDDINGS, data=two_images_three_texts(), headers={"request_id": "line-1"})
    assert response.status_code == 200
    (line,) = request_lines(out.getvalue())
    assert "[line-1] POST /syte_test/embeddings 200 " in line and " ms images=2 texts=3 batches=" in line
    batches = line.rsplit("batches=", 1)[1].split(",")
    assert batches and all(b.isdigit() for b in batches)


def test_the_engine_numbers_its_batches_and_tells_each_request_its_own(clip):
    first = clip.embed(images=[gradient_image(seed=1)], texts=["one", "two"])
    second = clip.embed(texts=["three"])
    assert len(first.batches) == 2 and first.batches == sorted(first.batches)  # one image, one text batch
    assert len(second.batches) == 1 and second.batches[0] > max(first.batches)


def test_a_request_the_edge_refuses_has_its_line_too(client, settings):
    override(settings, limits={"max_request_bytes": 100})
    body, content_type = multipart_body([("t", "x" * 200, None)])
    with console_output() as out:
        response = client.generic("POST", EMBEDDINGS, body, content_type=content_type, headers={"request_id": "big"})
    assert response.status_code == 413
    (line,) = request_lines(out.getvalue())
    assert "[big] POST /syte_test/embeddings 413 " in line and "images=0 texts=0 batches=-" in line


def test_probes_and_metrics_have_no_request_line(client):
    with console_output() as out:
        for path in ("/healthz", "/readyz", "/metrics"):
            client.get(path)
    assert request_lines(out.getvalue()) == []


def test_json_formatter_writes_one_object_per_record_with_the_fields():
    logger = logging.getLogger("tests.json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    try:
        logger.warning("plain %s", "words")
        logger.info("x", extra={"request": object(), "headers": {"Authorization": "Bearer k"}, "status": 201})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(records) == 3
    first = records[0]
    assert set(first) == {"time", "level", "logger", "process", "request_id", "message"}
    assert first["level"] == "WARNING" and first["logger"] == "tests.json" and first["message"] == "plain words"
    assert first["process"] == os.getpid() and first["request_id"] == "-" and first["time"].endswith("+00:00")
    assert records[1]["status"] == 201 and "headers" not in records[1] and "request" not in records[1]
    assert "ValueError: boom" in records[2]["exc_info"]


def test_json_request_line_through_the_test_client(client, clip):
    with console_output(JsonFormatter()) as out:
        response = client.post(EMBEDDINGS, data=two_images_three_texts(), headers={"request_id": "json-1"})
    assert response.status_code == 200
    records = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is one object
    (line,) = [r for r in records if r["logger"] == "clipsite.requests"]
    assert line["request_id"] == "json-1" and line["level"] == "INFO" and line["process"] == os.getpid()
    assert line["method"] == "POST" and line["endpoint"] == EMBEDDINGS and line["status"] == 200
    assert line["images"] == 2 and line["texts"] == 3 and line["latency_ms"] > 0
    assert line["batches"] and all(isinstance(b, int) for b in line["batches"])


def test_log_format_json_is_what_the_settings_give_the_console(tmp_path):
    code = "import django, logging; django.setup(); logging.getLogger('probe').warning('hello %s', 'json')"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "clipsite.settings",
        "LOG_FORMAT": "json",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["message"] == "hello json" and record["logger"] == "probe" and record["request_id"] == "-"


@pytest.mark.parametrize(
    ("variable", "raw", "check_id"),
    [
        ("LOG_FORMAT", "xml", "clipsite.E043"),
        ("CLIP_LOG_COUNTERS_S", "-1", "clipsite.E044"),
        ("CLIP_METRICS", "maybe", "clipsite.E045"),
    ],
)
def test_bad_visibility_settings_have_their_own_check(tmp_path, variable, raw, check_id):
    _, problems = load({variable: raw}, base_dir=tmp_path)
    assert [(p.variable, p.check_id) for p in problems] == [(variable, check_id)]


def test_visibility_defaults(tmp_path):
    config, problems = load({}, base_dir=tmp_path)
    assert not problems
    assert (config.observability.log_format, config.observability.log_counters_s) == ("plain", 60)
    assert config.observability.metrics is True


@pytest.mark.django_db
def test_logs_never_hold_api_keys_or_image_bytes(client, clip):
    marker = "IMAGE-BYTES-MARKER-7f3a"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", marker)
    png = image_bytes(gradient_image(seed=3), pnginfo=info)
    assert marker.encode() in png
    not_an_image = b"\x00\x01" + marker.encode() + b"\xff" * 64
    keys = {"Authorization": "Bearer secretkey123", "X-API-Key": "secretkey123"}
    statuses = []
    with console_output(level=logging.DEBUG) as plain:
        for headers in (keys, {}):  # a wrong key may be refused (401): without one the image is decoded
            statuses.append(client.post(EMBEDDINGS, data={"i": upload(png, "a.png"), "t": "w"}, headers=headers))
            statuses.append(client.post(EMBEDDINGS, data={"i": upload(not_an_image, "b.png")}, headers=headers))
        statuses.append(client.post(EMBEDDINGS + "?api_key=secretkey123", data={"t": "words"}))
    with console_output(JsonFormatter(), level=logging.DEBUG) as as_json:
        for headers in (keys, {}):
            statuses.append(client.post(EMBEDDINGS, data={"i": upload(png, "a.png")}, headers=headers))
        log_counters()
    assert [r.status_code for r in statuses][2:4] == [200, 400]  # decoded, and refused as not an image
    for output in (plain.getvalue(), as_json.getvalue()):
        assert request_lines(output) or '"clipsite.requests"' in output  # the requests were logged
        assert "secretkey123" not in output
        assert marker not in output and base64.b64encode(png[:48]).decode() not in output
        assert "\\x89PNG" not in output and "\\x00\\x01" not in output  # no repr of the bytes either


def test_the_counters_line_sums_this_workers_requests_items_and_errors(client, clip):
    client.post(EMBEDDINGS, data={"t": "one"})
    client.post(EMBEDDINGS, data={})  # 400 empty_request
    with console_output() as out:
        counts = log_counters()
    (line,) = [line for line in out.getvalue().splitlines() if " clipsite.counters " in line]
    assert f"counters requests={counts['requests']} " in line and "empty_request=" in line
    assert counts["requests_by_status"]["200"] >= 1 and counts["errors"]["empty_request"] >= 1
    assert counts["items"]["text"] >= 1 and counts["requests"] == sum(counts["requests_by_status"].values())


def test_the_counters_line_is_json_in_json_mode(client):
    with console_output(JsonFormatter()) as out:
        counts = log_counters()
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["logger"] == "clipsite.counters" and record["counters"] == counts


def test_no_counters_thread_runs_in_tests_and_zero_starts_none():
    start_counters_log(0)
    assert not [t for t in threading.enumerate() if t.name == "clip-counters"]
