"""clipsite's benchmark: the real server over loopback against the bare model and the naive way.

One run measures, back to back on the same machine: the bare model's forward (batch 1 and batched),
the naive server (one request at a time through the stock processor and model), then the real server
as README starts it, driven by 1 to 64 concurrent clients with real photographs (JPEG at 640x480,
1920x1080, 4000x3000) and short texts. It reports throughput, latency, ratios, memory per worker and
time to ready, as JSON and a Markdown table.
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
    pixels = processor(images=pil * 8, return_tensors="pt")["pixel_values"]
    text_batch = processor.tokenizer(TEXTS * 2, padding="longest", return_tensors="pt")
    result = {
        "from_pretrained_seconds": load_seconds,
        "fresh_process_from_pretrained_seconds": fresh_process_load_seconds(model_dir),
        "torch_threads": threads,
    }
    with torch.inference_mode():
        result["image_b1_per_s"], result["image_b1_seconds"] = timed_rate(
            lambda: feats(model.get_image_features(pixel_values=pixels[:1])), 1, seconds
        )
        result["image_b16_per_s"], _ = timed_rate(
            lambda: feats(model.get_image_features(pixel_values=pixels[:16])), 16, seconds
        )
        result["text_b32_per_s"], _ = timed_rate(lambda: feats(model.get_text_features(**text_batch)), 32, seconds)

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


# --- driving the server --------------------------------------------------------------------------
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


def drive(
    port: int,
    bodies: list[tuple[bytes, str]],
    *,
    concurrency: int,
    seconds: float | None = None,
    total: int | None = None,
    keep_vectors: bool = False,
) -> LoadResult:
    """``concurrency`` clients, each on a keep-alive connection, sending ``bodies`` round robin."""
    result, lock = LoadResult(), threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + (seconds or 1e9)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                n = next(counter)
            if (total is not None and n >= total) or time.perf_counter() > deadline:
                break
            body, content_type = bodies[n % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/syte_test/embeddings", body, {"Content-Type": content_type})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                ok, payload = False, b""
            elapsed = time.perf_counter() - t0
            with lock:
                result.requests += ok
                result.errors += not ok
                if ok:
                    result.latencies.append(elapsed)
                    if keep_vectors and n < len(bodies):
                        data = orjson.loads(payload)
                        result.vectors[n] = next(iter(data["vectors"].values()))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - started
    return result


def worker_rss_mb(master_pid: int) -> list[float]:
    """Resident memory of gunicorn's workers (the master's children), from /proc."""
    children = []
    for task in Path(f"/proc/{master_pid}/task").iterdir():
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    sizes = []
    for pid in children:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return sizes


def start_server(model_dir: Path, tmp: Path, name: str, **env: str):
    from tests.server import Server, server_env

    env = server_env(tmp / name, model_dir, **env)
    (tmp / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    server = Server(env, tmp / name / "server.log")
    ready = server.wait_ready(timeout=600)
    return server, time.perf_counter() - t0, ready


def cosine_rows(a: dict[int, list[float]], b: dict[int, list[float]]) -> float:
    keys = sorted(set(a) & set(b))
    if not keys:
        return float("nan")
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    return float(np.min(np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))


# --- the whole run -------------------------------------------------------------------------------
def run(
    *,
    out: Path,
    seconds: float = 6.0,
    concurrency: tuple[int, ...] = (1, 4, 16, 64),
    requests_for_memory: int = 10_000,
    model_dir: Path | None = None,
    compare_serving: bool = True,
    int8: bool = True,
) -> dict:
    import tempfile

    from embeddings.runtime.testmodel import build_test_model

    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = ROOT / "var" / "test-models" / "vit-b-32-seed0"
        if not (model_dir / "model-clip" / "model.safetensors").exists():
            log("building the vit-b-32 test model (random weights, openai/clip-vit-base-patch32's architecture)")
            build_test_model("vit-b-32", model_dir, seed=0)
    jpegs = {name: photo_jpegs(size) for name, size in SIZES.items()}
    image_bodies = {name: [multipart("image", b, f"{name}.jpg") for b in data] for name, data in jpegs.items()}
    text_bodies = [multipart("text", t, None) for t in TEXTS]
    report: dict = {
        "machine": {
            "cores": cores,
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "model": str(model_dir),
    }

    log(f"bare model and naive baseline, in process ({cores} torch threads)")
    bare = measure_model(model_dir, jpegs["640x480"], seconds, cores)
    gc.collect()
    report["bare"] = bare
    log(
        f"bare: images b1 {bare['image_b1_per_s']:.1f}/s, b16 {bare['image_b16_per_s']:.1f}/s, "
        f"texts b32 {bare['text_b32_per_s']:.1f}/s; naive: {bare['naive_image_per_s']:.1f} images/s, "
        f"{bare['naive_text_per_s']:.1f} texts/s"
    )

    tmp = Path(tempfile.mkdtemp(prefix="clipsite-bench-"))
    default_serving = {"WEB_CONCURRENCY": None, "CLIP_TORCH_THREADS": None}  # the product's defaults
    log("starting the server as README starts it (float32)")
    server, wall_ready, ready = start_server(model_dir, tmp, "fp32", **default_serving)
    try:
        report["server"] = {
            "time_to_ready_wall_s": wall_ready,
            "model_ready_s": ready.get("ready_seconds"),
            "worker_seconds_to_ready": ready.get("process_seconds_to_ready"),
            "backend": ready.get("backend"),
            "workers_rss_mb_at_ready": worker_rss_mb(server.proc.pid),
        }
        # Warm-up traffic: the allocators and kernel caches meet the batch shapes real traffic brings.
        drive(server.port, text_bodies + image_bodies["640x480"], concurrency=16, total=400)
        report["server"]["workers_rss_mb_after_warmup"] = worker_rss_mb(server.proc.pid)
        runs = []
        for size in SIZES:
            for c in concurrency:
                r = drive(
                    server.port,
                    image_bodies[size],
                    concurrency=c,
                    seconds=seconds,
                    keep_vectors=(size == "640x480" and c == 1),
                )
                if size == "640x480" and c == 1:
                    fp32_vectors = r.vectors
                row = {"input": f"image {size}", "concurrency": c, **r.summary()}
                runs.append(row)
                log(
                    f"fp32 {row['input']:>15} c={c:<3} {row['per_s']:7.1f}/s p50 {row['p50_ms']:7.1f} ms "
                    f"p99 {row['p99_ms']:7.1f} ms errors {row['errors']}"
                )
        for c in concurrency:
            r = drive(server.port, text_bodies, concurrency=c, seconds=seconds, keep_vectors=(c == 1))
            if c == 1:
                fp32_text_vectors = r.vectors
            row = {"input": "text", "concurrency": c, **r.summary()}
            runs.append(row)
            log(
                f"fp32 {'text':>15} c={c:<3} {row['per_s']:7.1f}/s "
                f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms"
            )
        report["server"]["runs"] = runs
        log(f"memory: {requests_for_memory} requests (1 in 10 an image) at concurrency 16")
        mixed = text_bodies * 9 + image_bodies["640x480"][:2]
        r = drive(server.port, mixed, concurrency=16, total=requests_for_memory)
        report["server"]["memory_requests"] = r.requests
        report["server"]["memory_errors"] = r.errors
        report["server"]["workers_rss_mb_after_requests"] = worker_rss_mb(server.proc.pid)
    finally:
        server.stop()

    if compare_serving:
        report["serving_comparison"] = []
        layouts = {
            f"1 worker x {cores} threads": {"WEB_CONCURRENCY": "1", "CLIP_TORCH_THREADS": str(cores)},
            "PyTorch eager instead of ONNX Runtime (float32)": {"CLIP_RUNTIME": "torch", **default_serving},
        }
        for n, (label, env) in enumerate(layouts.items()):
            log(f"for comparison: {label}")
            server, _, _ = start_server(model_dir, tmp, f"layout{n}", **env)
            try:
                img = drive(server.port, image_bodies["640x480"], concurrency=16, seconds=seconds).summary()
                txt = drive(server.port, text_bodies, concurrency=16, seconds=seconds).summary()
                report["serving_comparison"].append(
                    {"layout": label, "image_640x480_c16_per_s": img["per_s"], "text_c16_per_s": txt["per_s"]}
                )
                log(f"{label}: {img['per_s']:.1f} images/s, {txt['per_s']:.1f} texts/s at c=16")
            finally:
                server.stop()

    if int8:
        log("int8 path: CLIP_RUNTIME=onnx CLIP_QUANTIZE=int8 (exported and quantised once, then cached)")
        server, wall, _ = start_server(model_dir, tmp, "int8", CLIP_RUNTIME="onnx", CLIP_QUANTIZE="int8")
        try:
            img = drive(server.port, image_bodies["640x480"], concurrency=16, seconds=seconds).summary()
            txt = drive(server.port, text_bodies, concurrency=16, seconds=seconds).summary()
            vi = drive(
                server.port,
                image_bodies["640x480"],
                concurrency=1,
                total=len(image_bodies["640x480"]),
                keep_vectors=True,
            ).vectors
            vt = drive(server.port, text_bodies, concurrency=1, total=len(text_bodies), keep_vectors=True).vectors
            report["int8"] = {
                "time_to_ready_wall_s": wall,
                "image_640x480_c16_per_s": img["per_s"],
                "text_c16_per_s": txt["per_s"],
                "image_cosine_min": cosine_rows(vi, fp32_vectors),
                "text_cosine_min": cosine_rows(vt, fp32_text_vectors),
                "workers_rss_mb": worker_rss_mb(server.proc.pid),
            }
            log(
                f"int8: {img['per_s']:.1f} images/s, {txt['per_s']:.1f} texts/s at c=16; cosine to fp32 "
                f"{report['int8']['image_cosine_min']:.5f} (images) {report['int8']['text_cosine_min']:.5f} (texts)"
            )
        finally:
            server.stop()

    report["total_seconds"] = time.perf_counter() - started
    report["targets"] = targets(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    log(f"done in {report['total_seconds']:.0f} s: {out / 'results.md'}")
    print(markdown(report))
    return report


def _run(report: dict, size: str, c: int) -> dict:
    return next(r for r in report["server"]["runs"] if r["input"] == size and r["concurrency"] == c)


def targets(report: dict) -> list[dict]:
    bare, server = report["bare"], report["server"]
    rows = []

    def add(name, value, goal, ok):
        rows.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    for size, goal in (("image 640x480", 0.90), ("image 4000x3000", 0.80)):
        ratio = _run(report, size, 16)["per_s"] / bare["image_b16_per_s"]
        add(f"{size} c=16 vs bare batched forward", round(ratio, 3), f">= {goal}", ratio >= goal)
    ratio = _run(report, "text", 16)["per_s"] / bare["text_b32_per_s"]
    add("texts c=16 vs bare forward (per-batch padding)", round(ratio, 3), ">= 0.90", ratio >= 0.90)
    p50 = _run(report, "image 640x480", 1)["p50_ms"]
    budget = 1000 * bare["image_b1_seconds"] + 15
    add("image 640x480 c=1 p50 (ms) vs bare b1 + 15 ms", round(p50, 1), f"<= {budget:.1f}", p50 <= budget)
    if "int8" in report:
        ratio = report["int8"]["image_640x480_c16_per_s"] / _run(report, "image 640x480", 16)["per_s"]
        add("int8 images/s vs float32 server, c=16", round(ratio, 2), ">= 1.5", ratio >= 1.5)
        add(
            "int8 cosine to float32 (images)",
            round(report["int8"]["image_cosine_min"], 5),
            ">= 0.999",
            report["int8"]["image_cosine_min"] >= 0.999,
        )
        add(
            "int8 cosine to float32 (texts)",
            round(report["int8"]["text_cosine_min"], 5),
            ">= 0.998",
            report["int8"]["text_cosine_min"] >= 0.998,
        )
    before, after = sum(server["workers_rss_mb_after_warmup"]), sum(server["workers_rss_mb_after_requests"])
    growth = after / before - 1 if before else float("nan")
    add(f"RSS growth after {server['memory_requests']} requests", f"{100 * growth:+.1f}%", "<= +10%", growth <= 0.10)
    ratio = (server["worker_seconds_to_ready"] or 0) / bare["fresh_process_from_pretrained_seconds"]
    add("worker start to ready vs bare from_pretrained (new processes)", round(ratio, 2), "< 2", ratio < 2)
    return rows


def _backend(described) -> str:
    """/readyz's backend per tower ({"image": "onnx/float32", ...}) in a few words."""
    if isinstance(described, dict):
        return ", ".join(f"{tower} {choice}" for tower, choice in described.items())
    return str(described)


def _mb(values: list[float]) -> str:
    return ", ".join(f"{m:.0f}" for m in values)


def markdown(report: dict) -> str:
    bare, server = report["bare"], report["server"]
    lines = [
        f"Machine: {report['machine']['cores']} cores ({report['machine']['cpu']}), "
        f"Python {report['machine']['python']}; "
        f"model: random-weight vit-b-32 (openai/clip-vit-base-patch32's architecture), float32 unless noted; "
        f"server: the defaults for these cores (backend {_backend(server.get('backend'))}).",
        "",
        f"Bare model ({bare['torch_threads']} torch threads): images {bare['image_b1_per_s']:.1f}/s at batch 1, "
        f"{bare['image_b16_per_s']:.1f}/s at batch 16; texts {bare['text_b32_per_s']:.1f}/s at batch 32 "
        f"(padded per batch). Naive server (one request at a time, stock processor): "
        f"{bare['naive_image_per_s']:.1f} images/s (640x480), {bare['naive_text_per_s']:.1f} texts/s.",
        "",
        "| input | clients | per s | p50 ms | p99 ms | x bare forward | x naive | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in server["runs"]:
        is_text = r["input"] == "text"
        bare_rate = bare["text_b32_per_s"] if is_text else bare["image_b16_per_s"]
        naive = bare["naive_text_per_s"] if is_text else bare["naive_image_per_s"]
        lines.append(
            f"| {r['input']} | {r['concurrency']} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['per_s'] / bare_rate:.2f} | {r['per_s'] / naive:.2f} | {r['errors']} |"
        )
    lines += [
        "",
        f"Time to ready: a worker is ready {server['worker_seconds_to_ready']:.2f} s after it starts (Django, "
        f"imports, load, checks, warm-up), against {bare['fresh_process_from_pretrained_seconds']:.2f} s for a "
        f"bare from_pretrained of the same folder in a new process ({bare['from_pretrained_seconds']:.2f} s with "
        f"imports done); {server['time_to_ready_wall_s']:.1f} s from launching scripts/start.sh (migrations "
        "included).",
        f"Memory per worker (MB RSS): {_mb(server['workers_rss_mb_at_ready'])} at ready, "
        f"{_mb(server['workers_rss_mb_after_warmup'])} after 400 warm-up requests, "
        f"{_mb(server['workers_rss_mb_after_requests'])} after {server['memory_requests']} more requests.",
    ]
    for s in report.get("serving_comparison", []):
        lines.append(
            f"For comparison, {s['layout']}: {s['image_640x480_c16_per_s']:.1f} images/s (640x480) and "
            f"{s['text_c16_per_s']:.1f} texts/s at 16 clients."
        )
    if "int8" in report:
        s = report["int8"]
        lines.append(
            f"int8 (ONNX Runtime, per-channel): {s['image_640x480_c16_per_s']:.1f} images/s, "
            f"{s['text_c16_per_s']:.1f} texts/s at 16 clients; cosine to float32 >= "
            f"{s['image_cosine_min']:.5f} (images), {s['text_cosine_min']:.5f} (texts); "
            f"RSS {', '.join(f'{m:.0f}' for m in s['workers_rss_mb'])} MB."
        )
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]
    ]
    lines.append(f"\nBenchmark wall time: {report['total_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
