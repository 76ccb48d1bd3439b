"""The server's edge against hostile and broken connections (clipsite/workers.py), on the real server:
idle sockets past the connection cap, requests framed in the header orders real clients use, headers
that never end, chunked floods, pipelining, Expect: 100-continue, and the timeouts."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time

import pytest

from clipsite.workers import BufferedSocket, canonical_request
from tests.conftest import multipart_body
from tests.server import raw_http, serving

pytestmark = pytest.mark.server
MAX_REQUEST = 200_000


def text_body(text: str = "a photo of a cat") -> tuple[bytes, str]:
    return multipart_body([("t", text, None)])


def ordinary(port: int, timeout: float = 30) -> int:
    body, content_type = text_body()
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\nConnection: close\r\n\r\n"
    )
    return raw_http(port, head.encode() + body, timeout=timeout)[0]


def read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (with or without a last answer) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def edge(tmp_path_factory, tiny_model_dir):
    """One worker of 2 threads, with short timeouts: the edge alone decides who is served."""
    tmp = tmp_path_factory.mktemp("edge")
    env = {
        "WEB_CONCURRENCY": "1",
        "WEB_THREADS": "2",
        "WEB_HEADER_TIMEOUT": "2",
        "WEB_BODY_TIMEOUT": "2",
        "WEB_KEEPALIVE": "1",
        "CLIP_MAX_REQUEST_BYTES": str(MAX_REQUEST),
    }
    with serving(tmp, tiny_model_dir, **env) as srv:
        yield srv


# Header orders of real clients: Content-Length is last for none of them but the hand-written test.
CLIENT_ORDERS = {
    "curl": ["Host", "User-Agent", "Accept", "Content-Length", "Content-Type"],
    "python-requests": [
        "Host",
        "User-Agent",
        "Accept-Encoding",
        "Accept",
        "Connection",
        "Content-Length",
        "Content-Type",
    ],
    "httpx": ["Host", "Accept", "Accept-Encoding", "Connection", "User-Agent", "Content-Length", "Content-Type"],
    "nginx-proxy": ["Host", "X-Forwarded-For", "Connection", "Content-Length", "Content-Type", "User-Agent"],
}


def head_in_order(order: list[str], length: int, content_type: str) -> bytes:
    values = {
        "Host": "127.0.0.1",
        "User-Agent": "client/1.0",
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate",
        "Connection": "keep-alive",
        "X-Forwarded-For": "198.51.100.7",
        "Content-Length": str(length),
        "Content-Type": content_type,
    }
    lines = [f"{name}: {values[name]}" for name in order]
    return ("POST /syte_test/embeddings HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("client", sorted(CLIENT_ORDERS))
def test_stalled_bodies_in_real_clients_header_orders_hold_no_thread(edge, client):
    body, content_type = text_body()
    request = head_in_order(CLIENT_ORDERS[client], len(body), content_type) + body
    stalled = []
    try:
        for _ in range(8):  # 4 times the threads: each would hold one if a thread read the body
            sock = socket.create_connection(("127.0.0.1", edge.port))
            sock.sendall(request[: len(request) - len(body) // 2])  # the headers, half the body, then nothing
            stalled.append(sock)
        assert ordinary(edge.port, timeout=15) == 200
        for sock in stalled:  # and those that finish are answered
            sock.sendall(request[len(request) - len(body) // 2 :])
        for sock in stalled[:2]:
            sock.settimeout(15)
            assert sock.recv(12) == b"HTTP/1.1 200"
    finally:
        for sock in stalled:
            sock.close()


def test_headers_that_never_end_get_431_and_the_connection_closes(edge):
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(b"GET /syte_test/embeddings HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(80):  # 80 KiB of one header, and never its end
                sock.sendall(b"X-Filler: " + b"a" * 1012 + b"\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
    assert ordinary(edge.port) == 200


def test_a_header_over_gunicorns_field_limit_gets_431_in_json(edge):
    status, headers, body = raw_http(
        edge.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
    )
    assert status == 431 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "headers_too_large"


def test_malformed_http_gets_400_in_json(edge):
    status, _, body = raw_http(edge.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "malformed_http"


def test_a_chunked_body_is_answered_like_the_same_body_with_a_length(edge):
    body, content_type = text_body("a chunked cat")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
    head = (
        "POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: {content_type}\r\nConnection: close\r\n\r\n"
    )
    status, _, chunked = raw_http(edge.port, head.encode() + chunks + b"0\r\n\r\n")
    plain_head = head.replace("Transfer-Encoding: chunked", f"Content-Length: {len(body)}")
    status_plain, _, plain = raw_http(edge.port, plain_head.encode() + body)
    assert status == status_plain == 200
    a, b = (json.loads(x)["vectors"]["t"] for x in (chunked, plain))
    assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.9999


def test_a_chunked_flood_is_refused_413_once_it_passes_the_limit(edge):
    body, content_type = text_body()
    head = (
        "POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (16384, b"z" * 16384)
    sent = 0
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(64 * MAX_REQUEST // 16384):  # 64 times the limit, unless the server stops it
                sock.sendall(chunk)
                sent += 16384
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    assert sent < 32 * MAX_REQUEST  # refused as it passed the limit, not after reading it all


def test_pipelined_requests_are_each_answered_in_order(edge):
    body, content_type = text_body()
    first = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\nrequest_id: first\r\n\r\n"
    ).encode() + body
    second = b"GET /syte_test/nope HTTP/1.1\r\nHost: x\r\n\r\n"
    third = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(first + second + third)  # one packet
        answer = read_all(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)  # each answer's body runs into the next status line
    assert statuses == [b"200", b"404", b"200"]


def test_expect_100_continue_is_answered_within_the_limit_and_refused_over_it(edge):
    body, content_type = text_body()
    head = (
        f"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(head.encode())
        sock.settimeout(15)
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")
    over = head.replace(f"Content-Length: {len(body)}", f"Content-Length: {MAX_REQUEST + 1}")
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(over.encode())
        assert read_all(sock).startswith(b"HTTP/1.1 413 ")  # no 100: the body is never asked for


def test_silent_and_slow_connections_are_closed_by_the_header_body_and_keepalive_timeouts(edge):
    silent = socket.create_connection(("127.0.0.1", edge.port))
    partial_head = socket.create_connection(("127.0.0.1", edge.port))
    partial_head.sendall(b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\n")
    partial_body = socket.create_connection(("127.0.0.1", edge.port))
    partial_body.sendall(b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    kept = socket.create_connection(("127.0.0.1", edge.port))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    kept.settimeout(15)
    assert kept.recv(12) == b"HTTP/1.1 200"
    try:
        # 2 s header and body timeouts, 1 s keep-alive: 30 s is room for a slow machine, not a wait
        for sock in (silent, partial_head, partial_body, kept):
            assert closed_by_server(sock, within=30)
        assert ordinary(edge.port) == 200
    finally:
        for sock in (silent, partial_head, partial_body, kept):
            sock.close()


def test_1200_idle_sockets_neither_stop_nor_outlive_ordinary_requests(tmp_path, tiny_model_dir):
    # One worker with gunicorn's cap of 1,000: upstream gthread stops polling there for good.
    env = {"WEB_CONCURRENCY": "1", "WEB_THREADS": "2", "WEB_HEADER_TIMEOUT": "120", "WEB_MAX_CONNECTIONS": "1000"}
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        idle = []
        try:
            for _ in range(1200):
                idle.append(socket.create_connection(("127.0.0.1", srv.port)))
            for _ in range(3):  # while they are open: the oldest idle ones make room
                assert ordinary(srv.port, timeout=20) == 200
        finally:
            for sock in idle:
                sock.close()
        for _ in range(3):  # and after they close
            assert ordinary(srv.port, timeout=20) == 200
        metrics = raw_http(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[2].decode()
        evicted = [
            line
            for line in metrics.splitlines()
            if line.startswith('clipsite_connections_closed_total{reason="evicted"}')
        ]
        assert evicted and float(evicted[0].split()[-1]) >= 1


def test_at_the_cap_with_every_connection_mid_request_a_new_one_gets_503(tmp_path, tiny_model_dir):
    env = {"WEB_CONCURRENCY": "1", "WEB_THREADS": "2", "WEB_MAX_CONNECTIONS": "10", "WEB_BODY_TIMEOUT": "60"}
    with serving(tmp_path, tiny_model_dir, **env) as srv:
        busy = []
        try:
            for _ in range(10):  # each waits for its body, the server's 100 Continue says so
                sock = socket.create_connection(("127.0.0.1", srv.port))
                sock.sendall(b"POST /syte_test/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
                sock.sendall(b"Expect: 100-continue\r\n\r\n")
                sock.settimeout(15)
                assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
                busy.append(sock)
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
        finally:
            for sock in busy:
                sock.close()
        assert served_once_they_leave(srv.port)


def served_once_they_leave(port: int, within: float = 30) -> bool:
    """Whether an ordinary request is answered 200 once the server has seen the others close (it may
    still answer 503 for the moment it takes to notice)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(ConnectionResetError):
            if ordinary(port) == 200:
                return True
    return False


# --- the pieces, without a server ----------------------------------------------------------------
def test_the_canonical_request_frames_the_body_by_length_alone():
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
        b"request_id: r1\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    request = conn.next_event()
    head = canonical_request(request, 3, close=False)
    assert head == b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nrequest_id: r1\r\nContent-Length: 3\r\n\r\n"
    assert canonical_request(request, 9, close=True).endswith(b"Content-Length: 9\r\nConnection: close\r\n\r\n")


def test_a_threads_socket_reads_only_what_the_loop_assembled():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"bytes the thread must never read")
        buffered = BufferedSocket(left)
        buffered.load(b"head", bytearray(b"body"))
        assert buffered.recv(3) == b"hea" and buffered.recv(100) == b"d" and buffered.recv(100) == b"body"
        assert buffered.recv(100) == b""  # the end of this request, not a read of the socket


def test_a_body_the_application_left_unread_does_not_spill_into_the_next_request(edge):
    body, content_type = text_body()
    unread = (
        f"POST /syte_test/nope HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode() + body  # refused (403, no CSRF token) before anything reads its body
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.settimeout(15)
        sock.sendall(unread)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ") and b"keep-alive" in head.lower()
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # the same connection
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_only_the_heads_line_ends_are_counted_against_the_header_limit():
    from clipsite.workers import _header_newlines

    class Conn:
        head_tail = b""

    conn = Conn()  # head and body in one read: the body's newlines are not header lines
    assert _header_newlines(conn, b"POST / HTTP/1.1\r\nA: b\r\n\r\n\n\n\nbody\n") == 3
    conn = Conn()  # the head's end straddling two reads
    assert _header_newlines(conn, b"POST / HTTP/1.1\r\nA: b\r\n\r") == 2
    assert _header_newlines(conn, b"\n\n\n\nbody") == 1
