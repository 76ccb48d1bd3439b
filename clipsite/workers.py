"""gunicorn's threaded worker, with an edge that holds against hostile and broken clients.

gunicorn's gthread worker hands a connection to a thread as soon as it is readable, and the thread
parses the request from a blocking socket: a client that sends a byte at a time holds that thread for
as long as it likes. Its event loop also stops polling once ``worker_connections`` are open (upstream
gunicorn #3407), so 1,000 idle sockets wedge it for good. This worker owns the connections in its own
event loop instead:

- **Framing by a real HTTP/1.1 parser**: h11 reads the bytes as they arrive (headers in any order,
  Content-Length or chunked), scanning only new bytes. A thread gets a connection only once its request
  is whole, as one canonical request (the decoded body under a Content-Length, no Transfer-Encoding or
  Expect), served from memory: **no request thread ever reads from a client socket**, and gunicorn's
  parser never sees bytes that h11 did not accept. A request that declares (or, chunked, sends) more
  than the request limit is handed over at once, without its body, so the application answers 413 in
  the path's own shape; ``Expect: 100-continue`` is answered only for a body within the limit.
- **Timeouts**: the headers must be whole within ``header_timeout`` of the accept (or of a kept-alive
  connection's first byte); a body may pause ``body_timeout`` at most, and a request may take
  ``READ_LIMIT_S`` in all; an idle kept-alive connection closes after ``keepalive``; a thread's send
  to a client that stops reading gives up after ``SEND_TIMEOUT_S``.
- **A connection cap** (``worker_connections``) that sheds load and never stops polling: at the cap, a
  new connection pushes out the oldest one that has sent nothing (or only part of its headers); when
  every connection is mid-request, the new one gets a 503 ``overloaded`` and is closed.
- **Errors the parser finds** are answered here, in the API's JSON error shape, and the connection is
  closed: 400 ``malformed_http``, 414 ``uri_too_long``, 431 ``headers_too_large`` (over 64 KiB of
  headers, a field over ``limit_request_field_size``, or more than ``limit_request_fields``), 408
  ``request_timeout``.
- **Pipelined requests** (several in one packet) are each answered, in order.
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import time
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from queue import Empty, SimpleQueue

import h11
from gunicorn.workers.gthread import TConn, ThreadWorker

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers together; past this, 431
READ_LIMIT_S = 300.0  # a whole request, headers and body, however steadily it trickles in
SEND_TIMEOUT_S = 30.0  # a thread writing an answer to a client that reads none of it
_REAP_EVERY_S = 0.25
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_DROPPED_HEADERS = (b"content-length", b"transfer-encoding", b"expect")


@dataclass(frozen=True)
class EdgeTimeouts:
    header: float  # from the accept, or from a kept-alive connection's first byte, to the headers' end
    body: float  # the longest pause between two reads of a body
    keepalive: float  # an idle kept-alive connection


class BufferedSocket:
    """The connection's socket for a request thread: it reads the canonical request the event loop
    assembled and nothing else (an exhausted buffer reads as the end of the stream), and writes to the
    client with a timeout."""

    def __init__(self, sock: socket.socket):
        self.raw = sock
        self._chunks: deque[memoryview] = deque()

    def load(self, *chunks: bytes | bytearray) -> None:
        self._chunks = deque(memoryview(c) for c in chunks if c)

    def clear(self) -> None:
        self._chunks.clear()  # the request's body is released with its answer

    def recv(self, size: int, *args) -> bytes:
        while self._chunks:
            head = self._chunks[0]
            if len(head) > size:
                self._chunks[0] = head[size:]
                return bytes(head[:size])
            self._chunks.popleft()
            if len(head):
                return bytes(head)
        return b""

    def setblocking(self, flag: bool) -> None:
        # gunicorn makes a connection blocking for its thread: blocking, but never forever.
        self.raw.settimeout(SEND_TIMEOUT_S if flag else 0.0)

    def sendall(self, data, *args) -> None:
        try:
            self.raw.sendall(data, *args)
        except TimeoutError:
            raise OSError(errno.EPIPE, f"the client read nothing for {SEND_TIMEOUT_S:g} s") from None

    def __getattr__(self, name):  # send, fileno, close, shutdown, getsockname...
        return getattr(self.raw, name)


class Connection(TConn):
    """One client connection and where its current request stands, as the event loop sees it."""

    def __init__(self, cfg, sock, client, server, *, now: float, header_timeout: float):
        super().__init__(cfg, sock, client, server)  # leaves the socket non-blocking
        self.sock = BufferedSocket(sock)
        self.phase = "idle"  # idle (nothing of a request yet), head, body, or busy (a thread has it)
        self.deadline = now + header_timeout
        self.started = now
        self.http: h11.Connection | None = None  # h11's view of the current request
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.pending = b""  # bytes that arrived after the current request: the next one's
        self.answered_continue = False

    def reset(self, now: float, keepalive: float) -> None:
        """Between two requests of a kept-alive connection."""
        self.phase, self.deadline, self.started = "idle", now + keepalive, now
        self.http, self.request, self.body, self.answered_continue = None, None, bytearray(), False
        self.sock.clear()


class EdgeError(Exception):
    """A request the edge answers itself, and then closes the connection."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}
_REASONS |= {503: "Service Unavailable"}


def error_response(status: int, code: str, message: str, path: bytes = b"") -> bytes:
    """A whole HTTP answer in the API's error shape (OpenAI's on its paths), that closes the connection."""
    from embeddings.errors import error_body

    body = json.dumps(error_body(None, code, message, status=status, path=path.decode("latin-1"))).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


def canonical_request(request: h11.Request, length: int | None, *, close: bool) -> bytes:
    """The request line and headers for gunicorn's parser: the body (``length`` bytes) is framed by
    Content-Length alone, with Transfer-Encoding and Expect dropped (answered here)."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    for name, value in request.headers.raw_items():
        lower = name.lower()
        if lower in _DROPPED_HEADERS or (close and lower == b"connection"):
            continue
        lines.append(name + b": " + value)
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_and_close(sock: socket.socket, answer: bytes) -> None:
    """Send a short answer without blocking, then close. What the client already sent is read first
    (a little of it): closing over unread bytes sends a reset, which can destroy the answer in flight."""
    try:
        sock.setblocking(False)
        for _ in range(4):
            if not sock.recv(65536):
                break
    except OSError:
        pass
    try:
        sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def raise_nofile_limit(wanted: int) -> None:
    """Room for ``wanted`` open files: a cap of 1,000 connections must not meet a soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class BufferingThreadWorker(ThreadWorker):
    """gthread with the edge described above (``worker_class = "clipsite.workers.BufferingThreadWorker"``)."""

    timeouts = EdgeTimeouts(header=10.0, body=30.0, keepalive=5.0)

    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        if cfg.is_ssl:
            raise RuntimeError("clipsite's worker reads plain HTTP: terminate TLS at the proxy in front of it")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conns: dict[Connection, None] = {}  # every open connection
        self.waiting: OrderedDict[Connection, None] = OrderedDict()  # idle or reading headers, oldest first
        self._keep: set[Connection] = set()  # idle kept-alive connections (gunicorn counts them)
        self._returned: SimpleQueue = SimpleQueue()  # futures of finished requests, from the threads
        self._next_reap = 0.0
        self._accepting = True

    # --- setup --------------------------------------------------------------------------------------
    def init_process(self):
        raise_nofile_limit(self.worker_connections + 256)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        super().init_process()

    def max_body(self) -> int:
        from clipsite.config import current

        return current().limits.max_request_bytes

    def load_timeouts(self) -> None:
        from clipsite.config import current

        server = current().server
        self.timeouts = EdgeTimeouts(
            header=server.header_timeout_s, body=server.body_timeout_s, keepalive=float(self.cfg.keepalive)
        )

    # --- the loop -----------------------------------------------------------------------------------
    def run(self):
        self.load_timeouts()
        self._max_body = self.max_body()
        self.poller.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        for listener in self.sockets:
            listener.setblocking(False)
            # the name is captured once: during a graceful shutdown it may be gone
            self.poller.register(listener, selectors.EVENT_READ, partial(self.accept, listener.getsockname()))

        while self.alive:
            self.notify()
            for key, _ in self.poller.select(self._wait()):
                key.data(key.fileobj)
            self._take_back_finished()
            if not self.is_parent_alive():
                break
            self._reap()

        self._shut_down()

    def _wait(self) -> float:
        if not self.waiting and len(self.conns) == len(self.futures):
            return 1.0
        return max(0.0, min(1.0, self._next_reap - time.monotonic()))

    def _shut_down(self) -> None:
        self.tpool.shutdown(False)
        for conn in list(self.conns):
            if conn.phase != "busy":  # requests in flight finish (graceful_timeout); the rest close
                self._close(conn)
        for listener in self.sockets:
            listener.close()
        futures.wait(self.futures, timeout=self.cfg.graceful_timeout)
        self.poller.close()

    def _drain_wake(self, sock) -> None:
        try:
            while sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- accepting ----------------------------------------------------------------------------------
    def accept(self, server, listener):
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.warning("Out of file descriptors accepting a connection: shedding an idle one")
                if not self._evict_one():
                    self._pause_accepting()
                return
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK, errno.EINTR):
                return
            raise
        if len(self.conns) >= self.worker_connections and not self._evict_one():
            self._shed(sock)
            return
        now = time.monotonic()
        conn = Connection(self.cfg, sock, client, server, now=now, header_timeout=self.timeouts.header)
        self.conns[conn] = None
        self.waiting[conn] = None
        self.poller.register(sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def _evict_one(self) -> bool:
        """Close the oldest connection that has sent nothing (or only part of its headers)."""
        victim = next((c for c in self.waiting if c.phase == "idle"), None) or next(iter(self.waiting), None)
        if victim is None:
            return False
        self._count("evicted")
        self._close(victim)
        return True

    def _shed(self, sock: socket.socket) -> None:
        """Every connection is mid-request: the new one gets a 503 and is closed."""
        self._count("shed")
        answer_and_close(
            sock, error_response(503, "overloaded", "The server has too many connections open; try again.")
        )

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            for listener in self.sockets:
                self.poller.unregister(listener)

    def _resume_accepting(self) -> None:
        if not self._accepting and self.alive:
            self._accepting = True
            for listener in self.sockets:
                self.poller.register(listener, selectors.EVENT_READ, partial(self.accept, listener.getsockname()))

    # --- reading a request --------------------------------------------------------------------------
    def on_client_socket_readable(self, conn, client):
        try:
            data = conn.sock.raw.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ETIMEDOUT):
                self.log.debug("Read error on a client connection: %s", exc)
            data = b""
        if not data:  # the client went away (or half-closed before finishing its request)
            self._close(conn)
            return
        self._feed(conn, data)

    def _feed(self, conn: Connection, data: bytes) -> None:
        now = time.monotonic()
        if conn.phase == "idle":
            conn.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
            if conn.initialized:  # a kept-alive connection's next request: its clocks start now
                self._keep.discard(conn)
                conn.deadline, conn.started = now + self.timeouts.header, now
            conn.phase = "head"
        conn.http.receive_data(data)
        try:
            self._advance(conn, now)
        except EdgeError as exc:
            self._refuse(conn, exc)

    def _advance(self, conn: Connection, now: float) -> None:
        while True:
            try:
                event = conn.http.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    message = f"The request's headers are over {MAX_HEADER_BYTES} bytes."
                    raise EdgeError(431, "headers_too_large", message) from None
                raise EdgeError(400, "malformed_http", f"The request is not valid HTTP/1.1: {exc}.") from None
            if event is h11.NEED_DATA:
                self._answer_continue(conn)
                return
            if isinstance(event, h11.Request):
                self._check_head(event)
                conn.request, conn.phase = event, "body"
                self.waiting.pop(conn, None)
                conn.deadline = min(now + self.timeouts.body, conn.started + READ_LIMIT_S)
                declared = _declared_length(event)
                if declared is not None and declared > self._max_body:
                    self._hand_over(conn, too_large=declared)
                    return
            elif isinstance(event, h11.Data):
                conn.body += event.data
                conn.deadline = min(now + self.timeouts.body, conn.started + READ_LIMIT_S)
                if len(conn.body) > self._max_body:  # chunked, past the limit: counted as it comes
                    self._hand_over(conn, too_large=len(conn.body))
                    return
            elif isinstance(event, h11.EndOfMessage):
                conn.pending = conn.http.trailing_data[0]
                self._hand_over(conn)
                return
            else:  # ConnectionClosed, PAUSED: nothing more of this request
                self._close(conn)
                return

    def _check_head(self, request: h11.Request) -> None:
        """gunicorn's own limits, enforced here so its parser never refuses what h11 accepted."""
        if len(request.method) + len(request.target) + 10 > self.cfg.limit_request_line:
            raise EdgeError(414, "uri_too_long", f"The request line is over {self.cfg.limit_request_line} bytes.")
        fields = request.headers.raw_items()
        if len(fields) > self.cfg.limit_request_fields:
            raise EdgeError(431, "headers_too_large", f"The request has over {self.cfg.limit_request_fields} headers.")
        if any(len(n) + len(v) + 2 > self.cfg.limit_request_field_size for n, v in fields):
            limit = self.cfg.limit_request_field_size
            raise EdgeError(431, "headers_too_large", f"A request header is over {limit} bytes.")

    def _answer_continue(self, conn: Connection) -> None:
        if conn.http.they_are_waiting_for_100_continue and not conn.answered_continue:
            conn.answered_continue = True
            try:
                conn.sock.raw.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def _hand_over(self, conn: Connection, too_large: int | None = None) -> None:
        """The request is whole (or refused from its size): a thread serves it from memory."""
        request = conn.request
        framed = request.method in _BODY_METHODS or bool(conn.body) or _declared_length(request) is not None
        if too_large is not None:  # no body: the application refuses it from the length alone
            head = canonical_request(request, too_large, close=True)
            conn.sock.load(head)
            conn.pending = b""
        else:
            head = canonical_request(request, len(conn.body) if framed else None, close=False)
            conn.sock.load(head, conn.body)
        conn.body, conn.http = bytearray(), None
        conn.phase = "busy"
        self.waiting.pop(conn, None)
        self.poller.unregister(conn.sock.raw)
        self.enqueue_req(conn)

    def _refuse(self, conn: Connection, exc: EdgeError) -> None:
        self._count(exc.code)
        path = conn.request.target if conn.request is not None else b""
        answer_and_close(conn.sock.raw, error_response(exc.status, exc.code, exc.message, path))
        self._close(conn)

    # --- finished requests --------------------------------------------------------------------------
    def finish_request(self, fs):
        """Called in the thread that served the request: the event loop takes the connection back."""
        self._returned.put(fs)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # its buffer is full: the loop is awake anyway

    def _take_back_finished(self) -> None:
        now = time.monotonic()
        while True:
            try:
                fs = self._returned.get_nowait()
            except Empty:
                return
            try:
                self.futures.remove(fs)
            except ValueError:
                pass
            conn = fs.conn
            try:
                keepalive = not fs.cancelled() and fs.result()[0]
            except Exception:  # noqa: BLE001 - gunicorn logged it; the connection closes
                keepalive = False
            if not keepalive or not self.alive:
                self._close(conn)
                continue
            conn.reset(now, self.timeouts.keepalive)
            conn.sock.setblocking(False)
            self._keep.add(conn)
            self.waiting[conn] = None
            self.poller.register(conn.sock.raw, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
            if conn.pending:  # a pipelined request already here: no readable event will announce it
                data, conn.pending = conn.pending, b""
                self._feed(conn, data)

    # --- timeouts and closing -----------------------------------------------------------------------
    def _reap(self) -> None:
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + _REAP_EVERY_S
        for conn in [c for c in self.conns if c.phase != "busy" and c.deadline <= now]:
            if conn.phase == "idle":
                self._count("keepalive_timeout" if conn.initialized else "header_timeout")
                self._close(conn)
            else:
                code = "header_timeout" if conn.phase == "head" else "body_timeout"
                self._count(code)
                what = "its headers" if conn.phase == "head" else "its body"
                self._refuse(conn, EdgeError(408, "request_timeout", f"The client took too long to send {what}."))

    def _close(self, conn: Connection) -> None:
        if conn.phase != "busy":
            try:
                self.poller.unregister(conn.sock.raw)
            except (KeyError, ValueError, OSError):
                pass
        self.conns.pop(conn, None)
        self.waiting.pop(conn, None)
        self._keep.discard(conn)
        conn.sock.clear()
        conn.close()
        self._resume_accepting()

    def murder_keepalived(self):  # gthread's keep-alive reaper: this worker's _reap does it all
        pass

    def enqueue_req(self, conn):
        conn.initialized = True
        if conn.parser is None:
            from gunicorn import http

            conn.parser = http.RequestParser(self.cfg, conn.sock, conn.client)
        conn.sock.setblocking(True)
        fs = self.tpool.submit(self.handle, conn)
        self._wrap_future(fs, conn)

    def _count(self, reason: str) -> None:
        try:
            from embeddings import metrics

            metrics.EDGE_CLOSED.labels(reason).inc()
        except Exception:  # noqa: BLE001 - counting must never break the loop
            pass


def _declared_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None
