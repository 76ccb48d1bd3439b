"""The load-and-fault run itself, small: both faults happen, the hostile connections flow beside the
normal mix, nothing answers an unexpected 5xx, and the workers stay within their memory bound."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


def test_a_small_load_and_fault_run_passes(tmp_path, tiny_model_dir):
    from bench.loadfault import run

    report = run(out=tmp_path / "out", requests=400, concurrency=8, seconds=300, model_dir=tiny_model_dir)
    assert report["ok"], report
    assert [f["signal"] for f in report["faults"]] == ["SIGKILL", "SIGTERM"]
    assert report["unexpected_5xx"] == [] and report["answered"] == 400
    statuses = report["statuses"]
    assert statuses.get("200", 0) > 200 and statuses.get("400", 0) and statuses.get("413", 0)
    assert report["by_kind"]["declared-huge"] == {"413": report["by_kind"]["declared-huge"]["413"]}
    assert (tmp_path / "out" / "results.md").read_text().endswith("Verdict: ok.\n")
    # the hostile connections ran beside it, each answered as it should be, and memory stayed bounded
    hostile = report["hostile"]
    assert hostile["idle"].get("closed") and hostile["endless-headers"].get("431") and hostile["big-v1-text"].get("400")
    assert report["hostile_unexpected"] == {} and report["normal_refused"] == []
    assert report["worker_peak_mb"] <= report["worker_bound_mb"]
