"""The benchmark itself, small: every bare engine measured with its cosine, the server driven, the targets judged."""

from __future__ import annotations

import pytest

from embeddings.runtime.cpu import cpu_features
from embeddings.runtime.prepare import CPU_CANDIDATES

pytestmark = pytest.mark.server


def test_a_small_benchmark_measures_every_engine_and_the_server(tmp_path, tiny_model_dir):
    from bench.clipbench import run

    report = run(
        out=tmp_path / "out", seconds=0.3, concurrency=(1, 2), requests_for_memory=40, model_dir=tiny_model_dir
    )
    assert [(r["backend"], r["dtype"]) for r in report["backends"]] == list(CPU_CANDIDATES)
    ran = [r for r in report["backends"] if "error" not in r]
    assert {("torch", "float32"), ("onnx", "float32"), ("openvino", "float32")} <= {
        (r["backend"], r["dtype"]) for r in ran
    }
    for row in ran:
        assert row["image_b16_per_s"] > 0 and row["text_b32_per_s"] > 0 and 0.9 < row["image_cosine"] <= 1.0 + 1e-6
        assert row["faithful"] == (row["image_cosine"] >= 0.999 and row["text_cosine"] >= 0.9999)
    assert report["best"]["image_b16_per_s"]["value"] == max(r["image_b16_per_s"] for r in ran if r["faithful"])
    assert report["machine"]["amx"] == cpu_features()["amx"]
    server = report["server"]
    assert {(r["input"], r["concurrency"]) for r in server["runs"]} == {
        (name, c) for name in ("image 640x480", "image 1920x1080", "image 4000x3000", "text") for c in (1, 2)
    }
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in server["runs"])
    assert server["vectors"]["image_cosine"] >= 0.999 and server["vectors"]["text_cosine"] >= 0.9999
    assert len(server["workers_after_requests"]) == server_workers() and "peer" not in report
    judged = {t["target"] for t in report["targets"]}
    assert "short text c=1 p50 ms" in judged and "image 640x480 c=16 / best bare images/s" not in judged  # no c=16
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| backend/dtype | runs |" in text and "x best bare" in text and "x infinity" not in text


def server_workers() -> int:
    from clipsite.config import cpu_cores

    return cpu_cores()


def test_the_replica_memory_run_sums_every_process_of_the_server(tmp_path):
    from bench.memory import run

    (row,) = run(presets=["tiny"], workers=2, seconds=1.0, out=tmp_path / "out")
    assert row["preset"] == "tiny" and row["requests"] > 0 and row["errors"] == 0
    for look in (row["at_ready"], row["after_traffic"]):
        assert len(look["workers"]) == 2 and look["master_pss"] > 0
        assert look["replica_pss"] == pytest.approx(look["master_pss"] + sum(w["pss"] for w in look["workers"]), abs=3)
        assert all(w["rss"] >= w["pss"] >= w["private"] > 0 for w in look["workers"])
    assert "| tiny | 2 |" in (tmp_path / "out" / "memory.md").read_text()
