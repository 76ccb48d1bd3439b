"""The one frozen configuration of clipsite, built once from the environment by clipsite/settings.py.

Every variable is declared once in ``VARIABLES``: its default, how it parses, its system check id
and a hint. A bad value never raises here: ``load`` returns the defaults in its place and a
``Problem`` that the system checks (embeddings/checks.py) report, so ``manage.py`` commands and the
server's start stop with a message naming the variable. Nothing else in the project reads the
environment; code reads ``current()``, a frozen view that tests replace through Django's settings.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Problem:
    variable: str
    message: str
    check_id: str
    hint: str


@dataclass(frozen=True)
class Limits:
    max_text_words: int
    max_text_chars: int
    max_file_bytes: int
    max_request_bytes: int
    max_json_bytes: int
    max_image_pixels: int
    max_request_pixels: int  # decoded pixels of all a request's images together
    max_parts: int
    max_key_chars: int
    worker_memory_bytes: int  # what a worker's requests in flight may hold at once (bodies, decodes)


@dataclass(frozen=True)
class RuntimeSettings:
    model: str
    served_model_name: str  # what answers call the model; "" is the default (loading.served_name)
    models_dir: Path
    device: str  # cpu, cuda or auto
    backend: str  # auto, torch, onnx or openvino: what prepare_model chooses between
    dtype: str  # auto, float32, bfloat16, int8 or float16
    warmup: bool  # load the model in the background when a server process starts
    text_threads: int  # threads of a text forward: this worker's share of the cores
    image_threads: int  # threads of an image forward: every core unless set
    max_batch: int
    max_wait_ms: int
    max_queue: int  # items waiting per worker
    max_queue_pixels: int  # image pixels waiting per worker
    request_timeout_s: float  # a request's deadline inside the engine
    forward_timeout_s: float  # a forward running longer is a hung backend: the worker is replaced


@dataclass(frozen=True)
class ServerSettings:
    port: int
    workers: int
    threads: int
    cores: int
    max_connections: int  # open connections per worker; past it, the oldest idle one is pushed out
    header_timeout_s: float  # from the accept (or a kept-alive request's first byte) to the headers' end
    body_timeout_s: float  # the longest pause inside a request's body
    keepalive_s: int  # an idle kept-alive connection


@dataclass(frozen=True)
class WearableSettings:
    prompt_templates: tuple[str, ...]
    top_k: int
    store_images: bool


@dataclass(frozen=True)
class AccessSettings:
    require_api_key: bool  # every API endpoint wants a key (health and metrics stay open)
    rate_limit: str  # "60/min": requests per key, or per client address without one; "" is none
    rate_limit_dir: Path  # the rate limits' counts, shared by every worker process of this machine
    trusted_proxies: tuple[str, ...]  # networks whose X-Forwarded-For is believed (access/identity.py)
    redis_url: str  # where the rate limits count, shared by every replica; "" counts in rate_limit_dir


@dataclass(frozen=True)
class ObservabilitySettings:
    log_format: str  # plain or json (one JSON object a line)
    log_counters_s: int  # seconds between each worker's counters line; 0: none
    metrics: bool  # serve /metrics


@dataclass(frozen=True)
class Config:
    debug: bool
    secret_key: str
    allowed_hosts: tuple[str, ...]
    csrf_trusted_origins: tuple[str, ...]
    https: bool  # reached over HTTPS through a proxy (X-Forwarded-Proto)
    hsts_seconds: int
    database_url: str
    database_timeout_s: float  # the longest one wait on the database may take; 0: no limit
    migrate: str  # what scripts/start.sh does about migrations: auto, true or false
    log_level: str
    server: ServerSettings
    limits: Limits
    runtime: RuntimeSettings
    wearable: WearableSettings
    access: AccessSettings
    observability: ObservabilitySettings


# --- parsing -----------------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Invalid(ValueError):
    pass


def _bool(raw: str, var: Var) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _Invalid(f"{var.name}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _int(raw: str, var: Var) -> int:
    try:
        number = int(raw.replace("_", ""))
    except ValueError:
        raise _Invalid(f"{var.name}={raw!r} is not an integer") from None
    if var.minimum is not None and number < var.minimum:
        raise _Invalid(f"{var.name}={number} is below its minimum of {var.minimum}")
    if var.maximum is not None and number > var.maximum:
        raise _Invalid(f"{var.name}={number} is above its maximum of {var.maximum}")
    return number


def _float(raw: str, var: Var) -> float:
    try:
        number = float(raw)
    except ValueError:
        raise _Invalid(f"{var.name}={raw!r} is not a number") from None
    if not number == number or (var.minimum is not None and number < var.minimum):  # NaN, or too small
        raise _Invalid(f"{var.name}={raw} is below its minimum of {var.minimum}")
    if var.maximum is not None and number > var.maximum:
        raise _Invalid(f"{var.name}={raw} is above its maximum of {var.maximum}")
    return number


def _choice(raw: str, var: Var) -> str:
    if raw.lower() not in var.choices:
        raise _Invalid(f"{var.name}={raw!r} is not one of: {', '.join(var.choices)}")
    return raw.lower()


def _str(raw: str, var: Var) -> str:
    return raw


_RATE = re.compile(r"^(\d{1,9})/(s|sec|second|m|min|minute|h|hour|d|day)$")


def _rate(raw: str, var: Var) -> str:
    """DRF's rate format, e.g. 60/min: a whole number of requests per second, minute, hour or day."""
    match = _RATE.match(raw.replace(" ", "").lower())
    if match is None or int(match.group(1)) < 1:
        raise _Invalid(f"{var.name}={raw!r} is not a rate such as 60/min (per s, min, hour or day)")
    return f"{int(match.group(1))}/{match.group(2)}"


_SERVED_NAME = re.compile(r"^[A-Za-z0-9][\w.:@+/-]{0,127}$")


def _served_name(raw: str, var: Var) -> str:
    """A model's name in answers and in /v1/models/<name>: a letter or digit, then up to 127 of them,
    ``_ . : @ + / -``."""
    if not _SERVED_NAME.match(raw):
        raise _Invalid(f"{var.name}={raw[:200]!r} is not a model name (letters, digits and _.:@+/-, up to 128)")
    return raw


def _list(raw: str, var: Var) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(var.separator) if item.strip())


def _networks(raw: str, var: Var) -> tuple[str, ...]:
    """Networks in CIDR notation (a bare address is its /32 or /128); never one holding every address,
    which would believe any client's X-Forwarded-For."""
    import ipaddress

    networks = []
    for item in _list(raw, var):
        try:
            network = ipaddress.ip_network(item)
        except ValueError:
            message = f"{var.name}: {item[:60]!r} is not a network such as 10.0.0.0/8 (host bits zero)"
            raise _Invalid(message) from None
        if network.prefixlen == 0:
            raise _Invalid(f"{var.name}: {item!r} would trust every client's X-Forwarded-For")
        networks.append(str(network))
    return tuple(networks)


_REDIS_URL = re.compile(r"^(redis|rediss|unix)://\S+$")


def _redis_url(raw: str, var: Var) -> str:
    if not _REDIS_URL.match(raw):  # the URL itself is not repeated: it may hold a password
        raise _Invalid(f"{var.name} is not a Redis URL (redis://, rediss:// or unix://)")
    return raw


@dataclass(frozen=True)
class Var:
    """One environment variable: its default (None: derived in ``load``), parser, check id and hint."""

    name: str
    default: Any
    parse: Callable[[str, Var], Any]
    check_id: str
    hint: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    separator: str = ","
    doc: str = field(default="", compare=False)


_DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of a person wearing a {}.", "a close-up photo of a {}.")
_READ_ME = "README.md lists the accepted values."

VARIABLES: tuple[Var, ...] = (
    Var("DJANGO_DEBUG", False, _bool, "clipsite.E001", "Use true or false; never true in production."),
    Var("DJANGO_SECRET_KEY", "", _str, "clipsite.E002", "A long random string; unset keeps one in var/secret_key."),
    Var("DJANGO_ALLOWED_HOSTS", ("*",), _list, "clipsite.E003", "Comma-separated host names."),
    Var("DJANGO_CSRF_TRUSTED_ORIGINS", (), _list, "clipsite.E004", "Comma-separated origins (https://host)."),
    Var(
        "DJANGO_HTTPS",
        False,
        _bool,
        "clipsite.E050",
        "true behind a TLS proxy that sets X-Forwarded-Proto: secure cookies, HSTS, redirects to https.",
    ),
    Var(
        "DJANGO_HSTS_SECONDS",
        31_536_000,
        _int,
        "clipsite.E051",
        "Seconds browsers keep to https (with DJANGO_HTTPS), 0 to 63072000.",
        minimum=0,
        maximum=63_072_000,
    ),
    Var("DATABASE_URL", "", _str, "clipsite.E005", "A URL dj-database-url reads, e.g. postgres://u:p@host/db."),
    Var(
        "DATABASE_TIMEOUT",
        5.0,
        _float,
        "clipsite.E056",
        "Seconds one query may take on PostgreSQL, 0 (no limit, for long migrations) to 3600.",
        minimum=0,
        maximum=3600,
    ),
    Var(
        "CLIP_MIGRATE",
        "auto",
        _choice,
        "clipsite.E057",
        "auto, true or false: whether the start script applies migrations.",
        choices=("auto", "true", "false"),
    ),
    Var(
        "LOG_LEVEL",
        "info",
        _choice,
        "clipsite.E006",
        "One of debug, info, warning, error, critical.",
        choices=("debug", "info", "warning", "error", "critical"),
    ),
    Var("LOG_FORMAT", "plain", _choice, "clipsite.E043", "plain or json.", choices=("plain", "json")),
    Var(
        "CLIP_LOG_COUNTERS_S",
        60,
        _int,
        "clipsite.E044",
        "Seconds between counters lines, 0 (none) to 86400.",
        minimum=0,
        maximum=86_400,
    ),
    Var("CLIP_METRICS", True, _bool, "clipsite.E045", "true serves /metrics (Prometheus), false answers it 404."),
    Var("PORT", 8081, _int, "clipsite.E007", "A TCP port from 1 to 65535.", minimum=1, maximum=65535),
    Var("WEB_CONCURRENCY", None, _int, "clipsite.E008", "Worker processes, 1 to 64.", minimum=1, maximum=64),
    Var("WEB_THREADS", 8, _int, "clipsite.E009", "Request threads per worker, 1 to 256.", minimum=1, maximum=256),
    Var(
        "WEB_MAX_CONNECTIONS",
        1000,
        _int,
        "clipsite.E059",
        "Open connections per worker, 10 to 100000 (at the cap the oldest idle one is closed).",
        minimum=10,
        maximum=100_000,
    ),
    Var(
        "WEB_HEADER_TIMEOUT",
        10.0,
        _float,
        "clipsite.E060",
        "Seconds from a connection's accept to its request's last header, 0.1 to 600.",
        minimum=0.1,
        maximum=600,
    ),
    Var(
        "WEB_BODY_TIMEOUT",
        30.0,
        _float,
        "clipsite.E061",
        "Seconds a request's body may pause between two reads, 0.1 to 600.",
        minimum=0.1,
        maximum=600,
    ),
    Var(
        "WEB_KEEPALIVE",
        5,
        _int,
        "clipsite.E062",
        "Seconds an idle kept-alive connection stays, 0 to 600.",
        minimum=0,
        maximum=600,
    ),
    Var("CLIP_MODEL", "", _str, "clipsite.E010", "A Hugging Face id, a save_pretrained folder or the original layout."),
    Var(
        "CLIP_SERVED_MODEL_NAME",
        "",
        _served_name,
        "clipsite.E066",
        "The model's name in answers, e.g. clip-vit-b-32: letters, digits and _.:@+/-, up to 128 characters.",
    ),
    Var("CLIP_MODELS_DIR", "/home/models/clip_models", _str, "clipsite.E011", "A folder this user can write."),
    Var("CLIP_DEVICE", "cpu", _choice, "clipsite.E012", "cpu, cuda or auto.", choices=("cpu", "cuda", "auto")),
    Var(
        "CLIP_BACKEND",
        "auto",
        _choice,
        "clipsite.E013",
        "auto (the fastest faithful one, measured by prepare_model), torch, onnx or openvino.",
        choices=("auto", "torch", "onnx", "openvino"),
    ),
    Var(
        "CLIP_DTYPE",
        "auto",
        _choice,
        "clipsite.E014",
        "auto (measured by prepare_model), float32, bfloat16, int8 (CPU) or float16 (GPU).",
        choices=("auto", "float32", "bfloat16", "int8", "float16"),
    ),
    # The names before CLIP_BACKEND and CLIP_DTYPE, still read when the new ones are unset.
    Var("CLIP_RUNTIME", "", _choice, "clipsite.E046", "Now CLIP_BACKEND.", choices=("auto", "torch", "onnx")),
    Var("CLIP_QUANTIZE", "", _choice, "clipsite.E047", "Now CLIP_DTYPE=int8.", choices=("none", "int8")),
    Var("CLIP_WARMUP", True, _bool, "clipsite.E015", "true: a server process loads the model when it starts."),
    Var("CLIP_TORCH_THREADS", 0, _int, "clipsite.E016", "0 (cores / workers) or 1 to 256.", minimum=0, maximum=256),
    Var("CLIP_SOLO_THREADS", 0, _int, "clipsite.E017", "0 (every core) or 1 to 256.", minimum=0, maximum=256),
    Var("CLIP_MAX_BATCH", 32, _int, "clipsite.E018", "Items per forward, 1 to 1024.", minimum=1, maximum=1024),
    Var("CLIP_MAX_WAIT_MS", 2, _int, "clipsite.E019", "Milliseconds, 0 to 10000.", minimum=0, maximum=10_000),
    Var("CLIP_MAX_QUEUE", 256, _int, "clipsite.E020", "Items, 1 to 1000000.", minimum=1, maximum=1_000_000),
    Var(
        "CLIP_MAX_QUEUE_PIXELS",
        50_000_000,
        _int,
        "clipsite.E021",
        "Image pixels waiting per worker (a 224x224 input is 50,176), at least 1.",
        minimum=1,
    ),
    Var(
        "CLIP_REQUEST_TIMEOUT",
        60.0,
        _float,
        "clipsite.E022",
        "Seconds a request may wait for the model, 0.1 to 3600.",
        minimum=0.1,
        maximum=3600,
    ),
    Var(
        "CLIP_FORWARD_TIMEOUT",
        120.0,
        _float,
        "clipsite.E052",
        "Seconds one forward may run before the worker is declared hung and replaced, 1 to 3600.",
        minimum=1,
        maximum=3600,
    ),
    Var("CLIP_MAX_TEXT_WORDS", 50, _int, "clipsite.E023", "Words per text, 1 to 10000.", minimum=1, maximum=10_000),
    Var(
        "CLIP_MAX_TEXT_CHARS",
        2000,
        _int,
        "clipsite.E034",
        "Characters per text, 1 to 1000000.",
        minimum=1,
        maximum=1_000_000,
    ),
    Var("CLIP_MAX_JSON_BYTES", 64 * 1024, _int, "clipsite.E035", "Bytes of a JSON body (feedback).", minimum=2),
    Var(
        "CLIP_MAX_REQUEST_PIXELS",
        100_000_000,
        _int,
        "clipsite.E036",
        "Decoded pixels of all a request's images together, at least 1.",
        minimum=1,
    ),
    Var("CLIP_MAX_FILE_BYTES", 20 * 1024 * 1024, _int, "clipsite.E024", "Bytes per file, at least 1.", minimum=1),
    Var("CLIP_MAX_REQUEST_BYTES", 100 * 1024 * 1024, _int, "clipsite.E025", "Bytes per request.", minimum=1),
    Var("CLIP_MAX_IMAGE_PIXELS", 50_000_000, _int, "clipsite.E026", "Pixels per image, at least 1.", minimum=1),
    Var(
        "CLIP_WORKER_MEMORY_MB",
        512,
        _int,
        "clipsite.E067",
        "Megabytes a worker's requests in flight may hold at once (bodies, decoded images), 64 to 1000000.",
        minimum=64,
        maximum=1_000_000,
    ),
    Var("CLIP_MAX_PARTS", 64, _int, "clipsite.E027", "Parts per request, 1 to 10000.", minimum=1, maximum=10_000),
    Var("CLIP_MAX_KEY_CHARS", 200, _int, "clipsite.E028", "Characters per key, 1 to 10000.", minimum=1, maximum=10_000),
    Var(
        "WEARABLE_PROMPT_TEMPLATES",
        _DEFAULT_TEMPLATES,
        _list,
        "wearable.E001",
        'Give at least one template, e.g. "a photo of a {}." (templates are separated by |).',
        separator="|",
    ),
    Var(
        "CLIP_REQUIRE_API_KEY",
        False,
        _bool,
        "clipsite.E040",
        "true: every API endpoint answers 401 without a valid key (create one in admin or with create_api_key).",
    ),
    Var("CLIP_RATE_LIMIT", "", _rate, "clipsite.E041", "A rate such as 60/min, per key (or per address without one)."),
    Var(
        "CLIP_RATE_LIMIT_DIR",
        "",
        _str,
        "clipsite.E042",
        "A folder every worker can write (default var/cache/throttle).",
    ),
    Var(
        "CLIP_TRUSTED_PROXIES",
        (),
        _networks,
        "clipsite.E053",
        "Comma-separated networks of your proxies, e.g. 10.0.0.0/8,2001:db8::/32 (none: X-Forwarded-For is ignored).",
    ),
    Var(
        "CLIP_REDIS_URL",
        "",
        _redis_url,
        "clipsite.E054",
        "redis://host:6379/0 (rediss:// for TLS, unix:///path.sock): the rate limits count there for every replica.",
    ),
    Var("WEARABLE_TOP_K", 3, _int, "clipsite.E029", "Categories per answer, 1 to 1000.", minimum=1, maximum=1000),
    Var("WEARABLE_STORE_IMAGES", False, _bool, "clipsite.E030", "true keeps uploaded images with each answer."),
)
_BY_NAME = {var.name: var for var in VARIABLES}

# Rules that join two values, each with its own id.
_INT8_NEEDS_ONNX = ("clipsite.E031", "CLIP_DTYPE=int8 runs on ONNX Runtime: CLIP_BACKEND=onnx (or auto)")
_INT8_NEEDS_CPU = ("clipsite.E032", "CLIP_DTYPE=int8 runs on the CPU (ONNX Runtime): not with CLIP_DEVICE=cuda")
_CPU_BACKEND = (
    "clipsite.E033",
    "CLIP_BACKEND=onnx or openvino runs on the CPU: with CLIP_DEVICE=cuda use torch or auto",
)
_BF16_NOT_ONNX = ("clipsite.E038", "ONNX Runtime runs float32 or int8: CLIP_DTYPE=bfloat16 needs torch or openvino")
_FP16_NEEDS_GPU = ("clipsite.E039", "CLIP_DTYPE=float16 runs on a GPU with PyTorch: CLIP_DEVICE=cuda (or auto)")
_PLACEHOLDER_KEY = (
    "clipsite.E048",
    "DJANGO_SECRET_KEY is still the placeholder of deploy/k8s/secret.yaml: anyone could sign sessions and demo tokens",
)
# A body costs up to this many times its length while it is served (the raw bytes, their parsed copy,
# decoded base64 images): measured 2.0 for multipart, 3.2 for /v1's JSON (README "Memory").
# embeddings/memory.py holds this much per body.
BODY_COST_FACTOR = 4
_BODY_OVER_BUDGET = (
    "clipsite.E068",
    "CLIP_WORKER_MEMORY_MB is under 4 x CLIP_MAX_REQUEST_BYTES: a request at the size limit could never be served",
)
_TEMPLATE_NEEDS_SLOT = ("wearable.E002", 'Every template needs "{}", e.g. "a photo of a {}."; separate them with |.')


def cpu_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: those it may run on, and no more than its cgroup's CPU quota.

    In a Kubernetes pod or a container with ``--cpus``, the affinity is every core of the node while
    the quota is the pod's CPU limit: the defaults that follow the cores (workers, threads) must follow
    the quota, or N workers share a 2-core limit as if they had the node.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(cgroup: Path) -> float | None:
    """Cores' worth of CPU time the cgroup allows (cgroup v2 cpu.max, else v1's CFS files), None: no limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def load(environ: Mapping[str, str], *, base_dir: Path) -> tuple[Config, list[Problem]]:
    """The configuration ``environ`` describes, and what is wrong with it (defaults stand in)."""
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = environ.get(var.name)
        raw = None if raw is None else raw.strip()
        values[var.name] = var.default
        if raw:
            try:
                values[var.name] = var.parse(raw, var)
            except _Invalid as exc:
                problems.append(Problem(var.name, str(exc), var.check_id, f"{var.hint} {_READ_ME}".strip()))

    def bad(rule: tuple[str, str], variable: str) -> None:
        problems.append(Problem(variable, rule[1], rule[0], f"Change {variable}. {_READ_ME}"))

    v = values
    if not v["WEARABLE_PROMPT_TEMPLATES"]:
        var = _BY_NAME["WEARABLE_PROMPT_TEMPLATES"]
        problems.append(Problem(var.name, "WEARABLE_PROMPT_TEMPLATES is empty.", var.check_id, var.hint))
        v["WEARABLE_PROMPT_TEMPLATES"] = _DEFAULT_TEMPLATES
    for template in v["WEARABLE_PROMPT_TEMPLATES"]:
        if "{}" not in template:
            problems.append(
                Problem(
                    "WEARABLE_PROMPT_TEMPLATES",
                    f"The prompt template {template!r} has no {{}} for the category's name.",
                    *_TEMPLATE_NEEDS_SLOT,
                )
            )
    # The old names meant float32 unless CLIP_QUANTIZE=int8: they keep that meaning.
    new_unset = {name: not (environ.get(name) or "").strip() for name in ("CLIP_BACKEND", "CLIP_DTYPE")}
    if v["CLIP_RUNTIME"] and new_unset["CLIP_BACKEND"]:
        v["CLIP_BACKEND"] = v["CLIP_RUNTIME"]
    if (v["CLIP_RUNTIME"] or v["CLIP_QUANTIZE"]) and new_unset["CLIP_DTYPE"]:
        v["CLIP_DTYPE"] = "int8" if v["CLIP_QUANTIZE"] == "int8" else "float32"
    if v["CLIP_DTYPE"] == "int8" and v["CLIP_BACKEND"] in ("torch", "openvino"):
        bad(_INT8_NEEDS_ONNX, "CLIP_DTYPE")
    if v["CLIP_DTYPE"] == "int8" and v["CLIP_DEVICE"] == "cuda":
        bad(_INT8_NEEDS_CPU, "CLIP_DTYPE")
    if v["CLIP_BACKEND"] in ("onnx", "openvino") and v["CLIP_DEVICE"] == "cuda":
        bad(_CPU_BACKEND, "CLIP_BACKEND")
    if v["CLIP_DTYPE"] == "bfloat16" and v["CLIP_BACKEND"] == "onnx":
        bad(_BF16_NOT_ONNX, "CLIP_DTYPE")
    if "replace-me" in (v["DJANGO_SECRET_KEY"] or "").lower():
        bad(_PLACEHOLDER_KEY, "DJANGO_SECRET_KEY")
    if v["CLIP_MAX_REQUEST_BYTES"] * BODY_COST_FACTOR > v["CLIP_WORKER_MEMORY_MB"] * 2**20:
        bad(_BODY_OVER_BUDGET, "CLIP_WORKER_MEMORY_MB")
    if v["CLIP_DTYPE"] == "float16" and (v["CLIP_DEVICE"] == "cpu" or v["CLIP_BACKEND"] in ("onnx", "openvino")):
        bad(_FP16_NEEDS_GPU, "CLIP_DTYPE")

    cores = cpu_cores()
    workers = v["WEB_CONCURRENCY"] or cores  # one worker per core: measured best end to end (README)
    config = Config(
        debug=v["DJANGO_DEBUG"],
        secret_key=v["DJANGO_SECRET_KEY"],
        allowed_hosts=tuple(v["DJANGO_ALLOWED_HOSTS"]),
        csrf_trusted_origins=tuple(v["DJANGO_CSRF_TRUSTED_ORIGINS"]),
        https=v["DJANGO_HTTPS"],
        hsts_seconds=v["DJANGO_HSTS_SECONDS"],
        database_url=v["DATABASE_URL"] or f"sqlite:///{base_dir / 'var' / 'db.sqlite3'}",
        database_timeout_s=float(v["DATABASE_TIMEOUT"]),
        migrate=v["CLIP_MIGRATE"],
        log_level=v["LOG_LEVEL"].upper(),
        server=ServerSettings(
            port=v["PORT"],
            workers=workers,
            threads=v["WEB_THREADS"],
            cores=cores,
            max_connections=v["WEB_MAX_CONNECTIONS"],
            header_timeout_s=float(v["WEB_HEADER_TIMEOUT"]),
            body_timeout_s=float(v["WEB_BODY_TIMEOUT"]),
            keepalive_s=v["WEB_KEEPALIVE"],
        ),
        limits=Limits(
            max_text_words=v["CLIP_MAX_TEXT_WORDS"],
            max_text_chars=v["CLIP_MAX_TEXT_CHARS"],
            max_file_bytes=v["CLIP_MAX_FILE_BYTES"],
            max_request_bytes=v["CLIP_MAX_REQUEST_BYTES"],
            max_json_bytes=v["CLIP_MAX_JSON_BYTES"],
            max_image_pixels=v["CLIP_MAX_IMAGE_PIXELS"],
            max_request_pixels=v["CLIP_MAX_REQUEST_PIXELS"],
            max_parts=v["CLIP_MAX_PARTS"],
            max_key_chars=v["CLIP_MAX_KEY_CHARS"],
            worker_memory_bytes=v["CLIP_WORKER_MEMORY_MB"] * 2**20,
        ),
        runtime=RuntimeSettings(
            model=v["CLIP_MODEL"],
            served_model_name=v["CLIP_SERVED_MODEL_NAME"],
            models_dir=Path(v["CLIP_MODELS_DIR"]).expanduser(),
            device=v["CLIP_DEVICE"],
            backend=v["CLIP_BACKEND"],
            dtype=v["CLIP_DTYPE"],
            warmup=v["CLIP_WARMUP"],
            text_threads=v["CLIP_TORCH_THREADS"] or max(1, cores // workers),
            image_threads=v["CLIP_SOLO_THREADS"] or cores,
            max_batch=v["CLIP_MAX_BATCH"],
            max_wait_ms=v["CLIP_MAX_WAIT_MS"],
            max_queue=v["CLIP_MAX_QUEUE"],
            max_queue_pixels=v["CLIP_MAX_QUEUE_PIXELS"],
            request_timeout_s=float(v["CLIP_REQUEST_TIMEOUT"]),
            forward_timeout_s=float(v["CLIP_FORWARD_TIMEOUT"]),
        ),
        wearable=WearableSettings(
            prompt_templates=tuple(v["WEARABLE_PROMPT_TEMPLATES"]),
            top_k=v["WEARABLE_TOP_K"],
            store_images=v["WEARABLE_STORE_IMAGES"],
        ),
        access=AccessSettings(
            require_api_key=v["CLIP_REQUIRE_API_KEY"],
            rate_limit=v["CLIP_RATE_LIMIT"],
            rate_limit_dir=Path(v["CLIP_RATE_LIMIT_DIR"] or base_dir / "var" / "cache" / "throttle"),
            trusted_proxies=tuple(v["CLIP_TRUSTED_PROXIES"]),
            redis_url=v["CLIP_REDIS_URL"],
        ),
        observability=ObservabilitySettings(
            log_format=v["LOG_FORMAT"],
            log_counters_s=v["CLIP_LOG_COUNTERS_S"],
            metrics=v["CLIP_METRICS"],
        ),
    )
    return config, problems


def kept_secret_key(path: Path) -> str | None:
    """The per-install secret key kept in ``path``: made once (mode 0600, put in place atomically, so
    workers starting together all read the one key), then read. None when it cannot be kept there."""
    import secrets

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(50))
            try:
                os.link(tmp, path)  # fails if another process put its key first: that one is kept
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)  # a key kept by an older version, readable by others
        return path.read_text().strip() or None
    except OSError:
        return None


NO_SECRET_KEY = Problem(
    "DJANGO_SECRET_KEY",
    "DJANGO_SECRET_KEY is unset and var/secret_key cannot be written: each worker would sign with a key of its own",
    "clipsite.E037",
    "Set DJANGO_SECRET_KEY (a long random string), or make var/ writable so one key is kept there.",
)


def current() -> Config:
    """The configuration in force (Django's settings hold it, so tests may replace it)."""
    from django.conf import settings

    return settings.CLIPSITE
