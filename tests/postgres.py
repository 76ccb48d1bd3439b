"""A throwaway PostgreSQL cluster of a test's own, to stop, freeze and start again (the suite's shared one,
scripts/with-postgres.sh, must keep running).

It is made as that script makes the suite's: from the PostgreSQL found on this machine (Debian's
/usr/lib/postgresql/*/bin, or initdb on PATH), in a fresh folder under /tmp (as root, the postgres user
must reach it, and pytest's tmp_path is its owner's only), listening on a free loopback port with trust
authentication, durability off; as root, the server runs as the postgres user, which PostgreSQL requires.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.server import free_port


def postgres_bindir() -> Path | None:
    """The newest PostgreSQL's bin folder on this machine, or None."""
    found = [bindir for bindir in Path("/usr/lib/postgresql").glob("*/bin") if (bindir / "initdb").exists()]
    if found:
        return max(found, key=lambda bindir: int(re.sub(r"\D", "", bindir.parent.name) or 0))
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


class Cluster:
    """One PostgreSQL server with a ``clipsite`` database: ``url``; ``stop()``, ``start()``, ``freeze()``
    (SIGSTOP on the postmaster and every backend: up, accepting TCP in the kernel, answering nothing),
    ``thaw()``, and ``remove()``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="clipsite-pg-"))
        self.folder.chmod(0o755)
        self.port = free_port()
        self.as_owner: list[str] = []
        self.frozen: list[int] = []
        if os.geteuid() == 0:
            if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            shutil.chown(self.folder, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
            self.start()
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "clipsite")
        except BaseException:
            self.remove()
            raise

    @property
    def data(self) -> str:
        return str(self.folder / "data")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/clipsite"

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_owner, str(self.bindir / program), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed:\n{done.stdout}{done.stderr}\n{self.log()}")

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", self.data, "-l", str(self.folder / "server.log"), "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self) -> None:
        """A stopped server: its connections closed, its port refusing new ones."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def postmaster_pid(self) -> int:
        return int((Path(self.data) / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then each of its processes: no RST, no answer, packets still acknowledged."""
        postmaster = self.postmaster_pid()
        os.kill(postmaster, signal.SIGSTOP)
        self.frozen = [postmaster]
        for pid in _children(postmaster):
            os.kill(pid, signal.SIGSTOP)
            self.frozen.append(pid)

    def thaw(self) -> None:
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.frozen = []

    def remove(self) -> None:
        self.thaw()
        subprocess.run(
            [*self.as_owner, str(self.bindir / "pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.folder, ignore_errors=True)
