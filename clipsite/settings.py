"""Django settings for clipsite: the one place the environment is read.

``CLIPSITE`` is the frozen configuration of the service (clipsite/config.py declares every variable,
its default and its system check); the Django settings below are derived from it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

from clipsite.config import NO_SECRET_KEY, Problem, kept_secret_key, load

BASE_DIR = Path(__file__).resolve().parent.parent

CLIPSITE, CLIPSITE_PROBLEMS = load(os.environ, base_dir=BASE_DIR)

DEBUG = CLIPSITE.debug
# An unset key gets a per-install random one kept beside the database, so sessions survive restarts
# without a secret ever being committed. Where none can be kept, the start stops (clipsite.E037):
# workers with keys of their own would refuse each other's sessions and CSRF tokens.
SECRET_KEY = CLIPSITE.secret_key or kept_secret_key(BASE_DIR / "var" / "secret_key")
if not SECRET_KEY:
    CLIPSITE_PROBLEMS.append(NO_SECRET_KEY)
    SECRET_KEY = secrets.token_urlsafe(50)  # lets the checks run and report it

ALLOWED_HOSTS = list(CLIPSITE.allowed_hosts)
CSRF_TRUSTED_ORIGINS = list(CLIPSITE.csrf_trusted_origins)
if CLIPSITE.https:
    # Behind a TLS proxy (README, "Running in production"): it says https in X-Forwarded-Proto, and
    # plain-HTTP requests are redirected; the health probes are answered before the redirect.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = CLIPSITE.hsts_seconds
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True  # consent only: nothing happens until the domain's owner submits it

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: the docs page needs no CDN
    "embeddings.apps.EmbeddingsConfig",
    "wearable.apps.WearableConfig",
    "access.apps.AccessConfig",
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
    # Persistent connections (one per worker thread, kept 60 s), checked before each request reuses one:
    # a connection the database closed (a restart, a failover) costs a reconnect, not a failed request.
    DATABASES = {"default": dj_database_url.parse(CLIPSITE.database_url, conn_max_age=60, conn_health_checks=True)}
except Exception:  # noqa: BLE001 - any parse failure is a configuration error
    CLIPSITE_PROBLEMS.append(
        Problem(
            "DATABASE_URL",
            "DATABASE_URL is not a database URL dj-database-url understands",
            "clipsite.E005",
            "A URL dj-database-url reads, e.g. postgres://user:password@host/db. README.md lists the accepted values.",
        )
    )
    DATABASES = {"default": dj_database_url.parse(_default_db)}
# How long a query waits for another process's SQLite lock before it fails. Short: a held lock must
# become a quick error the wearable answers from memory (its recorded prediction dropped), not a request
# stalled for many seconds; with WAL only writers ever wait, and a write holds the lock for milliseconds.
SQLITE_BUSY_TIMEOUT_S = 2
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several worker processes share one SQLite file. WAL lets readers (the wearable's freshness query)
    # go on while a writer holds the lock. IMMEDIATE takes the write lock at BEGIN, where the busy
    # timeout applies; a deferred transaction that upgrades later fails at once instead of waiting.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": SQLITE_BUSY_TIMEOUT_S,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL",
        }
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)

if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # psycopg 3. As with SQLite's busy timeout: an unreachable server or a held lock becomes a quick
    # error (the wearable then answers from memory), not a request stalled for a minute. A URL's own
    # ?connect_timeout= or ?options= wins.
    _pg = DATABASES["default"].setdefault("OPTIONS", {})
    _pg.setdefault("connect_timeout", 3)
    _pg.setdefault("options", f"-c lock_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Rate limits (CLIP_RATE_LIMIT) count in a cache every worker process shares: files under var/, so the
# API never waits on the database for them.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(CLIPSITE.access.rate_limit_dir),
        "OPTIONS": {"MAX_ENTRIES": 100_000},
    },
}

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
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI schema at /api/schema/ and its Swagger UI at /api/docs/ (embeddings/schema.py describes
# the answers and errors); the UI's scripts and styles are static files of this server, never a CDN's.
SPECTACULAR_SETTINGS = {
    "TITLE": "clipsite",
    "DESCRIPTION": "CLIP vectors of images and texts, their similarities, and wearable categories of a photo.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "PREPROCESSING_HOOKS": ["embeddings.schema.documented_endpoints"],
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "embeddings.schema.describe_errors"],
    # The demo page's own token is not for API clients.
    "AUTHENTICATION_WHITELIST": ["access.authentication.ApiKeyAuthentication"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "ErrorCodeEnum": "embeddings.schema.ERROR_CODES",
        "EncodingEnum": "embeddings.schema.ENCODINGS",
    },
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},  # no call to swagger.io's validator
}

# Django's own guards stay in front of ours for the non-API forms (admin, the demo page's no-script
# forms): its default 2.5 MB for fields, the API's part limit for files. Every body's declared length
# is refused over CLIP_MAX_REQUEST_BYTES before anything reads it (embeddings/middleware.py).
DATA_UPLOAD_MAX_NUMBER_FILES = CLIPSITE.limits.max_parts
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every line names the request it belongs to ("-" outside a request): see embeddings/logs.py.
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s"},
        "json": {"()": "embeddings.logs.JsonFormatter"},  # LOG_FORMAT=json: one JSON object a line
    },
    "filters": {
        "not_probes": {"()": "embeddings.logs.NotAProbe"},
        "request_id": {"()": "embeddings.logs.RequestIdFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": CLIPSITE.observability.log_format,
            "filters": ["request_id", "not_probes"],
        },
    },
    "root": {"handlers": ["console"], "level": CLIPSITE.log_level},
    "loggers": {"django.request": {"level": "ERROR"}},
}
