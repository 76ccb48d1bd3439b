"""gunicorn configuration: values come from clipsite.settings, the one place the environment is read."""

import os
import shutil
import tempfile

# Prometheus' multiprocess mode: every worker writes its metrics into files in one fresh folder, which
# /metrics sums whichever worker answers (embeddings/metrics.py). prometheus_client reads the variable
# when it is first imported, so the master sets it here, before anything imports it and before any worker
# is forked: process setup, not configuration, and the only place it is set.
_metrics_dir = tempfile.mkdtemp(prefix="clipsite-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

from clipsite.settings import CLIPSITE as _config  # noqa: E402
from embeddings.runtime import coordination  # noqa: E402

bind = f"0.0.0.0:{_config.server.port}"
wsgi_app = "clipsite.wsgi:application"
# gthread, reading each request whole in its event loop before a thread sees it: clients that send
# a byte at a time cost a connection each, never a thread (clipsite/workers.py).
worker_class = "clipsite.workers.BufferingThreadWorker"
workers = _config.server.workers
threads = _config.server.threads
# Set on purpose: at the cap the worker closes its oldest idle connection (or answers 503) and goes on
# polling; its header and body timeouts come from the same settings (clipsite/workers.py).
worker_connections = _config.server.max_connections
timeout = 120
graceful_timeout = 30
keepalive = _config.server.keepalive_s
# gunicorn's own limits, which the worker enforces before gunicorn's parser sees a request (414, 431).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# sendfile is left unset (gunicorn reads any value, True included, as "off"): a file answer (the
# static files) is kept as the file and sent by the event loop with os.sendfile (clipsite/workers.py
# FilePart), holding no memory while a client reads it.
# The original spec's header is literally "request_id", and gunicorn refuses or drops every header
# with an underscore (X_Forwarded_For would otherwise merge into X-Forwarded-For). Drop them all but
# REQUEST_ID: gunicorn keeps the "forwarder" headers it is told to, from any peer here, and no other
# header is trusted from peers (no scheme headers: Django's SECURE_PROXY_SSL_HEADER decides https).
header_map = "drop"
forwarder_headers = "REQUEST_ID"
forwarded_allow_ips = "*"
secure_scheme_headers = {}
# No access log: the application writes one line per request, escaped, in LOG_FORMAT
# (embeddings/logs.py). gunicorn's own line repeated it, with the User-Agent's control characters raw.
accesslog = None
errorlog = "-"
# gunicorn's own lines (starting, booting workers, a request its parser refused) in the same format as
# the application's, so that LOG_FORMAT=json gives JSON lines only.
_formatter = "JsonFormatter" if _config.observability.log_format == "json" else "PlainFormatter"
logconfig_dict = {
    "formatters": {"clipsite": {"()": f"embeddings.logs.{_formatter}"}},
    "filters": {"request_id": {"()": "embeddings.logs.RequestIdFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "clipsite",
            "filters": ["request_id"],
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": _config.log_level, "handlers": ["console"]},
    "loggers": {"gunicorn.error": {"level": _config.log_level, "handlers": [], "propagate": True}},
}
# One copy of the model per worker process: never preload it in the master.
preload_app = False


# Workers share the cores: a shared block, created here in the master, tells each worker whether the
# others are busy (embeddings/runtime/coordination.py).
coordination.create_shared()


def _import_the_libraries_once() -> None:
    """The heavy libraries, imported here in the master, are the forked workers' too: their pages are
    shared copy-on-write instead of each worker holding its own (measured: ~200 MB less private
    memory per worker). Imports only: no model and no threads start in the master."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import; workers never download
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import transformers.configuration_utils  # noqa: F401
    import transformers.models.auto.processing_auto  # noqa: F401

    # Not onnxruntime: imported in the master, it makes every worker that then runs OpenVINO abort as it
    # exits (std::system_error from a static destructor, after the drain: measured with scripts like
    # the lifecycle tests). Workers import it themselves where a tower runs on it.
    try:
        from embeddings.runtime.backends.openvino import load_openvino

        load_openvino()  # its telemetry declined first: no thread forks a process in the master
    except ImportError:
        pass


_import_the_libraries_once()


def pre_fork(server, worker):
    taken = {getattr(w, "clip_slot", None) for w in server.WORKERS.values()}
    worker.clip_slot = coordination.free_slot(taken, worker.age)


def post_fork(server, worker):
    coordination.set_slot(worker.clip_slot)


def post_worker_init(worker):
    """A replacement worker takes connections only once its model is loaded (its siblings serve
    meanwhile). SIGTERM drains: readiness fails first (so a balancer stops sending), then gunicorn's
    own handler stops accepting and lets the requests in flight finish within graceful_timeout."""
    import signal

    from embeddings.runtime.state import runtime

    def keep_waiting() -> bool:
        worker.notify()  # the master's heartbeat: a long load must not look like a hung worker
        return worker.alive

    if coordination.wait_for_siblings(lambda: runtime.status != "loading", keep_waiting):
        worker.log.info("Worker %s loaded its model while its siblings served: now taking connections", worker.pid)
    if not worker.alive:  # told to stop while it waited: it takes no connection, and nobody waits for it
        return
    coordination.mark_accepting()

    stop = signal.getsignal(signal.SIGTERM)

    def drain(signum, frame):
        runtime.drain()
        stop(signum, frame)

    signal.signal(signal.SIGTERM, drain)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    coordination.clear_slot(worker.clip_slot)
    multiprocess.mark_process_dead(worker.pid)  # its live gauges (queue depth) leave the sums


def on_exit(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)
