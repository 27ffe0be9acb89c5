"""The fault proxy itself: it forwards faithfully, and each fault it is told to inject happens."""

from __future__ import annotations

import contextlib
import http.client
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import wait_for

from tripo_watchd.sandbox.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.received.append(0)  # type: ignore[attr-defined]
        index = len(self.server.received) - 1  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.server.received[index] += len(data)  # type: ignore[attr-defined]
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[int] = []


class _Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = f"got {len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_POST = do_PUT

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    serve(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def raw(echo: _EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.server_address[1], http=False) as proxy:
        yield proxy


@pytest.fixture
def web() -> Iterator[FaultProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    server.daemon_threads = True
    serve(server)
    with FaultProxy("127.0.0.1", server.server_address[1]) as proxy:
        yield proxy
    server.shutdown()
    server.server_close()


def roundtrip(proxy: FaultProxy, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` through the proxy to the echo server and read back as much."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # a reset is what some tests expect
                sock.sendall(data)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join()
        return bytes(got)


def put(proxy: FaultProxy, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    conn = conn or http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("PUT", "/bucket/key", body=b"x" * 1000)
    response = conn.getresponse()
    return response.status, response.read()


def test_bytes_pass_through_unchanged_and_are_counted(raw):
    """Data sent through the proxy reaches the upstream and comes back byte for byte, counted."""
    data = bytes(range(256)) * 4096
    assert roundtrip(raw, data) == data
    # The proxy counts a chunk after forwarding it: the peer may see the bytes first.
    wait_for(lambda: raw.stats().bytes_up == raw.stats().bytes_down == len(data), timeout=5)
    stats = raw.stats()
    assert stats.connections == 1 and stats.bytes_up == stats.bytes_down == len(data)
    assert stats.faults_total == 0 and raw.url == f"http://127.0.0.1:{raw.port}"


def test_reset_next_resets_that_many_connections_then_forwards(raw, echo):
    """reset_next(2) resets the next two connections before any byte reaches the upstream."""
    raw.reset_next(2)
    for _ in range(2):
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            assert roundtrip(raw, b"hello" * 1000) == b"hello" * 1000
    assert roundtrip(raw, b"hello") == b"hello"
    wait_for(lambda: echo.received[-1] == 5, timeout=5)
    assert raw.stats().faults == {"reset": 2}


def test_reset_after_bytes_cuts_the_stream_at_that_byte(raw, echo):
    """reset_after_bytes(N) lets exactly N bytes through, then resets the connection."""
    raw.reset_after_bytes(10_000)
    with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
        assert roundtrip(raw, b"z" * 200_000) == b"z" * 200_000
    wait_for(lambda: echo.received == [10_000], timeout=5)
    assert roundtrip(raw, b"again") == b"again"


def test_stall_holds_data_for_the_given_time(raw):
    """stall(0.6) delays the data by about 0.6 s and then delivers all of it."""
    raw.stall(0.6)
    started = time.monotonic()
    assert roundtrip(raw, b"late") == b"late"
    assert 0.55 <= time.monotonic() - started < 2.0


def test_stall_of_next_exchange_outlasts_a_client_timeout(raw):
    """stall(seconds, n=1) holds only the next connection: a short client timeout fires once."""
    raw.stall(1.0, n=1)
    with pytest.raises(TimeoutError):
        roundtrip(raw, b"held", timeout=0.3)
    assert roundtrip(raw, b"free", timeout=0.5) == b"free"


def test_throttle_limits_throughput_within_15_percent(raw):
    """throttle(200 kB/s) makes a 300 kB round trip take 1.5 s, within 15 %."""
    raw.throttle(200_000)
    data = b"t" * 300_000
    started = time.monotonic()
    assert roundtrip(raw, data) == data
    elapsed = time.monotonic() - started
    assert 1.5 * 0.85 <= elapsed <= 1.5 * 1.15, elapsed
    raw.throttle(None)
    started = time.monotonic()
    assert roundtrip(raw, data) == data
    assert time.monotonic() - started < 0.5


def test_refuse_makes_connections_fail_until_turned_off(raw):
    """refuse() makes connects fail with 'connection refused'; refuse(False) serves again."""
    port = raw.port
    raw.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    raw.refuse(False)
    assert raw.port == port and roundtrip(raw, b"back") == b"back"


def test_slowdown_answers_canned_s3_503_then_forwards(web):
    """slowdown_next(2) answers two requests with S3's 503 SlowDown XML; the third gets through."""
    web.slowdown_next(2)
    for _ in range(2):
        status, body = put(web)
        assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert put(web) == (200, b"got 1000")
    assert web.stats().requests == 3 and web.stats().faults == {"http_503": 2}


def test_http_faults_reach_requests_on_a_kept_alive_connection(web):
    """In HTTP mode a reset applies per request, even on a connection already in use."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    assert put(web, conn) == (200, b"got 1000")
    web.reset_next(1)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        put(web, conn)
    conn.close()
    web.respond_next(1, 403, "AccessDenied", "Access Denied", match="/other")
    assert put(web) == (200, b"got 1000")  # does not match
    assert web.stats().connections == 2 and web.stats().requests == 3


def test_random_faults_are_reproducible_by_seed(web):
    """The same seed and rate give the same sequence of faulted and clean requests."""

    def run() -> list[int]:
        web.set_random_faults(0.5, seed=7, kinds=("slowdown",))
        return [put(web)[0] for _ in range(12)]

    first, second = run(), run()
    assert first == second and 503 in first and 200 in first
    web.clear()
    assert put(web)[0] == 200
