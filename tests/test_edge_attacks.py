"""Attacks on the edge (clipsite/workers.py) that succeed on the real server: each test documents one and
fails while the edge is open to it.

- a body declared but never sent holds the worker's memory budget: one socket refuses every other body;
- clients that pipeline requests and never read the answers hold the request threads for the send timeout;
- a chunked body of 1-byte chunks, and headers of thousands of tiny fields, cost the event loop (the
  worker's only reader, sharing the GIL with the request threads) about a CPU-second per wire megabyte;
- requests h11 accepts but gunicorn's parser refuses get gunicorn's HTML pages, not the edge's JSON;
- a request with both Content-Length and Transfer-Encoding (or Transfer-Encoding in HTTP/1.0) leaves
  the connection open for the next request (RFC 9112 6.1 and 6.3: the server MUST close it);
- under an open-file limit below the connection cap, idle sockets take every descriptor and the request
  threads fail to open files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.server import START, Server, raw_http, server_env, serving
from tests.test_edge import ordinary

pytestmark = pytest.mark.server
MAX_REQUEST = 16 << 20
ENV = {
    "WEB_CONCURRENCY": "1",
    "WEB_THREADS": "2",
    "WEB_KEEPALIVE": "2",
    "CLIP_MAX_REQUEST_BYTES": str(MAX_REQUEST),
    "CLIP_WORKER_MEMORY_MB": "64",  # 4 x the request limit: one body at the limit fits, the minimum allowed
}


@pytest.fixture(scope="module")
def edge(tmp_path_factory, tiny_model_dir):
    with serving(tmp_path_factory.mktemp("attacks"), tiny_model_dir, **ENV) as srv:
        yield srv


def read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def worker_pid(srv) -> int:
    """The one worker: the gunicorn master's child (start.sh execs gunicorn, so the master is proc.pid)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == srv.proc.pid:
                    return int(entry.name)
    raise RuntimeError("no worker")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the memory budget ---------------------------------------------------------------------------------
def test_a_declared_but_unsent_body_does_not_hold_the_workers_memory_budget(edge):
    # workers.py _advance -> _hold(conn, declared): 4 x the declared length is reserved from the headers,
    # before a byte of the body, for as long as the body may take (body timeout, READ_LIMIT_S with a
    # byte now and then). With the defaults (100 MB limit, 512 MB budget) two such sockets refuse
    # every body the worker is sent, for 300 s at a time.
    hog = socket.create_connection(("127.0.0.1", edge.port))
    try:
        hog.sendall(
            b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n" % MAX_REQUEST
        )
        time.sleep(0.5)
        assert ordinary(edge.port) == 200  # 503 overloaded: the budget is the hog's
    finally:
        hog.close()


# --- parser differentials --------------------------------------------------------------------------------
GUNICORN_REFUSES = {
    "lowercase-method": b"get /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "http-2.0": b"GET /healthz HTTP/2.0\r\nHost: x\r\nConnection: close\r\n\r\n",
    "bad-ipv6-target": b"GET http://[x/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    # n + v + 2 = 8190 passes the edge's check; gunicorn counts the line's CRLF too
    "header-of-8190-bytes": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8185 + b"\r\n\r\n",
    # 100 headers pass the edge; the canonical request adds Content-Length, the 101st
    "100-headers-then-content-length": b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(99))
    + b"\r\n",
}


@pytest.mark.parametrize("request_bytes", GUNICORN_REFUSES.values(), ids=GUNICORN_REFUSES.keys())
def test_requests_h11_accepts_but_gunicorn_refuses_get_the_edges_json_answer(edge, request_bytes):
    # workers.py _check_head enforces gunicorn's limits only in part: gunicorn's method (uppercase, 3 to
    # 20 characters), version (1.x) and target (urlsplit) rules are not checked, the field size is off
    # by the CRLF, and the header the canonical request adds is not counted. gunicorn answers its own
    # text/html page and logs "Invalid request".
    status, headers, _ = raw_http(edge.port, request_bytes, timeout=15)
    assert headers.get("content-type") == "application/json", (status, headers)


# --- framing ---------------------------------------------------------------------------------------------
BOTH_FRAMINGS = {
    "content-length-and-chunked": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked-in-http-1.0": b"GET /healthz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", BOTH_FRAMINGS.values(), ids=BOTH_FRAMINGS.keys())
def test_a_request_framed_two_ways_closes_the_connection(edge, request_bytes):
    # RFC 9112 6.1 / 6.3: a server MUST close the connection after a request with both Content-Length and
    # Transfer-Encoding, and after an HTTP/1.0 request with Transfer-Encoding (a smuggling attempt through
    # a proxy that frames by Content-Length). workers.py canonical_request drops both headers and the
    # connection stays open for what follows (stock gunicorn 23 refuses CL + TE outright).
    follower = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(request_bytes + follower)
        answer = read_all(sock, timeout=15)
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", answer)) <= 1  # the follower is never answered


# --- CPU -------------------------------------------------------------------------------------------------
def test_a_chunked_body_of_one_byte_chunks_does_not_cost_the_event_loop_seconds(edge):
    # workers.py _advance handles every h11 Data event in Python: 1-byte chunks ("1\r\na\r\n") cost about
    # a CPU-second of the event loop per wire megabyte (16 KiB chunks: 500 MB per CPU-second). Under the
    # default 100 MB limit one request may be 600 MB of them; 4 such clients took an ordinary request
    # from 0.01 s to 2.5 s. 8 MB on the wire here (1.3 MB decoded, well inside the limit).
    pid = worker_pid(edge)
    before = cpu_seconds(pid)
    chunks = b"1\r\na\r\n" * 10_000
    deadline = time.monotonic() + 30
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(b"POST /syte_test/nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(8_000_000 // len(chunks)):
                if time.monotonic() > deadline:
                    break
                sock.sendall(chunks)
        time.sleep(0.5)  # what was sent is read before the close
    spent = cpu_seconds(pid) - before
    assert spent < 1.0, f"the worker spent {spent:.1f} CPU-seconds on 8 MB of 1-byte chunks"


def test_thousands_of_tiny_headers_are_refused_before_they_cost_the_event_loop(edge):
    # workers.py _advance -> _check_head counts the fields only after h11 has parsed all of them: 12,000
    # "a:b" lines (60 KB, under the 64 KiB MAX_HEADER_BYTES) cost ~95 ms of the event loop each before
    # the 431, about 0.6 MB of headers per CPU-second.
    pid = worker_pid(edge)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"a:b\r\n" * 12_000 + b"\r\n"
    before = cpu_seconds(pid)
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", edge.port)) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(head)
            assert read_all(sock, timeout=15).startswith(b"HTTP/1.1 431 ")
    spent = cpu_seconds(pid) - before
    assert spent < 0.5, f"the worker spent {spent:.1f} CPU-seconds refusing 50 requests of tiny headers"


# --- threads ---------------------------------------------------------------------------------------------
def test_clients_that_never_read_their_answers_do_not_hold_the_threads(tmp_path, tiny_model_dir):
    # The event loop keeps handing pipelined requests to threads however many answers are unread, and a
    # thread writes its answer with a blocking sendall (BufferedSocket.sendall, SEND_TIMEOUT_S = 30 s):
    # once the socket buffers are full, as many non-reading clients as there are threads stop the worker
    # for 30 s, and again each time they reconnect (80 KB of requests each).
    with serving(tmp_path, tiny_model_dir, **ENV) as srv:
        silent = []
        try:
            for _ in range(2):  # the worker's threads
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", srv.port))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)  # 7 kB answers, never read
                silent.append(sock)
            time.sleep(2)
            started = time.monotonic()
            assert ordinary(srv.port, timeout=60) == 200
            waited = time.monotonic() - started
            assert waited < 5, f"an ordinary request waited {waited:.1f} s for a thread"
        finally:
            for sock in silent:
                sock.close()


# --- open files ------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_a_low_open_file_limit_leaves_room_for_the_request_threads(tmp_path, tiny_model_dir):
    # raise_nofile_limit can raise the soft limit only to the hard one: under a hard limit below
    # worker_connections + 256 the cap is never reached, idle sockets take the last descriptors (EMFILE
    # evicts only when accept itself fails), and the request threads' own opens fail (Django's lazy
    # imports and templates, the database): the ordinary request is answered with nothing.
    env = server_env(tmp_path, tiny_model_dir, **ENV)
    srv = Server(env, tmp_path / "server.log", command=["prlimit", "--nofile=120:120", *START])
    idle = []
    try:
        srv.wait_ready()
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", srv.port)))
        time.sleep(0.5)
        try:
            status = ordinary(srv.port, timeout=15)
        except (OSError, IndexError) as exc:  # IndexError: raw_http found no status line
            status = repr(exc)
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
        srv.stop()
