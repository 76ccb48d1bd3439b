"""What one replica needs, per model preset: the real server (scripts/start.sh) with N workers, its
memory at ready and after mixed traffic, from /proc (``python manage.py bench_memory``).

A replica's memory is its processes' PSS summed (shared pages split between their sharers: what the
kernel, and a container's memory limit, count once), the master included; each worker's RSS, PSS and
private memory are listed too. Random-weight models of the real architectures: the sizes are those
of the real checkpoints.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.clipbench import (
    clipsite_requests,
    drive,
    log,
    multipart,
    photo_jpegs,
    process_memory_mb,
    start_server,
    test_model_dir,
    worker_memory_mb,
)


def replica_memory(master: int) -> dict:
    workers = worker_memory_mb(master)
    own = process_memory_mb(master)
    return {
        "master_pss": round(own["pss"]),
        "workers": [{k: round(v) for k, v in w.items()} for w in workers],
        "replica_pss": round(own["pss"] + sum(w["pss"] for w in workers)),
    }


def measure_preset(preset: str, *, workers: int, seconds: float, tmp: Path) -> dict:
    model_dir = test_model_dir(preset)
    log(f"{preset}: starting the server with {workers} workers (prepare_model measures on first use)")
    server, start_s, ready = start_server(model_dir, tmp, preset, WEB_CONCURRENCY=str(workers))
    try:
        deadline = time.monotonic() + 300
        while ready.get("workers", {}).get("ready", workers) < workers and time.monotonic() < deadline:
            time.sleep(0.5)  # polling /readyz until every worker has loaded
            ready = server.wait_ready()
        ready = server.details()  # the backend each tower runs on
        at_ready = replica_memory(server.proc.pid)
        bodies = [multipart("image", jpeg, "photo.jpg") for jpeg in photo_jpegs((640, 480))]
        bodies += [multipart("text", f"a photo of a {word}", None) for word in ("cat", "red car", "rocket")]
        load = drive(server.port, clipsite_requests(bodies), concurrency=8, seconds=seconds)
        after = replica_memory(server.proc.pid)
    finally:
        server.stop()
    return {
        "preset": preset,
        "workers": workers,
        "backend": ready.get("backend"),
        "start_seconds": round(start_s, 1),
        "requests": load.requests,
        "errors": load.errors,
        "at_ready": at_ready,
        "after_traffic": after,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | workers | backend | replica PSS at ready, MB | after traffic, MB "
        "| each worker RSS / PSS / private, MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = "; ".join(f"{w['rss']} / {w['pss']} / {w['private']}" for w in r["after_traffic"]["workers"])
        backend = ", ".join(f"{t} {b}" for t, b in (r["backend"] or {}).items())
        lines.append(
            f"| {r['preset']} | {r['workers']} | {backend} | {r['at_ready']['replica_pss']} | "
            f"{r['after_traffic']['replica_pss']} ({r['requests']} requests) | {each} |"
        )
    return "\n".join(lines) + "\n"


def run(*, presets: list[str], workers: int, seconds: float, out: Path) -> list[dict]:
    import json

    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsite-memory-") as tmp:
        for preset in presets:
            rows.append(measure_preset(preset, workers=workers, seconds=seconds, tmp=Path(tmp)))
            log(f"{preset}: {rows[-1]['at_ready']['replica_pss']} MB at ready")
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    (out / "memory.md").write_text(markdown(rows))
    print(markdown(rows))
    return rows
