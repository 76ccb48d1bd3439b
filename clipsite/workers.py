"""gunicorn's threaded worker, with each request read whole before a thread sees it.

gunicorn's gthread worker waits in its event loop only until a connection is readable, then hands it
to a thread that parses the request with a blocking socket: a client sending a byte at a time holds
that thread for as long as it likes, and a few dozen such clients hold them all. This worker keeps a
connection in the event loop, reading whatever has arrived without blocking, until its request is
complete (headers, and the body its Content-Length or chunked framing announces), and only then hands
it to a thread, which finds every byte already there. A request that declares more than the request
limit is handed over once its headers are in, so the application refuses it before reading the body;
a connection that has not finished its request within ``READ_TIMEOUT_S`` is closed.
"""

from __future__ import annotations

import errno
import re
import time

from gunicorn.workers.gthread import ThreadWorker

READ_TIMEOUT_S = 60.0  # a whole request, headers and body, from its first byte
MAX_HEADER_BYTES = 64 * 1024  # past this without the blank line, gunicorn's parser refuses it
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:.*chunked", re.IGNORECASE | re.MULTILINE)


class BufferedSocket:
    """The connection's socket, with the bytes read ahead in the event loop served first."""

    def __init__(self, sock):
        self._sock = sock
        self.buffer = bytearray()

    def recv(self, size: int, *args) -> bytes:
        if self.buffer:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        return self._sock.recv(size, *args)

    def __getattr__(self, name):  # sendall, setblocking, fileno, close, shutdown...
        return getattr(self._sock, name)


def request_complete(buffer: bytes | bytearray, max_body: int) -> bool:
    """Whether ``buffer`` holds a whole request, or enough of one to hand over (see the module)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return len(buffer) > MAX_HEADER_BYTES
    head = bytes(buffer[:end])
    if _CHUNKED.search(head):
        return buffer.find(b"\r\n0\r\n", end) >= 0 and buffer.endswith(b"\r\n\r\n")
    match = _CONTENT_LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    return length > max_body or len(buffer) - (end + 4) >= length


class BufferingThreadWorker(ThreadWorker):
    """gthread, reading requests in its event loop (``worker_class = "clipsite.workers.BufferingThreadWorker"``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reading: dict[object, float] = {}  # connection -> when its request's first byte came

    def max_body(self) -> int:
        from clipsite.config import current

        return current().limits.max_request_bytes

    def on_client_socket_readable(self, conn, client):
        if not isinstance(conn.sock, BufferedSocket):
            conn.sock = BufferedSocket(conn.sock)
        with self._lock:
            if conn not in self._reading:
                if conn.initialized:  # a kept-alive connection's next request begins
                    try:
                        self._keep.remove(conn)
                    except ValueError:
                        return  # its keep-alive just ran out: it is being closed
                self._reading[conn] = time.monotonic()
        try:
            data = conn.sock._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                self.log.debug("Read error while buffering a request: %s", exc)
            data = b""
        if not data:  # the client went away
            self._drop(conn)
            return
        conn.sock.buffer += data
        if request_complete(conn.sock.buffer, self.max_body()):
            with self._lock:
                self.poller.unregister(conn.sock)
                self._reading.pop(conn, None)
            self.enqueue_req(conn)

    def _drop(self, conn) -> None:
        with self._lock:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            self._reading.pop(conn, None)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self):
        super().murder_keepalived()
        now = time.monotonic()
        with self._lock:
            stale = [conn for conn, since in self._reading.items() if now - since > READ_TIMEOUT_S]
        for conn in stale:
            self.log.debug("Closing a connection that did not send its request within %s s", READ_TIMEOUT_S)
            self._drop(conn)
