"""Start the real server (scripts/start.sh: gunicorn) on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START = ["bash", str(ROOT / "scripts" / "start.sh")]
# gunicorn alone, as the container's workers run after the start script's checks and prepare_model.
GUNICORN_ONLY = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "clipsite" / "gunicorn.conf.py")]


class Server:
    def __init__(self, env: dict[str, str], log: Path, command: list[str] | None = None):
        self.port = int(env["PORT"])
        self.log = log
        full_env = {**os.environ, "PYTHON": sys.executable, **env}
        full_env = {k: v for k, v in full_env.items() if v is not None}  # None: leave the variable unset
        full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
        self.env = full_env
        self._key: str | None = None
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command or START,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def details(self) -> dict:
        """/readyz?verbose=1: the model's source, backends, parity, CPU and timings, which need a key. The
        key is made once, in the server's database (migrated first: a server started without start.sh has
        not done it)."""
        if self._key is None:
            code = (
                "import django; django.setup(); from django.core.management import call_command; "
                "call_command('migrate', verbosity=0); from access.services import api_key_create; "
                "print(api_key_create(name='tests')[1])"
            )
            made = subprocess.run(
                [sys.executable, "-c", code], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert made.returncode == 0, made.stderr
            self._key = made.stdout.strip().splitlines()[-1]
        request = urllib.request.Request(
            self.url + "/readyz?verbose=1", headers={"Authorization": f"Bearer {self._key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log_file.close()


@contextlib.contextmanager
def serving(tmp: Path, model: str | Path, **env: str):
    """The real server on ``model``, ready, stopped on leaving: ``with serving(tmp, model) as srv``."""
    srv = Server(server_env(tmp, model, **env), tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def fresh_database(tmp: Path) -> str:
    """A new, empty database for one server (or several sharing it): a SQLite file in ``tmp``, or, when
    the suite runs against PostgreSQL (DATABASE_URL=postgres://..., scripts/with-postgres.sh), a new
    database on that server."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{tmp / 'db.sqlite3'}"
    import uuid

    import psycopg

    name = f"clipsite_server_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{url.rsplit('/', 1)[0]}/{name}"


def server_env(tmp: Path, model: str | Path, **extra: str) -> dict[str, str]:
    return {
        "PORT": str(free_port()),
        "CLIP_MODEL": str(model),
        "CLIP_MODELS_DIR": str(tmp / "models"),
        "DATABASE_URL": fresh_database(tmp),
        "DJANGO_DEBUG": "false",
        "DJANGO_SETTINGS_MODULE": "clipsite.settings",
        "WEB_CONCURRENCY": "1",
        **extra,
    }


def raw_http(port: int, request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (headers with underscores, doubled slashes) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
