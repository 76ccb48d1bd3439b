"""The hostile-connection mix of the load-and-fault run: while the normal mix flows, clients that
hold sockets idle, stall bodies half-way in the header orders real clients use, send headers that never
end, flood chunked bodies past the limit, send small images that decode large, and big /v1 texts.

Every loop is bounded in count and time and stops by itself; traffic goes only to the loopback server
the run started. Each kind records what the server did with it (its status, or that it closed the
connection), so the report can say that none of it cost anyone else their answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import threading
import time
from collections import Counter

from PIL import Image

from bench.clipbench import multipart

# Header orders of real clients (curl, python-requests, httpx, an nginx proxy): Content-Length is
# never last for all of them.
ORDERS = (
    ("Host", "User-Agent", "Accept", "Content-Length", "Content-Type"),
    ("Host", "User-Agent", "Accept-Encoding", "Accept", "Connection", "Content-Length", "Content-Type"),
    ("Host", "Accept", "Accept-Encoding", "Connection", "User-Agent", "Content-Length", "Content-Type"),
    ("Host", "X-Forwarded-For", "Connection", "Content-Length", "Content-Type", "User-Agent"),
)
_VALUES = {
    "Host": "127.0.0.1",
    "User-Agent": "hostile/1.0",
    "Accept": "*/*",
    "Accept-Encoding": "gzip",
    "Connection": "keep-alive",
    "X-Forwarded-For": "198.51.100.9",
}
_STATUS = re.compile(rb"^HTTP/1\.1 (\d{3}) ")
PAUSE_S = 0.2  # between two rounds of one kind


def palette_bomb(side: int = 5000) -> bytes:
    """A PNG of a few kB that decodes to side x side pixels with a transparent palette entry."""
    im = Image.new("P", (side, side))
    im.putpalette([i % 256 for i in range(768)])
    out = io.BytesIO()
    im.save(out, "PNG", transparency=0)
    return out.getvalue()


def _answer(sock: socket.socket, timeout: float) -> str:
    """The status the server answered with, "closed" if it closed without one, "open" if it said nothing."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return "open"
    except OSError:
        return "closed"
    match = _STATUS.match(data)
    return match.group(1).decode() if match else "closed"


class Hostile:
    """Runs each hostile kind in threads of its own until ``stop`` or ``deadline``."""

    def __init__(self, port: int, *, deadline: float, idle_sockets: int = 600, max_request_bytes: int):
        self.port = port
        self.deadline = deadline
        self.idle_sockets = idle_sockets
        self.max_request_bytes = max_request_bytes
        self.outcomes: dict[str, Counter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _note(self, kind: str, outcome: str) -> None:
        with self._lock:
            self.outcomes.setdefault(kind, Counter())[outcome] += 1

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def start(self) -> None:
        kinds = (
            self._idle,
            self._stalled_bodies,
            self._endless_headers,
            self._chunked_flood,
            self._decode_bombs,
            self._big_v1_texts,
        )
        self._threads = [threading.Thread(target=self._guarded(k), daemon=True) for k in kinds]
        for thread in self._threads:
            thread.start()

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return {kind: dict(counts) for kind, counts in sorted(self.outcomes.items())}

    def _guarded(self, kind):
        def run():
            while self._running():
                try:
                    kind()
                except OSError:
                    self._note(kind.__name__.strip("_"), "connect failed")
                # A few rounds a second: hostile, not a CPU benchmark of the client itself.
                self._stop.wait(PAUSE_S)

        return run

    # --- the kinds ------------------------------------------------------------------------------------
    def _idle(self) -> None:
        """Hold ``idle_sockets`` connections that send nothing; count how the server ends them."""
        socks = []
        try:
            for _ in range(self.idle_sockets):
                if not self._running():
                    break
                socks.append(self._connect())
            while self._running() and socks:
                for sock in list(socks):
                    outcome = _answer(sock, 0.01)
                    if outcome != "open":
                        self._note("idle", outcome)
                        socks.remove(sock)
                        sock.close()
                self._stop.wait(0.5)
        finally:
            for sock in socks:
                sock.close()

    def _stalled_bodies(self) -> None:
        """Headers (in each real client's order) and half a body, then nothing more."""
        body, content_type = multipart("t", "a photo of a cat " * 50, None)
        socks = []
        try:
            for order in ORDERS * 8:
                values = {**_VALUES, "Content-Length": str(len(body)), "Content-Type": content_type}
                head = "POST /syte_test/embeddings HTTP/1.1\r\n" + "".join(f"{h}: {values[h]}\r\n" for h in order)
                sock = self._connect()
                sock.sendall(head.encode() + b"\r\n" + body[: len(body) // 2])
                socks.append(sock)
            for sock in socks:
                outcome = _answer(sock, max(0.1, min(60, self.deadline - time.monotonic())))
                if outcome != "open" or self._running():  # still open at the end: the run stopped first
                    self._note("stalled-body", outcome)
        finally:
            for sock in socks:
                sock.close()

    def _endless_headers(self) -> None:
        """Header lines that never end: the server must refuse them (431) past 64 KiB."""
        with self._connect() as sock:
            sock.sendall(b"GET /syte_test/embeddings HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(OSError):
                for _ in range(100):
                    sock.sendall(b"X-Endless: " + b"e" * 1000 + b"\r\n")
            self._note("endless-headers", _answer(sock, 30))

    def _chunked_flood(self) -> None:
        """A chunked body sent as fast as the server takes it, up to 4 times the request limit."""
        chunk = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
        with self._connect() as sock:
            sock.sendall(
                b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                for _ in range(4 * self.max_request_bytes // 65536):
                    if not self._running():
                        return  # stopped half-way: the server's answer would be its body timeout's
                    sock.sendall(chunk)
            self._note("chunked-flood", _answer(sock, 30))

    def _decode_bombs(self) -> None:
        """Four at once of a few-kB PNG that decodes to 25 megapixels."""
        body, content_type = multipart("image", palette_bomb(), "bomb.png")
        self._parallel("decode-bomb", "/syte_test/embeddings", body, content_type, 4)

    def _big_v1_texts(self) -> None:
        """Two at once of a /v1 body holding one 8 MB text ending in an emoji."""
        body = json.dumps({"input": ["a" * (8 << 20) + "\U0001f642"]}).encode()
        self._parallel("big-v1-text", "/v1/embeddings", body, "application/json", 2)

    def _parallel(self, kind: str, path: str, body: bytes, content_type: str, count: int) -> None:
        def one():
            with contextlib.suppress(OSError), self._connect() as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                self._note(kind, _answer(sock, 120))

        threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
