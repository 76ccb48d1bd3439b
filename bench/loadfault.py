"""The load-and-fault run: the real server, a mix of valid, invalid and abusive requests to both
endpoints at high concurrency, and two workers taken down along the way (one SIGKILL, one SIGTERM).

It sends traffic only to the server it starts on 127.0.0.1, is bounded in requests and in time, and
stops by itself. It reports counts by status, every 5xx other than 503/504 (there must be none), p50
and p99 latency, and the server's resident memory at the start and the end. Run it with
``python manage.py loadfault``; results go to artifacts/loadfault/.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from bench.clipbench import ROOT, log, multipart, photo_jpegs
from bench.hostile import Hostile

GROWTH_LIMIT = 0.10  # the server's memory may grow less than this from the start to the end
# What the server may do with each hostile kind (bench/hostile.py); "closed" is always fine (a worker
# killed by the run's own faults closes what it held).
HOSTILE_EXPECTED = {
    "idle": {"closed"},
    "stalled-body": {"408"},
    "endless-headers": {"431"},
    "chunked-flood": {"413", "503"},  # 503: the worker's memory budget was full
    "decode-bomb": {"200", "503"},
    "big-v1-text": {"400", "503"},
}
UNBUDGETED_MB = 128  # what no budget counts in a worker (README "Memory"): allocator slack, answers, headers
ENGINE_GROWTH_MB = 170  # what an engine grows over its first 10,000 requests (OpenVINO; README "Memory per replica")


def _png(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _raw(parts: list[bytes], boundary: str = "lf") -> tuple[bytes, str]:
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request_mix() -> list[tuple[str, str, str, bytes, dict]]:
    """(kind, method, path, body, headers): the valid, the invalid and the abusive, in a fixed order."""
    jpeg = photo_jpegs((640, 480), count=2)
    text = multipart("t", "a photo of a cat", None)
    image = multipart("image", jpeg[0], "a.jpg")
    bad_image = multipart("image", b"this is not an image at all", "x.jpg")
    bomb = multipart("image", _png((8000, 8000)), "bomb.png")  # 64 M pixels, over the per-image limit
    header_less = b"--lf\r\n\r\nno headers here\r\n"
    mixed = _raw(
        [
            b'--lf\r\nContent-Disposition: form-data; name="image-1"; filename="a.jpg"\r\n\r\n' + jpeg[1] + b"\r\n",
            b'--lf\r\nContent-Disposition: form-data; name="text-1"; \r\n\r\na red car\r\n',
        ]
    )

    def post(kind, path, body_type, headers=None):
        body, content_type = body_type
        return kind, "POST", path, body, {"Content-Type": content_type, **(headers or {})}

    valid = [
        post("text", "/syte_test/embeddings", text),
        post("text", "/syte_test/embeddings", text, {"request_id": "load-1"}),
        post("mixed", "/syte_test/embeddings", mixed),
        post("wearable", "/syte_test/wearable", image),
        post("image", "/syte_test/embeddings", image),
    ]
    invalid = [
        post("not-an-image", "/syte_test/embeddings", bad_image),
        post(
            "bad-utf8",
            "/syte_test/embeddings",
            _raw([b'--lf\r\nContent-Disposition: form-data; name="t"\r\n\r\n\xff\xfe\r\n']),
        ),
        post("empty", "/syte_test/embeddings", (b"", "multipart/form-data; boundary=lf")),
        post("json-to-multipart", "/syte_test/embeddings", (b'{"a": 1}', "application/json")),
        post(
            "unknown-feedback", "/syte_test/feedback", (b'{"request_id": "nope", "categories": []}', "application/json")
        ),
        ("bad-query", "POST", "/syte_test/wearable?top_k=zero", image[0], {"Content-Type": image[1]}),
    ]
    abusive = [
        post("too-many-parts", "/syte_test/embeddings", _raw([header_less] * 200)),
        post("pixel-bomb", "/syte_test/embeddings", bomb),
        post("long-text", "/syte_test/embeddings", multipart("t", "a" * 1_000_000, None)),
        post("preamble", "/syte_test/embeddings", _raw([b"x" * 100_000 + b"\r\n", text[0]])),
        post("deep-json", "/syte_test/feedback", (b"[" * 5000 + b"]" * 5000, "application/json")),
        # Declares a terabyte and sends none of it (on a connection of its own, closed after the answer).
        (
            "declared-huge",
            "POST",
            "/syte_test/embeddings",
            b"",
            {"Content-Type": text[1], "Content-Length": "999999999999", "Connection": "close"},
        ),
    ]
    # Mostly valid traffic, as a service sees it, with the others mixed in all along (and bench/hostile.py's
    # connections beside it).
    return valid * 6 + invalid + abusive


NORMAL_KINDS = frozenset({"text", "mixed", "wearable", "image"})


@dataclass
class Outcome:
    statuses: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=dict)
    unexpected: list = field(default_factory=list)  # 5xx other than 503 and 504
    connection_errors: int = 0
    latencies: list = field(default_factory=list)
    normal_latencies: list = field(default_factory=list)  # the valid kinds'
    normal_refused: list = field(default_factory=list)  # a valid request answered other than 200/503/504


def _children(master: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []


def _rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _server_rss(master: int) -> float:
    return _rss_mb([master, *_children(master)])


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakSampler:
    """The highest resident memory any worker reached while serving: each worker's peak (VmHWM) is reset
    once every worker is ready (so a replacement's model load is not counted), then read until it exits."""

    def __init__(self, master: int, port: int):
        self.master, self.port = master, port
        self.peak_mb = 0.0
        self._cleared: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _all_ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/readyz")
            ready = conn.getresponse().status == 200
            conn.close()
            return ready
        except (OSError, http.client.HTTPException):
            return False

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            workers = _children(self.master)
            if any(pid not in self._cleared for pid in workers) and self._all_ready():
                for pid in workers:
                    if pid not in self._cleared:
                        with contextlib.suppress(OSError):
                            Path(f"/proc/{pid}/clear_refs").write_text("5")
                        self._cleared.add(pid)
            for pid in workers:
                if pid in self._cleared:
                    peak = _status_kb(pid, "VmHWM:")
                    if peak is not None:
                        self.peak_mb = max(self.peak_mb, peak / 1024)


def drive(port: int, mix, *, total: int, concurrency: int, deadline: float, on_progress) -> Outcome:
    outcome, lock = Outcome(), threading.Lock()
    counter = iter(range(total))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            on_progress(n)
            kind, method, path, body, headers = mix[n % len(mix)]
            started = time.perf_counter()
            try:
                if "Content-Length" in headers:  # a declared length the body does not have
                    conn.putrequest(method, path)
                    for name, value in headers.items():
                        conn.putheader(name, value)
                    conn.endheaders()
                else:
                    conn.request(method, path, body, headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                if response.will_close or headers.get("Connection") == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                with lock:
                    outcome.connection_errors += 1
                    outcome.statuses["connection error"] += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                outcome.statuses[status] += 1
                outcome.by_kind.setdefault(kind, Counter())[status] += 1
                outcome.latencies.append(elapsed)
                if kind in NORMAL_KINDS:
                    outcome.normal_latencies.append(elapsed)
                    if status not in (200, 503, 504):
                        outcome.normal_refused.append(
                            {"kind": kind, "status": status, "body": payload[:300].decode("latin-1")}
                        )
                if status >= 500 and status not in (503, 504):
                    outcome.unexpected.append({"kind": kind, "status": status, "body": payload[:300].decode("latin-1")})
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 30))
    return outcome


def run(
    *, out: Path, requests: int, concurrency: int, seconds: float, model_dir: Path | None, idle_sockets: int = 600
) -> dict:
    from clipsite.config import load
    from embeddings.runtime.testmodel import build_test_model
    from tests.server import Server, server_env

    if model_dir is None:
        model_dir = ROOT / "var" / "test-models" / "vit-b-32-seed0"
        if not (model_dir / "model-clip" / "model.safetensors").exists():
            log("building the vit-b-32 test model (random weights)")
            build_test_model("vit-b-32", model_dir, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="clipsite-loadfault-"))
    mix = request_mix()
    env = server_env(tmp, model_dir, WEB_CONCURRENCY="2")
    limits = load(os.environ, base_dir=ROOT)[0].limits  # the server's own, from the same environment
    log(f"starting the server on {model_dir} (2 workers)")
    server = Server(env, tmp / "server.log")
    faults: list[dict] = []
    try:
        server.wait_ready(timeout=600)
        master = server.proc.pid
        started = time.monotonic()
        drive(server.port, mix, total=200, concurrency=16, deadline=started + 300, on_progress=lambda n: None)
        worker_start_mb = max(_rss_mb([pid]) for pid in _children(master))  # warm, before any hostile load
        # The hostile kinds once too before the start is measured: the heap their decodes leave to the
        # allocator is there at the end as well, so the growth compares like with like (a leak, not a peak).
        warm = Hostile(
            server.port, deadline=time.monotonic() + 15, idle_sockets=50, max_request_bytes=limits.max_request_bytes
        )
        warm.start()
        drive(server.port, mix, total=200, concurrency=16, deadline=time.monotonic() + 300, on_progress=lambda n: None)
        warm.stop()
        rss_start = _server_rss(master)
        log(f"warm: server {rss_start:.0f} MB resident; {requests} requests at concurrency {concurrency}")
        fault_lock = threading.Lock()

        def on_progress(n: int) -> None:
            # A quarter of the way: SIGKILL a worker mid-traffic; half way: SIGTERM another (it drains).
            for at, sig in ((requests // 4, signal.SIGKILL), (requests // 2, signal.SIGTERM)):
                if n == at:
                    with fault_lock:
                        workers = _children(master)
                        if workers:
                            victim = workers[0] if sig == signal.SIGKILL else workers[-1]
                            os.kill(victim, sig)
                            faults.append({"at_request": n, "signal": sig.name, "worker": victim})
                            log(f"{sig.name} to worker {victim} at request {n}")

        t0 = time.monotonic()
        hostile = Hostile(
            server.port, deadline=t0 + seconds, idle_sockets=idle_sockets, max_request_bytes=limits.max_request_bytes
        )
        with PeakSampler(master, server.port) as sampler:
            hostile.start()
            outcome = drive(
                server.port,
                mix,
                total=requests,
                concurrency=concurrency,
                deadline=t0 + seconds,
                on_progress=on_progress,
            )
            wall = time.monotonic() - t0
            hostile_outcomes = hostile.stop()
        server.wait_ready(timeout=300)  # the replaced workers are back
        drive(server.port, mix, total=200, concurrency=16, deadline=time.monotonic() + 300, on_progress=lambda n: None)
        rss_end = _server_rss(master)
    finally:
        server.stop()
    lat = sorted(outcome.latencies) or [float("nan")]
    normal = sorted(outcome.normal_latencies) or [float("nan")]
    hostile_unexpected = {
        kind: {o: n for o, n in counts.items() if o not in HOSTILE_EXPECTED.get(kind, set()) | {"closed"}}
        for kind, counts in hostile_outcomes.items()
    }
    hostile_unexpected = {k: v for k, v in hostile_unexpected.items() if v}
    worker_bound_mb = worker_start_mb + ENGINE_GROWTH_MB + limits.worker_memory_bytes / 2**20 + UNBUDGETED_MB
    sent = sum(outcome.statuses.values())
    report = {
        "requests": requests,
        "answered": sent,
        "concurrency": concurrency,
        "wall_seconds": round(wall, 1),
        "per_second": round(sent / wall, 1) if wall else 0.0,
        "statuses": {str(k): v for k, v in sorted(outcome.statuses.items(), key=lambda kv: str(kv[0]))},
        "by_kind": {k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(outcome.by_kind.items())},
        "unexpected_5xx": outcome.unexpected,
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
        "normal_p50_ms": round(1000 * statistics.median(normal), 1),
        "normal_p99_ms": round(1000 * normal[min(len(normal) - 1, int(len(normal) * 0.99))], 1),
        "normal_refused": outcome.normal_refused,
        "hostile": hostile_outcomes,
        "hostile_unexpected": hostile_unexpected,
        "worker_start_mb": round(worker_start_mb, 1),
        "worker_peak_mb": round(sampler.peak_mb, 1),
        "worker_bound_mb": round(worker_bound_mb, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None,
        "faults": faults,
        "model": str(model_dir),
    }
    report["ok"] = (
        not report["unexpected_5xx"]
        and (report["rss_growth"] or 0) < GROWTH_LIMIT
        and sent == requests
        and not hostile_unexpected
        and not outcome.normal_refused
        and sampler.peak_mb <= worker_bound_mb
    )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    return report


def _counts(counts: dict) -> str:
    return ", ".join(f"{status}: {n}" for status, n in counts.items())


def markdown(report: dict) -> str:
    faults = report["faults"]
    lines = [
        f"{report['answered']} of {report['requests']} requests at concurrency {report['concurrency']} in "
        f"{report['wall_seconds']} s ({report['per_second']}/s); p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms.",
        "",
        "| status | count |",
        "|---|---|",
        *(f"| {status} | {count} |" for status, count in report["statuses"].items()),
        "",
        "| request | statuses |",
        "|---|---|",
        *(
            f"| {kind} | {', '.join(f'{s}: {n}' for s, n in counts.items())} |"
            for kind, counts in report["by_kind"].items()
        ),
        "",
        f"5xx other than 503/504: {len(report['unexpected_5xx'])}.",
        f"Normal requests (valid kinds) meanwhile: p50 {report['normal_p50_ms']} ms, p99 {report['normal_p99_ms']} ms.",
        "",
        "| hostile connection | what the server did |",
        "|---|---|",
        *(f"| {kind} | {_counts(counts)} |" for kind, counts in report["hostile"].items()),
        "",
        f"Hostile outcomes not expected: {report['hostile_unexpected'] or 'none'}.",
        f"Worker memory: {report['worker_start_mb']} MB resident when warm, peak {report['worker_peak_mb']} MB "
        f"while serving; the stated bound (warm + {ENGINE_GROWTH_MB} MB engine growth + CLIP_WORKER_MEMORY_MB + "
        f"{UNBUDGETED_MB} MB) is "
        f"{report['worker_bound_mb']} MB.",
        "Faults: " + ", ".join("{signal} to worker {worker} at request {at_request}".format(**f) for f in faults) + ".",
        f"Server memory (master + workers, resident): {report['rss_start_mb']} MB at the start, "
        f"{report['rss_end_mb']} MB at the end ({100 * (report['rss_growth'] or 0):+.1f}%).",
        f"Verdict: {'ok' if report['ok'] else 'FAILED'}.",
    ]
    return "\n".join(lines) + "\n"
