"""/metrics: Prometheus' text format over the test client, and summed over two gunicorn workers."""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from embeddings import metrics
from tests.conftest import gradient_image, image_bytes, multipart_body, override, photo_bytes
from tests.server import Server, raw_http, server_env

EMBEDDINGS = "/syte_test/embeddings"
WEARABLE = "/syte_test/wearable"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by its name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return samples(response.content.decode())


def upload(data: bytes, name: str):
    f = io.BytesIO(data)
    f.name = name
    return f


@pytest.mark.django_db
def test_metrics_count_requests_items_batches_cache_hits_and_rejections(client, clip, settings):
    before = scrape(client)
    parts = {f"image-{i}": upload(image_bytes(gradient_image(seed=i)), f"{i}.png") for i in range(2)}
    parts |= {f"text-{i}": f"a photo number {i}" for i in range(3)}
    assert client.post(EMBEDDINGS, data=parts).status_code == 200
    after = scrape(client)

    assert delta(after, before, "clipsite_requests_total", endpoint=EMBEDDINGS, status="200") == 1
    assert delta(after, before, "clipsite_request_duration_seconds_count", endpoint=EMBEDDINGS) == 1
    for kind, n in (("image", 2), ("text", 3)):
        assert delta(after, before, "clipsite_items_embedded_total", kind=kind) == n
        assert delta(after, before, "clipsite_batch_size_count", kind=kind) >= 1
        assert delta(after, before, "clipsite_batch_size_sum", kind=kind) == n
        assert ("clipsite_queue_depth", frozenset({("kind", kind)})) in after
    assert value(after, "clipsite_model_load_seconds") > 0

    # The wearable: the first look-up builds the category vectors (a miss), the second finds them (a hit).
    from wearable.services import category_cache

    category_cache.clear()
    for _ in range(2):
        assert client.post(WEARABLE, data={"image": upload(photo_bytes("chelsea.jpg"), "c.jpg")}).status_code == 200
    wearable = scrape(client)
    assert delta(wearable, after, "clipsite_category_cache_total", result="miss") == 1
    assert delta(wearable, after, "clipsite_category_cache_total", result="hit") == 1
    assert delta(wearable, after, "clipsite_requests_total", endpoint=WEARABLE, status="200") == 2
    category_cache.clear()

    # Rejections by code: a 400 from the error table, a 413 the edge middleware answers before reading.
    assert client.post(EMBEDDINGS, data={}).status_code == 400
    override(settings, limits={"max_request_bytes": 100})
    body, content_type = multipart_body([("t", "x" * 200, None)])
    assert client.generic("POST", EMBEDDINGS, body, content_type=content_type).status_code == 413
    rejected = scrape(client)
    for code in ("empty_request", "request_too_large"):
        assert delta(rejected, wearable, "clipsite_rejections_total", code=code) == 1
    assert delta(rejected, wearable, "clipsite_requests_total", endpoint=EMBEDDINGS, status="413") == 1


def test_unknown_api_paths_count_under_one_bounded_label(client):
    before = scrape(client)
    assert client.get("/syte_test/no-such-thing-12345").status_code == 404
    after = scrape(client)
    assert delta(after, before, "clipsite_requests_total", endpoint="/syte_test/*", status="404") == 1
    assert delta(after, before, "clipsite_rejections_total", code="not_found") == 1
    assert not any("no-such-thing" in str(labels) for _, labels in after)


def test_metrics_answer_whatever_the_host_header_and_are_not_counted(client, settings):
    settings.ALLOWED_HOSTS = ["clip.example.com"]
    first = client.get("/metrics", HTTP_HOST="10.0.0.7:8081")
    assert first.status_code == 200
    second = samples(client.get("/metrics", HTTP_HOST="10.0.0.7:8081").content.decode())
    assert not any(dict(labels).get("endpoint") == "/metrics" for _, labels in second)


def test_metrics_can_be_switched_off(client, settings):
    override(settings, observability={"metrics": False})
    assert client.get("/metrics").status_code == 404


def test_metrics_refuse_other_methods(client):
    assert client.post("/metrics").status_code == 405


def test_outside_gunicorn_the_values_live_in_this_process():
    assert metrics.MULTIPROCESS is False  # tests and runserver: no PROMETHEUS_MULTIPROC_DIR


# --- the real server: two workers, one sum -------------------------------------------------------------
@pytest.mark.server
def test_metrics_sum_over_two_workers_whichever_answers(tmp_path, tiny_model_dir):
    env = server_env(tmp_path, tiny_model_dir, WEB_CONCURRENCY="2", WEB_THREADS="4", CLIP_LOG_COUNTERS_S="1")
    server = Server(env, tmp_path / "server.log")
    try:
        server.wait_ready()
        body, content_type = multipart_body([("text-1", "a red car", None)])
        head = f"POST {EMBEDDINGS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
        request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        statuses: list[int] = []
        lock = threading.Lock()

        def send(count: int) -> None:
            for _ in range(count):
                status, _, _ = raw_http(server.port, request)
                with lock:
                    statuses.append(status)

        def log() -> str:
            return server.log.read_text(errors="replace")

        served_by = re.compile(r"clipsite\.requests \[(\d+)\] \[[^]]+\] POST /syte_test/embeddings 200")
        for _ in range(5):  # until both workers have served some (the kernel picks which one accepts)
            threads = [threading.Thread(target=send, args=(6,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if len(set(served_by.findall(log()))) == 2:
                break
        assert len(set(served_by.findall(log()))) == 2, log()[-3000:]
        sent = len(statuses)
        assert statuses == [200] * sent

        for _ in range(6):  # each scrape is answered by either worker: the sum is the same
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
                scraped = samples(r.read().decode())
            assert value(scraped, "clipsite_requests_total", endpoint=EMBEDDINGS, status="200") == sent
            assert value(scraped, "clipsite_request_duration_seconds_count", endpoint=EMBEDDINGS) == sent
            assert value(scraped, "clipsite_items_embedded_total", kind="text") >= sent  # + each warm-up's
            assert value(scraped, "clipsite_model_load_seconds") > 0
            assert ("clipsite_queue_depth", frozenset({("kind", "text")})) in scraped

        # Neither a key nor the upload reaches the server's log (gunicorn's access log included).
        secret = f"{head}Authorization: Bearer secretkey123\r\nX-API-Key: secretkey123\r\n"
        raw_http(server.port, f"{secret}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.5)  # a counters line (CLIP_LOG_COUNTERS_S=1) from each worker
        text = log()
        assert "secretkey123" not in text and "a red car" not in text
        counters = [line for line in text.splitlines() if "clipsite.counters" in line]
        assert counters and re.search(r"requests=\d+", counters[-1]), text[-3000:]
    finally:
        server.stop()
