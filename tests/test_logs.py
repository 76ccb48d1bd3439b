"""The log: one line per request (route, status, latency, items, batches, client, path, size, User-Agent),
escaped so that no client can forge a line, JSON lines on demand, the counters line, and never a key or an
image's bytes."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from PIL import PngImagePlugin

from clipsite.config import load
from embeddings.logs import (
    JsonFormatter,
    PlainFormatter,
    RequestIdFilter,
    escaped,
    log_counters,
    start_counters_log,
)
from tests.conftest import ROOT, gradient_image, image_bytes, multipart_body, override
from tests.server import raw_http, serving

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


@contextlib.contextmanager
def formatted(formatter: logging.Formatter, name: str):
    """A logger of its own whose records ``formatter`` writes into the yielded stream."""
    logger = logging.getLogger(name)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


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
    batches = line.split(" batches=", 1)[1].split(" ", 1)[0].split(",")
    assert batches and all(b.isdigit() for b in batches)


def test_the_line_names_the_client_path_size_and_escaped_user_agent(client, clip):
    agent = 'curl/8 \x1b[31m\r\nforged\x00 \u2028\x85 "q" \\'
    with console_output() as out:
        response = client.post(
            EMBEDDINGS + "?api_key=secret-in-query",
            data={"t": "one"},
            headers={"request_id": "line-2", "User-Agent": agent},
        )
    (line,) = request_lines(out.getvalue())
    size = len(response.content)
    assert line.endswith(
        f' client=127.0.0.1 path="/syte_test/embeddings" bytes={size} '
        'ua="curl/8 \\x1b[31m\\x0d\\x0aforged\\x00 \\u2028\\x85 \\"q\\" \\\\"'
    )
    assert "secret-in-query" not in out.getvalue()  # the query is never logged


def test_escaped_leaves_plain_text_and_cuts_long_values():
    assert escaped("Mozilla/5.0 (X11; Linux) café") == "Mozilla/5.0 (X11; Linux) café"
    assert escaped("a\tb\x7f\U000e0001") == "a\\x09b\\x7f\\U000e0001"
    assert escaped("x" * 500) == "x" * 300 + "..."


def test_the_plain_formatter_keeps_every_record_on_lines_of_its_own():
    with formatted(PlainFormatter(), "tests.plain") as (logger, stream):
        logger.warning("Invalid host %r\n2020-01-01 00:00:00,000 INFO forged [1] [-] line", "h\x1b\r\nx")
        try:
            raise ValueError("bad\n2020-01-01 00:00:00,000 INFO forged")
        except ValueError:
            logger.exception("failed\r\n")
    lines = stream.getvalue().splitlines()
    starts = [line for line in lines if not line.startswith("  ")]  # a traceback's lines are indented
    assert len(starts) == 2 and all(" tests.plain [" in line for line in starts)
    assert "\\x0a2020-01-01 00:00:00,000 INFO forged [1]" in starts[0] and "\x1b" not in stream.getvalue()
    assert starts[1].endswith("failed\\x0d\\x0a") and "  ValueError: bad" in lines


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
    with formatted(JsonFormatter(), "tests.json") as (logger, stream):
        logger.warning("plain %s", "words")
        logger.info("x", extra={"request": object(), "headers": {"Authorization": "Bearer k"}, "status": 201})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
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


# --- The real server: one line per request, escaped, whatever the client sends ------------------------------
FORGED = "2020-01-01 00:00:00,000 INFO clipsite.requests [1] [forged] GET /admin/ 200"
# Bytes HTTP lets through (h11 takes ESC, DEL and bytes over 0x7f in a header's value): ESC and the 8-bit
# CSI (terminal commands), NEL and U+2028 in UTF-8 (line breaks to some readers).
HOSTILE_AGENT = b"evil \x1b[2J\x9b[31m\x7f\x85\xe2\x80\xa8" + FORGED.encode()
# A path carries any byte, percent-encoded: the line holds it decoded, and escaped.
HOSTILE_PATH = "/syte_test/x%1b[31m%0d%0a" + FORGED.replace(" ", "%20") + "%00"
RAW_CONTROLS = "\x00\x1b\x7f\x85\x9b\u2028\r"


def hostile_requests(port: int) -> list[int]:
    body, content_type = multipart_body([("t", "a photo of a cat", None)])
    head = (
        b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nUser-Agent: " + HOSTILE_AGENT + b"\r\n"
        b"request_id: logged-1\r\nContent-Type: " + content_type.encode() + b"\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: " + HOSTILE_AGENT + b"\r\nConnection: close\r\n\r\n"
    lost = (  # its request_id is not printable ASCII: the answer and the line carry a fresh one instead
        b"GET " + HOSTILE_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: " + HOSTILE_AGENT + b"\r\n"
        b"request_id: id\x1b[2J\x85\r\nConnection: close\r\n\r\n"
    )
    return [raw_http(port, raw)[0] for raw in (head + body, probe, lost)]


@pytest.mark.server
@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_the_server_writes_one_escaped_line_per_request(tmp_path, tiny_model_dir, log_format):
    with serving(tmp_path, tiny_model_dir, LOG_FORMAT=log_format) as srv:
        assert hostile_requests(srv.port) == [200, 200, 404]
        time.sleep(0.5)  # the lines are written as the answers go
        output = srv.output()
    assert not [c for c in RAW_CONTROLS if c in output]  # nothing a client sent is written raw
    lines = output.splitlines()  # splits at \x85 and U+2028 too
    agent = "evil \\x1b[2J\\x9b[31m\\x7f\\x85â\\x80¨" + FORGED  # latin-1, as WSGI reads header bytes
    path = "/syte_test/x\\x1b[31m\\x0d\\x0a" + FORGED + "\\x00"
    if log_format == "plain":
        mentioned = [line for line in lines if "forged" in line]
        assert len(mentioned) == 2, mentioned  # the two requests, one line each: no access log, no probe
        first, lost = mentioned
        assert " INFO clipsite.requests " in first and " INFO clipsite.requests " in lost
        assert "[logged-1] POST /syte_test/embeddings 200 " in first and " texts=1 " in first
        assert ' client=127.0.0.1 path="/syte_test/embeddings" bytes=' in first and first.endswith(f' ua="{agent}"')
        assert " GET /syte_test/* 404 " in lost and f' path="{path}" ' in lost and lost.endswith(f' ua="{agent}"')
        assert re.search(r"\[[0-9a-f-]{36}\] GET", lost)  # a fresh request_id in place of the client's
        assert "INFO gunicorn.error" in output  # gunicorn's own lines in the same format
        return
    records = [json.loads(line) for line in lines[next(i for i, x in enumerate(lines) if x.startswith("{")) :]]
    assert {"gunicorn.error", "clipsite.requests"} <= {r["logger"] for r in records}  # every line from then on
    requests = [r for r in records if r["logger"] == "clipsite.requests"]
    assert len(requests) == 2 and not [r for r in records if "forged" in r["message"] and r not in requests]
    first, lost = requests
    assert first["request_id"] == "logged-1" and (first["method"], first["endpoint"]) == ("POST", EMBEDDINGS)
    assert (first["status"], first["texts"], first["client"], first["path"]) == (200, 1, "127.0.0.1", EMBEDDINGS)
    assert first["bytes"] > 0 and first["latency_ms"] > 0 and first["user_agent"] == agent
    assert (lost["status"], lost["endpoint"], lost["path"], lost["user_agent"]) == (404, "/syte_test/*", path, agent)
    assert re.fullmatch(r"[0-9a-f-]{36}", lost["request_id"])


@pytest.mark.server
def test_a_request_the_edge_refuses_has_one_escaped_line(tmp_path, tiny_model_dir):
    with serving(tmp_path, tiny_model_dir, LOG_FORMAT="json") as srv:
        refused = b"GET /syte_test/edge HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x00" + FORGED.encode() + b"\r\n\r\n"
        assert raw_http(srv.port, refused)[0] == 400  # NUL: not HTTP, answered by the edge itself
        deadline = time.monotonic() + 30  # the line is written as the answer leaves: wait for it, not a while
        while '"endpoint": "edge"' not in srv.output() and time.monotonic() < deadline:
            pass
        output = srv.output()
    assert "\x00" not in output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (line,) = [r for r in records if r["logger"] == "clipsite.requests"]
    assert (line["status"], line["client"]) == (400, "127.0.0.1")
