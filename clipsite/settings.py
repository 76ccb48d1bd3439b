"""Django settings for clipsite: the one place the environment is read.

``CLIPSITE`` is the frozen configuration of the service (clipsite/config.py declares every variable,
its default and its system check); the Django settings below are derived from it.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
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
    "axes",  # admin login throttling; its tables come with `migrate`
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
    # Last, as django-axes asks: it turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
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
    # psycopg 3, through clipsite/postgresql: Django's backend with a deadline on the server's answers.
    # As with SQLite's busy timeout, a database that is down, slow or silent is a quick error (503
    # database_unavailable; the wearable answers from memory), never a request stalled for minutes:
    # connecting gives up after 3 s, a lock is waited for 2 s, the server ends a query after
    # DATABASE_TIMEOUT, and the client waits one second more for any answer (the only limit that holds
    # against a server that is stopped while its kernel still acknowledges every packet). Keep-alives
    # and tcp_user_timeout drop a connection whose packets go unanswered (a partition, a host gone).
    # A URL's own values win, each setting its ?options= names included.
    DATABASES["default"]["ENGINE"] = "clipsite.postgresql"
    _pg = DATABASES["default"].setdefault("OPTIONS", {})
    _pg.setdefault("connect_timeout", 3)
    _timeout_ms = round(CLIPSITE.database_timeout_s * 1000)  # 0: no limit (long migrations)
    _server = {"lock_timeout": SQLITE_BUSY_TIMEOUT_S * 1000, "statement_timeout": _timeout_ms}
    _own = _pg.get("options", "")
    _ours = [f"-c {name}={ms}" for name, ms in _server.items() if ms and f"{name}=" not in _own]
    _pg["options"] = " ".join([_own, *_ours]).strip()
    # An idle connection is probed after 10 s, then every 2 s; 3 unanswered probes drop it.
    _keepalives = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 2, "keepalives_count": 3}
    for _name, _value in _keepalives.items():
        _pg.setdefault(_name, _value)
    if _timeout_ms:
        _pg.setdefault("tcp_user_timeout", _timeout_ms)
        _pg.setdefault("client_timeout", CLIPSITE.database_timeout_s + 1)  # clipsite/postgresql/base.py

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Rate limits (CLIP_RATE_LIMIT, failed key lookups) count in a store off the database (access/ratelimit.py):
# with CLIP_REDIS_URL in Redis, which every replica shares, waiting at most 0.25 s for it; else in SQLite
# files under CLIP_RATE_LIMIT_DIR (diskcache), which the worker processes of this machine share: a few
# indexed operations a request, held under 64 MB (plus each shard's write-ahead log), the entries stored
# longest ago evicted first, and expired ones before them.
if CLIPSITE.access.redis_url:
    _counts = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": CLIPSITE.access.redis_url,
        "KEY_PREFIX": "clipsite",
        "OPTIONS": {"socket_connect_timeout": 0.25, "socket_timeout": 0.25},
    }
else:
    _counts = {
        "BACKEND": "access.ratelimit.LocalCounts",
        "LOCATION": str(CLIPSITE.access.rate_limit_dir),
        "SHARDS": 4,
        "DATABASE_TIMEOUT": 0.05,
        "OPTIONS": {"size_limit": 64 * 2**20},
    }
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}, "throttle": _counts}

# Admin logins are throttled by django-axes: AxesStandaloneBackend refuses a locked-out login before
# ModelBackend checks the password, so even the right password is refused until the cool-off ends.
# Counts are rows in the database (axes' default handler), shared by every worker and replica.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# 5 failures for one username from one address lock that pair out for 15 minutes; other users and
# other addresses keep logging in. Per pair, not per username, so that a stranger elsewhere cannot lock
# staff out; behind a proxy whose address every client shares, the pair is per username in effect.
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = timedelta(minutes=15)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
# No banner at every process start; a failure's log line names the username and address, masked.
AXES_VERBOSE = False
# The address is the one the rate limits use (access/identity.py): X-Forwarded-For only from the
# proxies CLIP_TRUSTED_PROXIES names, so a client-sent one cannot buy a fresh count.
AXES_CLIENT_IP_CALLABLE = "access.identity.axes_client_ip"

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
        # One record a line, whatever a client sent: embeddings/logs.py escapes what could break it.
        "plain": {"()": "embeddings.logs.PlainFormatter"},
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
