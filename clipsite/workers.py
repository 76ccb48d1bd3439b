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
import math
import os
import re
import resource
import selectors
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import partial
from queue import Empty, SimpleQueue

import h11
from gunicorn.workers.gthread import TConn, ThreadWorker

from embeddings import memory

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers together; past this, 431
# A body holds the worker's memory budget as its bytes arrive, this far ahead: a client that declares
# 100 MB and sends nothing holds 64 KiB's worth, not 400 MB (at the connection cap, a quarter of the
# default budget).
HOLD_AHEAD_BYTES = 64 << 10
# Each chunk of a chunked body counts this much against the request limit beside its bytes: parsing a
# chunk costs the event loop the same whatever its size, so a body of 1-byte chunks is refused long
# before it costs a CPU-second (a real client's chunks are kilobytes).
CHUNK_COST_BYTES = 1024
READ_LIMIT_S = 300.0  # a whole request, headers and body, however steadily it trickles in
SEND_TIMEOUT_S = 30.0  # an answer's client that reads none of it for this long is closed
_REAP_EVERY_S = 0.25
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_DROPPED_HEADERS = (b"content-length", b"transfer-encoding", b"expect")


@dataclass(frozen=True)
class EdgeTimeouts:
    header: float  # from the accept, or from a kept-alive connection's first byte, to the headers' end
    body: float  # the longest pause between two reads of a body
    keepalive: float  # an idle kept-alive connection


class FilePart:
    """Part of an answer that is a file (a static file gunicorn would ``sendfile``): its own descriptor
    and the range still to send, sent by the kernel from the page cache. A 4 MB bundle to a client that
    reads nothing costs a descriptor, not 4 MB of the worker's memory."""

    def __init__(self, fd: int, offset: int, count: int):
        self.fd, self.offset, self.count = fd, offset, count

    def send(self, sock: socket.socket) -> bool:
        """Send what the socket takes now; True once all of it is sent, False when the client's window
        is full for now (BlockingIOError if it took nothing this time)."""
        start = self.offset
        while self.count:
            try:
                sent = os.sendfile(sock.fileno(), self.fd, self.offset, min(self.count, 1 << 20))
            except BlockingIOError:
                if self.offset == start:
                    raise
                return False
            if not sent:  # the file shrank under us: the client gets a short answer and the close
                raise OSError("the file ended before its answer")
            self.offset += sent
            self.count -= sent
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BufferedSocket:
    """The connection's socket for a request thread: it reads the canonical request the event loop
    assembled and nothing else (an exhausted buffer reads as the end of the stream), and its writes are
    kept for the event loop to send: a thread never waits on a client, however slowly it reads. A file
    answer is kept as the file (``sendfile``), not its bytes."""

    def __init__(self, sock: socket.socket):
        self.raw = sock
        self._chunks: deque[memoryview] = deque()
        self.out: deque[bytes | FilePart] = deque()  # the answer, as the thread wrote it, until sent

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
        pass  # the socket stays non-blocking: only the event loop uses it

    def sendall(self, data, *args) -> None:
        if data:
            self.out.append(bytes(data))

    def send(self, data, *args) -> int:
        self.sendall(data)
        return len(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        """gunicorn's Response.sendfile: keep the file's range for the event loop (its own descriptor,
        since gunicorn closes the file once the request is done)."""
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        try:
            fd = os.dup(file.fileno())
        except OSError:  # no descriptor left: its bytes, then
            file.seek(offset)
            self.sendall(file.read(count))
            return count
        self.out.append(FilePart(fd, offset, count))
        return count

    def pending_out(self) -> int:
        """Bytes of the answer held in memory (a file part holds none)."""
        return sum(len(chunk) for chunk in self.out if isinstance(chunk, bytes))

    def flush(self) -> bool:
        """Send what the socket takes now, without blocking; True once everything is sent."""
        while self.out:
            head = self.out[0]
            if isinstance(head, FilePart):
                if not head.send(self.raw):
                    return False
                head.close()
                self.out.popleft()
                continue
            sent = self.raw.send(head)  # BlockingIOError: the client's window is full for now
            if sent < len(head):
                self.out[0] = head[sent:]
                return False
            self.out.popleft()
        return True

    def drop_out(self) -> None:
        """Forget what is left of the answer (sent, or the connection closes)."""
        for part in self.out:
            if isinstance(part, FilePart):
                part.close()
        self.out.clear()

    def __getattr__(self, name):  # fileno, close, shutdown, getsockname...
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
        self.held = 0  # bytes of the worker's memory budget this request's body holds
        self.answer_held = 0  # bytes of the budget its answer holds until it is sent
        self.keepalive = False  # whether the connection reads again once its answer is sent
        self.expected = 0  # the body's declared length (or the limit, chunked)
        self.chunks = 0  # Data events of the body so far
        self.newlines = 0  # header lines so far, counted before h11 parses them
        self.head_tail = b""  # the last bytes of the head read so far (its end may straddle two reads)

    @property
    def chunked(self) -> bool:
        return self.request is not None and any(name == b"transfer-encoding" for name, _ in self.request.headers)

    def reset(self, now: float, keepalive: float) -> None:
        """Between two requests of a kept-alive connection."""
        self.phase, self.deadline, self.started = "idle", now + keepalive, now
        self.http, self.request, self.body, self.answered_continue = None, None, bytearray(), False
        self.expected = self.chunks = self.newlines = 0
        self.head_tail = b""
        # What the application left unread of the body goes now, and with it gunicorn's parser, which
        # would otherwise skip that much of the next request as the rest of this one's body.
        self.sock.clear()
        self.parser = None


class EdgeError(Exception):
    """A request the edge answers itself, and then closes the connection: ``row`` names the class of
    embeddings/errors.py (the one error table) that gives its status, code and Retry-After."""

    def __init__(self, row: str, message: str):
        super().__init__(message)
        self.row, self.message = row, message

    @property
    def code(self) -> str:
        from embeddings import errors

        return getattr(errors, self.row).default_code


_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}
_REASONS |= {503: "Service Unavailable"}


def error_response(row: str, message: str, path: bytes = b"") -> bytes:
    """A whole HTTP answer in the API's error shape (OpenAI's on its paths), that closes the connection."""
    from embeddings import errors  # DRF's exceptions: imported once the application is loaded

    error = getattr(errors, row)
    status, code = error.status_code, error.default_code
    body = json.dumps(errors.error_body(None, code, message, status=status, path=path.decode("latin-1"))).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if error.retry_after:
        head += f"Retry-After: {error.retry_after}\r\n"
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


def log_refusal(exc: EdgeError, *, client, request: h11.Request | None, latency_s: float, size: int) -> None:
    """The one log line of a request the edge answered itself (the application never saw it)."""
    from embeddings import errors
    from embeddings.logs import RequestStats, log_request

    user_agent = b""
    if request is not None:
        user_agent = next((v for n, v in request.headers if n == b"user-agent"), b"")
    try:
        log_request(
            request_id="-",
            method=request.method.decode("latin-1") if request is not None else "-",
            endpoint="edge",
            status=getattr(errors, exc.row).status_code,
            latency_ms=1000 * latency_s,
            stats=RequestStats(),
            client=client[0] if isinstance(client, tuple) else str(client or ""),
            path=request.target.split(b"?")[0].decode("latin-1") if request is not None else "",  # no query: keys
            user_agent=user_agent.decode("latin-1"),
            size=size,
        )
    except Exception:  # noqa: BLE001 - a log line must never break the loop
        pass


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


FILES_BESIDE_CONNECTIONS = 256  # what a worker keeps open besides its clients: model files, logs, sockets


def raise_nofile_limit(wanted: int) -> int:
    """Room for ``wanted`` open files where the hard limit allows (a cap of 1,000 connections must not
    meet a soft limit of 1,024); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


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
        self._warned_no_files = -math.inf

    # --- setup --------------------------------------------------------------------------------------
    def init_process(self):
        # Each connection may hold a second descriptor: the file its answer is (FilePart).
        open_files = raise_nofile_limit(2 * self.worker_connections + FILES_BESIDE_CONNECTIONS)
        if open_files < 2 * self.worker_connections + FILES_BESIDE_CONNECTIONS:
            # The threads need files too (the model's, templates, the database): the cap gives way.
            self.worker_connections = max(10, (open_files - FILES_BESIDE_CONNECTIONS) // 2)
            self.log.warning(
                "Only %d open files are allowed: at most %d connections per worker", open_files, self.worker_connections
            )
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
        """Stop accepting and close what holds no request; the requests in flight finish and their
        answers are sent (the loop runs on for them) within gunicorn's graceful timeout."""
        for listener in self.sockets:
            if self._accepting:
                self.poller.unregister(listener)
            listener.close()
        self._accepting = False
        for conn in list(self.conns):
            if conn.phase not in ("busy", "writing"):
                self._close(conn)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.conns and time.monotonic() < deadline and self.is_parent_alive():
            self.notify()
            for key, _ in self.poller.select(0.5):
                key.data(key.fileobj)
            self._take_back_finished()
            self._reap()
        self.tpool.shutdown(False)
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
                now = time.monotonic()
                if now > self._warned_no_files + 60:  # once a minute: a flood must not flood the log
                    self._warned_no_files = now
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
        answer_and_close(sock, error_response("Overloaded", "The server has too many connections open; try again."))

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
        try:
            if conn.phase == "head":
                conn.newlines += _header_newlines(conn, data)  # at C speed, before h11 parses a line of them
                if conn.newlines > self.cfg.limit_request_fields + 3:  # the request line, the blank line
                    raise EdgeError("HeadersTooLarge", f"The request has over {self.cfg.limit_request_fields} headers.")
            conn.http.receive_data(data)
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
                    raise EdgeError("HeadersTooLarge", message) from None
                raise EdgeError("MalformedHttp", f"The request is not valid HTTP/1.1: {exc}.") from None
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
                # chunked: up to the limit; neither Content-Length nor Transfer-Encoding: no body at all
                conn.expected = declared if declared is not None else (self._max_body if conn.chunked else 0)
                self._hold(conn, min(conn.expected, HOLD_AHEAD_BYTES))
            elif isinstance(event, h11.Data):
                conn.body += event.data
                conn.chunks += 1
                conn.deadline = min(now + self.timeouts.body, conn.started + READ_LIMIT_S)
                counted = len(conn.body) + (conn.chunks * CHUNK_COST_BYTES if conn.chunked else 0)
                if counted > self._max_body:  # chunked, past the limit: counted as it comes
                    self._hand_over(conn, too_large=counted)
                    return
                if len(conn.body) > conn.held // memory.BODY_COST_FACTOR:  # held as it comes, a step ahead
                    self._hold(conn, min(len(conn.body) + HOLD_AHEAD_BYTES, conn.expected))
            elif isinstance(event, h11.EndOfMessage):
                conn.pending = conn.http.trailing_data[0]
                self._hand_over(conn)
                return
            else:  # ConnectionClosed, PAUSED: nothing more of this request
                self._close(conn)
                return

    def _hold(self, conn: Connection, length: int) -> None:
        """Admit a body of ``length`` bytes against the worker's memory budget, or refuse it now (503)."""
        need = memory.body_bytes(length) - conn.held
        if need <= 0:
            return
        if not memory.budget().try_reserve(need):
            raise EdgeError("Overloaded", "The server holds as many request bodies as its memory allows; try again.")
        conn.held += need

    def _release(self, conn: Connection) -> None:
        if conn.held:
            memory.budget().release(conn.held)
            conn.held = 0

    def handle(self, conn):
        """gthread's handling of one request, with what its body holds known to the request's code."""
        token = memory.edge_body_hold.set(conn.held)
        try:
            return super().handle(conn)
        finally:
            memory.edge_body_hold.reset(token)

    def handle_error(self, req, client, addr, exc):
        """What gunicorn's own parser refuses after h11 accepted it gets the edge's JSON answer, not
        gunicorn's HTML page; anything else (the application failing) is gunicorn's to answer."""
        from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine, ParseException

        if not isinstance(exc, ParseException):
            return super().handle_error(req, client, addr, exc)
        row = {LimitRequestLine: "UriTooLong", LimitRequestHeaders: "HeadersTooLarge"}.get(type(exc), "MalformedHttp")
        self.log.info("gunicorn's parser refused a request h11 accepted: %s", exc)
        self._count(EdgeError(row, "").code)
        try:
            client.sendall(error_response(row, "The request is not valid HTTP/1.1 as this server reads it."))
        except OSError:
            pass

    def _check_head(self, request: h11.Request) -> None:
        """gunicorn's own limits and rules, enforced here so its parser never refuses what h11 accepted
        (what slips past both is answered in the same JSON shape: ``handle_error``)."""
        if request.http_version not in (b"1.0", b"1.1"):
            raise EdgeError("MalformedHttp", "Only HTTP/1.0 and HTTP/1.1 are served here.")
        if not _METHOD.fullmatch(request.method):
            raise EdgeError("MalformedHttp", "The request method must be 3 to 20 upper-case letters.")
        if len(request.method) + len(request.target) + 10 > self.cfg.limit_request_line:
            raise EdgeError("UriTooLong", f"The request line is over {self.cfg.limit_request_line} bytes.")
        fields = request.headers.raw_items()
        if len(fields) + 2 > self.cfg.limit_request_fields:  # the rewrite may add Content-Length and Connection
            raise EdgeError("HeadersTooLarge", f"The request has over {self.cfg.limit_request_fields - 2} headers.")
        if any(len(n) + len(v) + 4 > self.cfg.limit_request_field_size for n, v in fields):  # ": " and CRLF
            limit = self.cfg.limit_request_field_size - 4
            raise EdgeError("HeadersTooLarge", f"A request header is over {limit} bytes.")

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
            close = _framed_two_ways(request)
            if close:
                conn.pending = b""
            head = canonical_request(request, len(conn.body) if framed else None, close=close)
            conn.sock.load(head, conn.body)
        conn.body, conn.http = bytearray(), None
        conn.phase = "busy"
        self.waiting.pop(conn, None)
        self.poller.unregister(conn.sock.raw)
        self.enqueue_req(conn)

    def _refuse(self, conn: Connection, exc: EdgeError, *, reason: str | None = None) -> None:
        """Answer the error, close, count why (``reason``, or the error's row) and log its one line."""
        self._count(reason or exc.code)
        request = conn.request
        path = request.target if request is not None else b""
        answer = error_response(exc.row, exc.message, path)
        self._close(conn, answer=answer)
        log_refusal(
            exc,
            client=conn.client,
            request=request,
            latency_s=time.monotonic() - conn.started,
            size=len(answer) - answer.index(b"\r\n\r\n") - 4,
        )

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
            self._release(conn)  # the body is gone; the answer, held next, is all it keeps
            conn.keepalive = keepalive and self.alive
            conn.answer_held = conn.sock.pending_out()
            memory.budget().reserve(conn.answer_held)
            conn.phase, conn.deadline = "writing", now + SEND_TIMEOUT_S
            try:
                self.poller.register(
                    conn.sock.raw, selectors.EVENT_WRITE, partial(self.on_client_socket_writable, conn)
                )
            except (ValueError, OSError):  # gunicorn closed it (an error after its headers were written)
                self._close(conn)
                continue
            self.on_client_socket_writable(conn, conn.sock.raw)

    def on_client_socket_writable(self, conn, client):
        """Send what the client's window takes; once the answer is out, the connection reads again."""
        try:
            done = conn.sock.flush()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)  # the client went away
            return
        if not done:
            conn.deadline = time.monotonic() + SEND_TIMEOUT_S  # it reads: it may go on
            return
        self._let_go_of_answer(conn)
        if not conn.keepalive:
            self._close(conn)
            return
        self.poller.unregister(conn.sock.raw)
        conn.reset(time.monotonic(), self.timeouts.keepalive)
        self._keep.add(conn)
        self.waiting[conn] = None
        self.poller.register(conn.sock.raw, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
        if conn.pending:  # a pipelined request already here: no readable event will announce it
            data, conn.pending = conn.pending, b""
            self._feed(conn, data)

    def _let_go_of_answer(self, conn: Connection) -> None:
        if conn.answer_held:
            memory.budget().release(conn.answer_held)
            conn.answer_held = 0
        conn.sock.drop_out()

    # --- timeouts and closing -----------------------------------------------------------------------
    def _reap(self) -> None:
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + _REAP_EVERY_S
        for conn in [c for c in self.conns if c.phase != "busy" and c.deadline <= now]:
            if conn.phase == "writing":  # a client that reads none of its answer
                self._count("send_timeout")
                self._close(conn)
            elif conn.phase == "idle":
                self._count("keepalive_timeout" if conn.initialized else "header_timeout")
                self._close(conn)
            else:
                part = "headers" if conn.phase == "head" else "body"
                error = EdgeError("RequestTimeout", f"The client took too long to send its {part}.")
                self._refuse(conn, error, reason=f"{part.rstrip('s')}_timeout")

    def _close(self, conn: Connection, *, answer: bytes | None = None) -> None:
        if conn.phase != "busy":
            try:
                self.poller.unregister(conn.sock.raw)
            except (KeyError, ValueError, OSError):
                pass
        if answer is not None:
            answer_and_close(conn.sock.raw, answer)
        self.conns.pop(conn, None)
        self.waiting.pop(conn, None)
        self._keep.discard(conn)
        self._release(conn)
        self._let_go_of_answer(conn)
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
        fs = self.tpool.submit(self.handle, conn)
        self._wrap_future(fs, conn)

    def _count(self, reason: str) -> None:
        try:
            from embeddings import metrics

            metrics.EDGE_CLOSED.labels(reason).inc()
        except Exception:  # noqa: BLE001 - counting must never break the loop
            pass


_METHOD = re.compile(rb"[A-Z]{3,20}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _header_newlines(conn: Connection, data: bytes) -> int:
    """The line ends in ``data`` that belong to the request's head, not to a body after it (the end of
    the head may straddle two reads: the last bytes of the previous one are looked at again)."""
    seen = conn.head_tail + data
    offset = len(conn.head_tail)  # already counted
    end = _HEAD_END.search(seen)
    conn.head_tail = seen[-3:]
    stop = len(seen) if end is None else max(offset, end.end())
    return seen.count(b"\n", offset, stop)


def _framed_two_ways(request: h11.Request) -> bool:
    """Content-Length and Transfer-Encoding together, or Transfer-Encoding from HTTP/1.0: RFC 9112 has
    the server close the connection after such a request (a proxy in front may have framed it otherwise)."""
    names = {name for name, _ in request.headers}
    return b"transfer-encoding" in names and (b"content-length" in names or request.http_version == b"1.0")


def _declared_length(request: h11.Request) -> int | None:
    """The body's Content-Length; None for a chunked body (h11 frames by Transfer-Encoding when both come)."""
    length = None
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length
