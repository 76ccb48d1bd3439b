"""gunicorn configuration: values come from clipsite.settings, the one place the environment is read."""

from clipsite import settings
from embeddings.runtime import coordination

bind = f"0.0.0.0:{settings.PORT}"
wsgi_app = "clipsite.wsgi:application"
worker_class = "gthread"
workers = settings.WEB_CONCURRENCY
threads = settings.WEB_THREADS
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
