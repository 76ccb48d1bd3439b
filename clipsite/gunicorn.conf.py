"""gunicorn configuration: values come from clipsite.settings, the one place the environment is read."""

from clipsite.settings import CLIPSITE as _config
from embeddings.runtime import coordination

bind = f"0.0.0.0:{_config.server.port}"
wsgi_app = "clipsite.wsgi:application"
worker_class = "gthread"
workers = _config.server.workers
threads = _config.server.threads
timeout = 120
graceful_timeout = 30
keepalive = 5
# The original spec's header is literally "request_id"; gunicorn drops underscored headers by default.
header_map = "dangerous"
accesslog = "-"
errorlog = "-"
# One copy of the model per worker process: never preload it in the master.
preload_app = False


# Workers share the cores: a shared block, created here in the master, tells each worker whether the
# others are busy (embeddings/runtime/coordination.py).
coordination.create_shared()


def post_fork(server, worker):
    coordination.set_slot(worker.age)


def child_exit(server, worker):
    coordination.clear_slot(worker.age)
