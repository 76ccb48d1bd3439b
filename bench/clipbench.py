"""clipsite's benchmark: the real server over loopback against every bare engine and the naive way.

One run measures, back to back on the same machine: what the CPU offers (AMX, native bfloat16), every
bare backend/dtype in process (batch 1 and batched, and its cosine to float32), the naive server (one
request at a time through the stock processor and model), then the real server as README starts it,
with the backend prepare_model chose, driven by 1 to 64 concurrent clients with real photographs (JPEG
at 640x480, 1920x1080, 4000x3000) and short texts; with ``--peer infinity URL``, an infinity-emb server
on the same model through its own API, with the same inputs and clients. It reports throughput,
latency, ratios to the best bare engine, the vectors' cosine to transformers' float32 pipeline, memory
per worker and time to ready, as JSON and a Markdown table.
"""

from __future__ import annotations

import gc
import http.client
import io
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "embeddings" / "runtime" / "assets" / "photos"
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080), "4000x3000": (4000, 3000)}
TEXTS = [
    "a photo of a cat",
    "a red sports car",
    "two dogs playing in the snow",
    "a bowl of fresh fruit",
    "an astronaut on the moon",
    "a man riding a motorcycle",
    "a cup of coffee on a table",
    "a rocket launch",
    "a woman in a blue dress",
    "a pair of white sneakers",
    "a city street at night",
    "a sandy beach at sunset",
    "a black leather handbag",
    "a person wearing sunglasses",
    "a plate of spaghetti",
    "a wooden chair",
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def photo_jpegs(size: tuple[int, int], count: int = 4) -> list[bytes]:
    """Real photographs at ``size`` (cropped to its aspect ratio, then scaled), as JPEG quality 90."""
    out = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:count]:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        target = size[0] / size[1]
        if w / h > target:
            nw = int(h * target)
            image = image.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        else:
            nh = int(w / target)
            image = image.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        buf = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def multipart(key: str, value: bytes | str, filename: str | None) -> tuple[bytes, str]:
    boundary = "clipsitebench"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"'
    if filename:
        head += f'; filename="{filename}"\r\nContent-Type: image/jpeg'
    body = head.encode() + b"\r\n\r\n" + (value.encode() if isinstance(value, str) else value)
    body += f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- the bare model and the naive way ------------------------------------------------------------
def timed_rate(fn, items_per_call: int, seconds: float) -> tuple[float, float]:
    """(items per second, median seconds per call) of ``fn`` run repeatedly for about ``seconds``."""
    fn()  # warm
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items_per_call * len(times) / sum(times), statistics.median(times)


def fresh_process_load_seconds(model_dir: Path) -> float:
    """A bare from_pretrained of model and processor in a new Python process, imports included."""
    import subprocess
    import sys

    code = (
        "import time; t = time.perf_counter(); from transformers import AutoModel, AutoProcessor; "
        f"AutoModel.from_pretrained({str(model_dir / 'model-clip')!r}); "
        f"AutoProcessor.from_pretrained({str(model_dir / 'processor-clip')!r}); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_model(model_dir: Path, jpeg_640: list[bytes], seconds: float, threads: int) -> dict:
    import torch
    from transformers import AutoModel, AutoProcessor

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir / "model-clip").eval()
    processor = AutoProcessor.from_pretrained(model_dir / "processor-clip")
    load_seconds = time.perf_counter() - t0

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpeg_640]
    result = {
        "from_pretrained_seconds": load_seconds,
        "fresh_process_from_pretrained_seconds": fresh_process_load_seconds(model_dir),
        "torch_threads": threads,
    }
    with torch.inference_mode():
        # transformers' own float32 pipeline: what every served vector is compared with.
        result["reference"] = {
            "image": feats(model.get_image_features(**processor(images=pil, return_tensors="pt"))).numpy(),
            "text": feats(model.get_text_features(**processor.tokenizer(TEXTS, padding=True, return_tensors="pt"))),
        }
        result["reference"]["text"] = result["reference"]["text"].numpy()

        def naive_image():
            for data in jpeg_640:
                inputs = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")
                feats(model.get_image_features(**inputs))

        def naive_text():
            for text in TEXTS[:8]:
                feats(model.get_text_features(**processor.tokenizer([text], return_tensors="pt")))

        result["naive_image_per_s"], _ = timed_rate(naive_image, len(jpeg_640), seconds)
        result["naive_text_per_s"], _ = timed_rate(naive_text, 8, seconds)
    return result  # the model is freed with this frame (the caller collects) before the server starts


def measure_backends(model_dir: Path, jpeg_640: list[bytes], seconds: float, threads: int) -> list[dict]:
    """Every backend/dtype prepare_model knows, bare in this process on this CPU: batch 1 and batched
    rates for images and texts, and the cosine of its vectors to float32 PyTorch's on the same inputs."""
    import torch

    from embeddings.runtime.loading import folder_lock, load_model, load_processor, resolve_model_source, text_context
    from embeddings.runtime.prepare import CPU_CANDIDATES, PARITY_FLOOR, min_cosine, open_candidate, prepared_dir
    from embeddings.runtime.preprocessing import Preprocessing

    torch.set_num_threads(threads)
    models = ROOT / "var" / "test-models"
    source = resolve_model_source(str(model_dir), models)
    folder = prepared_dir(source.model_dir, models)
    model = load_model(source)
    preprocessing = Preprocessing(
        load_processor(source), family=model.config.model_type, context=text_context(model.config)
    )
    pixels = np.stack([preprocessing.image(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpeg_640])
    pixels16 = np.concatenate([pixels] * 4)[:16]
    tokens = preprocessing.tokenize(TEXTS)
    texts32, text1 = preprocessing.pad(tokens + tokens), preprocessing.pad(tokens[:1])
    reference = None
    rows = []
    for backend, dtype in CPU_CANDIDATES:
        row = {"backend": backend, "dtype": dtype}
        rows.append(row)
        try:
            with folder_lock(folder / ".lock"):
                opened, _ = open_candidate(
                    backend, dtype, model, folder, source, pixels, *texts32, {"image": threads, "text": threads}
                )
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            log(f"bare {backend}/{dtype}: cannot run ({row['error']})")
            continue
        try:
            got = {"image": opened.image_features(pixels16), "text": opened.text_features(*texts32)}
            if reference is None:  # the first candidate is float32 PyTorch
                reference = got
            row["runs"] = opened.dtype
            row["image_cosine"] = min_cosine(got["image"], reference["image"])
            row["text_cosine"] = min_cosine(got["text"], reference["text"])
            row["faithful"] = (
                row["image_cosine"] >= PARITY_FLOOR["image"] and row["text_cosine"] >= PARITY_FLOOR["text"]
            )
            image, text = opened.image_features, opened.text_features
            _, row["image_b1_seconds"] = timed_rate(partial(image, pixels[:1]), 1, seconds / 2)
            row["image_b16_per_s"], _ = timed_rate(partial(image, pixels16), 16, seconds)
            _, row["text_b1_seconds"] = timed_rate(partial(text, *text1), 1, seconds / 2)
            row["text_b32_per_s"], _ = timed_rate(partial(text, *texts32), 32, seconds)
            log(
                f"bare {backend}/{dtype} (runs {row['runs']}): images b1 {1000 * row['image_b1_seconds']:.1f} ms, "
                f"b16 {row['image_b16_per_s']:.1f}/s; texts b1 {1000 * row['text_b1_seconds']:.1f} ms, "
                f"b32 {row['text_b32_per_s']:.1f}/s; cosine {row['image_cosine']:.5f} / {row['text_cosine']:.5f}"
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table; the others are still measured
            row = {"backend": backend, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows[-1] = row
            log(f"bare {backend}/{dtype}: failed ({row['error']})")
        finally:
            opened.close()
    return rows


def best_bare(backends: list[dict]) -> dict:
    """The best faithful bare engine for each measure (each may be a different backend)."""
    faithful = [r for r in backends if r.get("faithful")]
    if not faithful:
        raise RuntimeError("no bare engine ran faithfully to float32: see the log above")

    def best(key, pick):
        row = pick(faithful, key=lambda r: r[key])
        return {"value": row[key], "engine": f"{row['backend']}/{row['dtype']}"}

    return {
        "image_b16_per_s": best("image_b16_per_s", max),
        "text_b32_per_s": best("text_b32_per_s", max),
        "image_b1_seconds": best("image_b1_seconds", min),
        "text_b1_seconds": best("text_b1_seconds", min),
    }


# --- driving a server ----------------------------------------------------------------------------
@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    vectors: dict[int, list[float]] = field(default_factory=dict)

    def summary(self, items_per_request: int = 1) -> dict:
        lat = sorted(self.latencies) or [float("nan")]
        return {
            "requests": self.requests,
            "errors": self.errors,
            "per_s": self.requests * items_per_request / self.seconds if self.seconds else 0.0,
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        }


Request = tuple[str, bytes, dict[str, str]]  # path, body, headers


def clipsite_requests(bodies: list[tuple[bytes, str]]) -> list[Request]:
    return [("/syte_test/embeddings", body, {"Content-Type": ctype}) for body, ctype in bodies]


def clipsite_vector(payload: bytes) -> list[float]:
    return next(iter(orjson.loads(payload)["vectors"].values()))


def drive(
    port: int,
    requests: list[Request],
    *,
    concurrency: int,
    seconds: float | None = None,
    total: int | None = None,
    keep_vectors: bool = False,
    host: str = "127.0.0.1",
    vector_of=clipsite_vector,
) -> LoadResult:
    """``concurrency`` clients, each on a keep-alive connection, sending ``requests`` round robin."""
    result, lock = LoadResult(), threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + (seconds or 1e9)

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=300)
        while True:
            with lock:
                n = next(counter)
            if (total is not None and n >= total) or time.perf_counter() > deadline:
                break
            path, body, headers = requests[n % len(requests)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=300)
                ok, payload = False, b""
            elapsed = time.perf_counter() - t0
            with lock:
                result.requests += ok
                result.errors += not ok
                if ok:
                    result.latencies.append(elapsed)
                    if keep_vectors and n < len(requests):
                        result.vectors[n] = vector_of(payload)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - started
    return result


def worker_memory_mb(master_pid: int) -> list[dict]:
    """Each gunicorn worker's memory (the master's children), oldest first, from /proc/PID/smaps_rollup:
    rss (resident, shared pages counted whole), pss (shared pages split between their sharers) and
    private (what this worker alone holds: what one more worker costs)."""
    children = []
    for task in Path(f"/proc/{master_pid}/task").iterdir():
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    workers = []
    for pid in sorted(children):
        try:
            workers.append(process_memory_mb(pid))
        except (OSError, ValueError):
            continue
    return workers


def process_memory_mb(pid: int) -> dict:
    """One process's rss, pss and private memory in MB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value) / 1024
    return {
        "rss": fields.get("Rss", 0.0),
        "pss": fields.get("Pss", 0.0),
        "private": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0),
    }


def test_model_dir(preset: str) -> Path:
    """The random-weight model of ``preset`` under var/test-models/ (the tests' folder), built once."""
    from embeddings.runtime.testmodel import build_test_model

    model_dir = ROOT / "var" / "test-models" / f"{preset}-seed0"
    if not (model_dir / "model-clip" / "model.safetensors").exists():
        log(f"building the {preset} test model (random weights, the real architecture)")
        build_test_model(preset, model_dir, seed=0)
    return model_dir


def start_server(model_dir: Path, tmp: Path, name: str, **env: str):
    from tests.server import Server, server_env

    env = server_env(tmp / name, model_dir, **env)
    (tmp / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    server = Server(env, tmp / name / "server.log")
    server.wait_ready(timeout=900)
    wall_s = time.perf_counter() - t0
    return server, wall_s, server.details()  # /readyz?verbose=1: the backend, timings, what was measured


def cosine_rows(a: dict[int, list[float]], b: np.ndarray) -> float:
    """The least cosine between the vectors in ``a`` (by request index) and the rows of ``b``."""
    keys = sorted(k for k in a if k < len(b))
    if not keys:
        return float("nan")
    x, y = np.array([a[k] for k in keys]), b[keys]
    return float(np.min(np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))


def measure_server(port: int, inputs: dict[str, list[Request]], concurrency, seconds, label, **how) -> list[dict]:
    """Each input set at each client count; the first requests' vectors at 1 client are kept."""
    runs = []
    for name, requests in inputs.items():
        for c in concurrency:
            r = drive(port, requests, concurrency=c, seconds=seconds, keep_vectors=(c == 1), **how)
            row = {"input": name, "concurrency": c, **r.summary()}
            if c == 1:
                row["vectors"] = r.vectors
            runs.append(row)
            log(
                f"{label} {name:>15} c={c:<3} {row['per_s']:7.1f}/s p50 {row['p50_ms']:7.1f} ms "
                f"p99 {row['p99_ms']:7.1f} ms errors {row['errors']}"
            )
    return runs


# --- the whole run -------------------------------------------------------------------------------
def run(
    *,
    out: Path,
    seconds: float = 6.0,
    concurrency: tuple[int, ...] = (1, 4, 16, 64),
    requests_for_memory: int = 10_000,
    model_dir: Path | None = None,
    peer: tuple[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    import tempfile

    from embeddings.runtime.cpu import cpu_features

    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = test_model_dir("vit-b-32")
    peer_client = None
    if peer is not None:
        from bench.peers import InfinityPeer

        if peer[0] != "infinity":
            raise ValueError(f"unknown peer {peer[0]!r}: infinity is the one known")
        peer_client = InfinityPeer(peer[1])
        log(f"peer: infinity at {peer[1]} serving {peer_client.model}")
    jpegs = {name: photo_jpegs(size) for name, size in SIZES.items()}
    inputs = {
        f"image {name}": clipsite_requests([multipart("image", b, f"{name}.jpg") for b in data])
        for name, data in jpegs.items()
    }
    inputs["text"] = clipsite_requests([multipart("text", t, None) for t in TEXTS])
    cpu = cpu_features()
    report: dict = {
        "machine": {
            "cores": cores,
            "cpu": cpu["model"],
            "flags": cpu["flags"],
            "amx": cpu["amx"],
            "native_bf16": cpu["native_bf16"],
            "python": platform.python_version(),
        },
        "model": str(model_dir),
    }
    log(f"CPU: {cpu['model']}, {cores} cores, AMX {'yes' if cpu['amx'] else 'no'}, flags {' '.join(cpu['flags'])}")

    log(f"every bare backend/dtype, in process ({cores} threads)")
    report["backends"] = measure_backends(model_dir, jpegs["640x480"], seconds, cores)
    gc.collect()
    report["best"] = best_bare(report["backends"])
    log(f"naive baseline and transformers' float32 vectors ({cores} torch threads)")
    bare = measure_model(model_dir, jpegs["640x480"], seconds, cores)
    reference = bare.pop("reference")
    gc.collect()
    report["bare"] = bare
    log(f"naive: {bare['naive_image_per_s']:.1f} images/s, {bare['naive_text_per_s']:.1f} texts/s")

    tmp = Path(tempfile.mkdtemp(prefix="clipsite-bench-"))
    serving = {"WEB_CONCURRENCY": None, "CLIP_TORCH_THREADS": None, **(env or {})}  # the product's defaults
    log("starting the server as README starts it")
    server, wall_ready, ready = start_server(model_dir, tmp, "server", **serving)
    try:
        report["server"] = {
            "time_to_ready_wall_s": wall_ready,
            "model_ready_s": ready.get("ready_seconds"),
            "worker_seconds_to_ready": ready.get("process_seconds_to_ready"),
            "backend": ready.get("backend"),
            "why": ready.get("why"),
            "measured_by_prepare": ready.get("measured"),
            "workers_at_ready": worker_memory_mb(server.proc.pid),
        }
        log(f"the server chose {_backend(ready.get('backend'))}: {ready.get('why')}")
        # Warm-up traffic: the allocators and kernel caches meet the batch shapes real traffic brings.
        drive(server.port, inputs["text"] + inputs["image 640x480"], concurrency=16, total=400)
        report["server"]["workers_after_warmup"] = worker_memory_mb(server.proc.pid)
        runs = measure_server(server.port, inputs, concurrency, seconds, "clipsite")
        report["server"]["runs"] = runs
        log(f"memory: {requests_for_memory} requests (1 in 10 an image) at concurrency 16")
        mixed = inputs["text"] * 9 + inputs["image 640x480"][:2]
        r = drive(server.port, mixed, concurrency=16, total=requests_for_memory)
        report["server"]["memory_requests"] = r.requests
        report["server"]["memory_errors"] = r.errors
        report["server"]["workers_after_requests"] = worker_memory_mb(server.proc.pid)
    finally:
        server.stop()
    report["server"]["vectors"] = _vector_parity(runs, reference)

    if peer_client is not None:
        log(f"peer infinity {peer_client.version or ''}: the same inputs and clients")
        peer_inputs = {f"image {n}": [peer_client.image_request(b) for b in data] for n, data in jpegs.items()}
        peer_inputs["text"] = [peer_client.text_request(t) for t in TEXTS]
        how = {"host": peer_client.host, "vector_of": peer_client.vector}
        drive(peer_client.port, peer_inputs["text"] + peer_inputs["image 640x480"], concurrency=16, total=100, **how)
        peer_runs = measure_server(peer_client.port, peer_inputs, concurrency, seconds, "infinity", **how)
        report["peer"] = {**peer_client.describe(), "runs": peer_runs, "vectors": _vector_parity(peer_runs, reference)}

    for runs_of in [report["server"]["runs"]] + ([report["peer"]["runs"]] if "peer" in report else []):
        for row in runs_of:
            row.pop("vectors", None)
    report["total_seconds"] = time.perf_counter() - started
    report["targets"] = targets(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    log(f"done in {report['total_seconds']:.0f} s: {out / 'results.md'}")
    print(markdown(report))
    return report


def _vector_parity(runs: list[dict], reference: dict[str, np.ndarray]) -> dict:
    """The least cosine of the served vectors (640x480 photos, texts) to transformers' float32 pipeline."""
    image = next((r for r in runs if r["input"] == "image 640x480" and r["concurrency"] == 1), {})
    text = next((r for r in runs if r["input"] == "text" and r["concurrency"] == 1), {})
    return {  # NaN where the run had no single client (--concurrency without 1)
        "image_cosine": cosine_rows(image.get("vectors", {}), reference["image"]),
        "text_cosine": cosine_rows(text.get("vectors", {}), reference["text"]),
    }


def _run(runs: list[dict], name: str, c: int) -> dict | None:
    """The run's row for ``name`` at ``c`` clients, or None where it did not measure it."""
    return next((r for r in runs if r["input"] == name and r["concurrency"] == c), None)


def targets(report: dict) -> list[dict]:
    """Issue 10's targets: ratios to this CPU's best bare engine, measured in this run."""
    best, server = report["best"], report["server"]
    runs = server["runs"]
    rows = []

    def add(name, value, goal, ok):
        rows.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    for size, goal in (("image 640x480", 0.50), ("image 4000x3000", 0.40)):
        if row := _run(runs, size, 16):
            ratio = row["per_s"] / best["image_b16_per_s"]["value"]
            add(f"{size} c=16 / best bare images/s", round(ratio, 3), f">= {goal}", ratio >= goal)
    if row := _run(runs, "text", 16):
        ratio = row["per_s"] / best["text_b32_per_s"]["value"]
        add("short text c=16 / best bare texts/s", round(ratio, 3), ">= 0.40", ratio >= 0.40)
    if row := _run(runs, "image 640x480", 1):
        budget = 1000 * best["image_b1_seconds"]["value"] + 10
        add(
            "image 640x480 c=1 p50 ms (best bare batch 1 + 10 ms)",
            round(row["p50_ms"], 1),
            f"<= {budget:.1f}",
            row["p50_ms"] <= budget,
        )
    if row := _run(runs, "text", 1):
        add("short text c=1 p50 ms", round(row["p50_ms"], 1), "<= 8", row["p50_ms"] <= 8)
        # On the AMX machine the issue measured, 8 ms left 3.7 ms above the bare batch-1 text forward.
        overhead = row["p50_ms"] - 1000 * best["text_b1_seconds"]["value"]
        add("short text c=1 p50 minus best bare batch-1 text (ms)", round(overhead, 1), "<= 3.7", overhead <= 3.7)
    vectors = server["vectors"]
    add(
        "served image vectors, cosine to transformers float32",
        round(vectors["image_cosine"], 6),
        ">= 0.999",
        vectors["image_cosine"] >= 0.999,
    )
    add(
        "served text vectors, cosine to transformers float32",
        round(vectors["text_cosine"], 6),
        ">= 0.9999",
        vectors["text_cosine"] >= 0.9999,
    )
    workers = server["workers_after_requests"]
    if len(workers) >= 2:
        first, second = workers[0]["rss"], workers[1]["private"]
        add(
            "second worker's own memory (private MB) / first worker's RSS",
            round(second / first, 3),
            "< 0.5",
            second < first / 2,
        )
    before = sum(w["rss"] for w in server["workers_after_warmup"])
    after = sum(w["rss"] for w in workers)
    growth = after / before - 1 if before else float("nan")
    add(f"RSS growth after {server['memory_requests']} requests", f"{100 * growth:+.1f}%", "<= +10%", growth <= 0.10)
    ratio = (server["worker_seconds_to_ready"] or 0) / report["bare"]["fresh_process_from_pretrained_seconds"]
    add("worker start to ready vs bare from_pretrained (new processes)", round(ratio, 2), "< 2", ratio < 2)
    return rows


def _backend(described) -> str:
    """/readyz's backend per tower ({"image": "onnx/float32", ...}) in a few words."""
    if isinstance(described, dict):
        return ", ".join(f"{tower} {choice}" for tower, choice in described.items())
    return str(described)


def _memory(workers: list[dict]) -> str:
    return "; ".join(f"RSS {w['rss']:.0f}, PSS {w['pss']:.0f}, private {w['private']:.0f}" for w in workers)


def markdown(report: dict) -> str:
    best, bare, server, machine = report["best"], report["bare"], report["server"], report["machine"]
    peer = report.get("peer")
    lines = [
        f"Machine: {machine['cores']} cores, {machine['cpu']} (AMX: {'yes' if machine['amx'] else 'no'}; native "
        f"bfloat16: {'yes' if machine['native_bf16'] else 'no'}; {' '.join(machine['flags'])}), Python "
        f"{machine['python']}; model: random-weight vit-b-32 (openai/clip-vit-base-patch32's architecture).",
        "",
        "Bare engines, in process, on the 640x480 photos and the short texts:",
        "",
        "| backend/dtype | runs | images/s (batch 16) | batch-1 image ms | texts/s (batch 32) | batch-1 text ms "
        "| cosine to float32 (images / texts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["backends"]:
        if "error" in r:
            lines.append(f"| {r['backend']}/{r['dtype']} | - | - | - | - | - | cannot run: {r['error']} |")
            continue
        mark = "" if r["faithful"] else " (below the floor)"
        lines.append(
            f"| {r['backend']}/{r['dtype']} | {r['runs']} | {r['image_b16_per_s']:.1f} | "
            f"{1000 * r['image_b1_seconds']:.1f} | {r['text_b32_per_s']:.1f} | {1000 * r['text_b1_seconds']:.1f} | "
            f"{r['image_cosine']:.5f} / {r['text_cosine']:.5f}{mark} |"
        )
    lines += [
        "",
        f"Best faithful bare engine: images {best['image_b16_per_s']['value']:.1f}/s "
        f"({best['image_b16_per_s']['engine']}), batch-1 image {1000 * best['image_b1_seconds']['value']:.1f} ms "
        f"({best['image_b1_seconds']['engine']}); texts {best['text_b32_per_s']['value']:.1f}/s "
        f"({best['text_b32_per_s']['engine']}), batch-1 text {1000 * best['text_b1_seconds']['value']:.1f} ms "
        f"({best['text_b1_seconds']['engine']}). Naive server (one request at a time, stock processor, float32 "
        f"PyTorch): {bare['naive_image_per_s']:.1f} images/s (640x480), {bare['naive_text_per_s']:.1f} texts/s.",
        "",
        f"The server, as README starts it: {_backend(server.get('backend'))} (prepare_model: {server.get('why')}).",
        "",
    ]
    head = "| input | clients | per s | p50 ms | p99 ms | x best bare | x naive |"
    rule = "|---|---|---|---|---|---|---|"
    if peer:
        head += " infinity per s | infinity p50 ms | x infinity |"
        rule += "---|---|---|"
    lines += [head + " errors |", rule + "---|"]
    for r in server["runs"]:
        is_text = r["input"] == "text"
        bare_rate = best["text_b32_per_s" if is_text else "image_b16_per_s"]["value"]
        naive = bare["naive_text_per_s"] if is_text else bare["naive_image_per_s"]
        line = (
            f"| {r['input']} | {r['concurrency']} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['per_s'] / bare_rate:.2f} | {r['per_s'] / naive:.2f} |"
        )
        if peer:
            p = _run(peer["runs"], r["input"], r["concurrency"])
            ratio = r["per_s"] / p["per_s"] if p["per_s"] else float("inf")
            line += f" {p['per_s']:.1f} | {p['p50_ms']:.1f} | {ratio:.2f} |"
        lines.append(line + f" {r['errors']} |")
    vectors = server["vectors"]
    lines += [
        "",
        f"Served vectors against transformers' float32 pipeline: cosine >= {vectors['image_cosine']:.6f} (640x480 "
        f"photos), >= {vectors['text_cosine']:.6f} (texts).",
    ]
    if peer:
        lines.append(
            f"infinity {peer.get('version') or ''} ({peer['model']}): cosine >= {peer['vectors']['image_cosine']:.6f}"
            f" (images), >= {peer['vectors']['text_cosine']:.6f} (texts) to the same pipeline."
        )
    lines += [
        f"Time to ready: a worker is ready {server['worker_seconds_to_ready']:.2f} s after it starts (Django, "
        f"imports, load, warm-up), against {bare['fresh_process_from_pretrained_seconds']:.2f} s for a bare "
        f"from_pretrained of the same folder in a new process; {server['time_to_ready_wall_s']:.1f} s from "
        "launching scripts/start.sh (migrations and prepare_model's measurements included).",
        f"Memory per worker (MB): at ready {_memory(server['workers_at_ready'])}; after "
        f"{server['memory_requests']} requests {_memory(server['workers_after_requests'])}.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]
    ]
    lines.append(f"\nBenchmark wall time: {report['total_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
