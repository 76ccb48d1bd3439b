"""Django settings for clipsite: the only place the environment is read (see clipsite/env.py)."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from clipsite.env import CONFIG_ERRORS, env_bool, env_choice, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    # An unset key gets a per-install random one kept beside the database, so sessions survive
    # restarts without a secret ever being committed.
    _key_file = BASE_DIR / "var" / "secret_key"
    try:
        _key_file.parent.mkdir(parents=True, exist_ok=True)
        if not _key_file.exists():
            import secrets

            _key_file.write_text(secrets.token_urlsafe(50))
        SECRET_KEY = _key_file.read_text().strip()
    except OSError:
        import secrets

        SECRET_KEY = secrets.token_urlsafe(50)

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
PORT = env_int("PORT", 8081, minimum=1, maximum=65535)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "embeddings.apps.EmbeddingsConfig",
    "wearable.apps.WearableConfig",
]

MIDDLEWARE = [
    "embeddings.middleware.ApiEdgeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "clipsite.urls"
WSGI_APPLICATION = "clipsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_default_db = f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=60)}
except Exception:  # noqa: BLE001 - any parse failure is a configuration error
    CONFIG_ERRORS.append(("DATABASE_URL", "DATABASE_URL is not a database URL dj-database-url understands"))
    DATABASES = {"default": dj_database_url.parse(_default_db)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several worker processes share one SQLite file: wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 20})
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

REST_FRAMEWORK = {
    "EXCEPTION_HANDLER": "embeddings.errors.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": [
        "embeddings.renderers.FastJSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": None,
}

# --- The CLIP service -------------------------------------------------------------------------
# CLIP_MODEL: a Hugging Face id, a folder saved with save_pretrained, or a folder in the original
# model-clip/ + processor-clip/ layout. Empty: the layout under CLIP_MODELS_DIR, else a random test model.
CLIP_MODEL = env_str("CLIP_MODEL", "")
CLIP_MODELS_DIR = Path(env_str("CLIP_MODELS_DIR", "/home/models/clip_models"))
CLIP_DEVICE = env_choice("CLIP_DEVICE", "cpu", ("cpu", "cuda", "auto"))
# Load the model in the background at process start (the server); tests load it themselves.
CLIP_WARMUP = env_bool("CLIP_WARMUP", True)
CLIP_TORCH_THREADS = env_int("CLIP_TORCH_THREADS", 0, minimum=0, maximum=256)
# Torch threads of a worker while the other workers are idle (a quiet server): all cores by default (0).
CLIP_SOLO_THREADS = env_int("CLIP_SOLO_THREADS", 0, minimum=0, maximum=256)
# Batching across requests (one inference thread per process): batch size, how long a batch that is
# not full waits for more, and how many items may queue before requests get 503 "overloaded".
CLIP_MAX_BATCH = env_int("CLIP_MAX_BATCH", 32, minimum=1, maximum=1024)
CLIP_MAX_WAIT_MS = env_int("CLIP_MAX_WAIT_MS", 2, minimum=0, maximum=10_000)
CLIP_MAX_QUEUE = env_int("CLIP_MAX_QUEUE", 1024, minimum=1, maximum=1_000_000)
# "auto": ONNX Runtime on CPU (exported once, cached next to the model; the same float32 vectors,
# measured faster by `python manage.py bench`), PyTorch on CUDA. "torch" or "onnx" to choose.
# CLIP_QUANTIZE=int8 (onnx only) quantises the weights per channel, once, cached the same way.
CLIP_RUNTIME = env_choice("CLIP_RUNTIME", "auto", ("auto", "torch", "onnx"))
CLIP_QUANTIZE = env_choice("CLIP_QUANTIZE", "none", ("none", "int8"))

CLIP_MAX_TEXT_WORDS = env_int("CLIP_MAX_TEXT_WORDS", 50, minimum=1, maximum=10_000)
CLIP_MAX_FILE_BYTES = env_int("CLIP_MAX_FILE_BYTES", 20 * 1024 * 1024, minimum=1)
CLIP_MAX_REQUEST_BYTES = env_int("CLIP_MAX_REQUEST_BYTES", 100 * 1024 * 1024, minimum=1)
CLIP_MAX_IMAGE_PIXELS = env_int("CLIP_MAX_IMAGE_PIXELS", 50_000_000, minimum=1)
CLIP_MAX_PARTS = env_int("CLIP_MAX_PARTS", 64, minimum=1, maximum=10_000)
CLIP_MAX_KEY_CHARS = env_int("CLIP_MAX_KEY_CHARS", 200, minimum=1, maximum=10_000)

# Django's own guards stay in front of ours for non-API forms (admin, demo page).
DATA_UPLOAD_MAX_MEMORY_SIZE = CLIP_MAX_REQUEST_BYTES
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}},
    "filters": {"not_probes": {"()": "embeddings.logs.NotAProbe"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["not_probes"]},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
    "loggers": {"django.request": {"level": "ERROR"}},
}

# --- Serving (read by clipsite/gunicorn.conf.py) --------------------------------------------------
CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# One worker process per core, each with one torch thread, measured faster end to end than one process
# using every core (bench/: `python manage.py bench`). Each worker holds its own copy of the model.
WEB_CONCURRENCY = env_int("WEB_CONCURRENCY", CPU_CORES, minimum=1, maximum=64)
WEB_THREADS = env_int("WEB_THREADS", 8, minimum=1, maximum=256)

# --- Wearable categories ----------------------------------------------------------------------
# Prompt templates of the zero-shot recipe ("{}" is the category name); a category may list its own
# prompts instead. A category's vector is the normalised mean of its prompts' vectors.
WEARABLE_PROMPT_TEMPLATES = env_list(
    "WEARABLE_PROMPT_TEMPLATES",
    ["a photo of a {}.", "a photo of a person wearing a {}.", "a close-up photo of a {}."],
    separator="|",
)
WEARABLE_TOP_K = env_int("WEARABLE_TOP_K", 3, minimum=1, maximum=1000)
# Keep the uploaded image bytes with each recorded prediction (off: only its SHA-256 is kept).
WEARABLE_STORE_IMAGES = env_bool("WEARABLE_STORE_IMAGES", False)

if CLIP_QUANTIZE == "int8" and CLIP_RUNTIME == "torch":
    CONFIG_ERRORS.append(("CLIP_QUANTIZE", "CLIP_QUANTIZE=int8 needs CLIP_RUNTIME=onnx (or auto)"))
if CLIP_QUANTIZE == "int8" and CLIP_DEVICE == "cuda":
    CONFIG_ERRORS.append(
        ("CLIP_QUANTIZE", "CLIP_QUANTIZE=int8 runs on the CPU (ONNX Runtime): not with CLIP_DEVICE=cuda")
    )
if CLIP_RUNTIME == "onnx" and CLIP_DEVICE == "cuda":
    CONFIG_ERRORS.append(
        ("CLIP_RUNTIME", "CLIP_RUNTIME=onnx runs on the CPU: use torch (or auto) with CLIP_DEVICE=cuda")
    )
