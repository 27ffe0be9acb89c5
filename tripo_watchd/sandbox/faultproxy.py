"""A fault-injecting TCP proxy on 127.0.0.1: resets, stalls, throttling, refusal, S3 errors."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tripo_watchd.sandbox.service import Service

__all__ = ["FAULT_KINDS", "FaultProxy", "ProxyStats", "s3_error_response"]

# What random mode may pick per exchange (a connection, or in HTTP mode a request).
FAULT_KINDS = ("reset", "reset_mid", "slowdown", "stall")
_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024


def s3_error_response(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 S3 error answer (XML body) that closes the connection."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 500: "Internal Server Error"}.get(
        status, "Service Unavailable"
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: faultproxy\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start: connections, HTTP requests, bytes each way, faults applied by kind."""

    connections: int
    requests: int
    bytes_up: int  # client → upstream
    bytes_down: int  # upstream → client
    faults: dict[str, int] = field(default_factory=dict)

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


@dataclass
class _Respond:
    remaining: int
    status: int
    code: str
    message: str
    match: str | None


@dataclass
class _Plan:
    """What happens to one exchange: reset at once, after N bytes, a canned answer, a hold."""

    reset_after: int | None = None  # bytes of the request forwarded before the RST
    respond: bytes | None = None
    hold: float = 0.0
    kind: str = ""


class _Conn:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self.send_lock = threading.Lock()

    def close(self, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        # A reset hits the client (RST); the upstream sees an orderly end after what it got.
        with contextlib.suppress(OSError):
            if reset:
                linger = struct.pack("ii", 1, 0)
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            else:
                self.client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.client.close()
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_WR if reset else socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.upstream.close()
        self.proxy._forget(self)


class FaultProxy(Service):
    """Forwards 127.0.0.1:`port` to `upstream`, misbehaving on demand; every control is live.

    A fault applies per exchange: a connection, or with `http=True` each HTTP/1.1 request
    (framed by Content-Length), so faults reach requests on kept-alive connections too.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        http: bool = True,
        port: int = 0,
        scheme: str = "http",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.http = http
        self.scheme = scheme
        self._port = port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._running = threading.Event()
        self._conns: set[_Conn] = set()
        # controls
        self._reset_next = 0
        self._reset_after: list[tuple[int, int]] = []  # [remaining, bytes]
        self._respond: list[_Respond] = []
        self._stall_until = 0.0
        self._stall_next: list[tuple[int, float]] = []  # [remaining, seconds]
        self._rate = 0.0
        self._refusing = False
        self._random: tuple[float, random.Random, tuple[str, ...], float] | None = None
        # counters
        self._connections = 0
        self._requests = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._faults: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._port}"

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and forward from background threads."""
        if self._running.is_set():
            return self
        self._running.set()
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        self._running.clear()
        self._unlisten()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        sock.listen(128)
        self._port = sock.getsockname()[1]
        self._listener = sock
        thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True)
        thread.name = f"faultproxy-{self._port}"
        self._accept_thread = thread
        thread.start()

    def _unlisten(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        thread, self._accept_thread = self._accept_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # -- controls --------------------------------------------------------------------------

    def reset_next(self, n: int = 1) -> None:
        """RST the next `n` exchanges as soon as they start (nothing reaches the upstream)."""
        with self._lock:
            self._reset_next += n

    def reset_after_bytes(self, nbytes: int, n: int = 1) -> None:
        """For the next `n` exchanges, forward `nbytes` of the request, then RST both sides."""
        with self._lock:
            self._reset_after.append((n, nbytes))

    def respond_next(
        self,
        n: int,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
        match: str | None = None,
    ) -> None:
        """Answer the next `n` requests (request line containing `match`) with an S3 error."""
        with self._lock:
            self._respond.append(_Respond(n, status, code, message, match))

    def slowdown_next(self, n: int = 1) -> None:
        """Answer the next `n` HTTP requests with S3's 503 SlowDown."""
        self.respond_next(n, 503, "SlowDown", "Please reduce your request rate.")

    def stall(self, seconds: float, n: int | None = None) -> None:
        """Hold all data for `seconds` from now; with `n`, hold each of the next `n` exchanges."""
        with self._lock:
            if n is None:
                self._stall_until = time.monotonic() + seconds
            else:
                self._stall_next.append((n, seconds))

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each direction of each connection to `bytes_per_second` (None or 0: no limit)."""
        with self._lock:
            self._rate = float(bytes_per_second or 0.0)

    def refuse(self, on: bool = True) -> None:
        """Stop listening (connections are refused) or, with `on=False`, listen again."""
        with self._lock:
            if on == self._refusing:
                return
            self._refusing = on
        if on:
            self._unlisten()
        elif self._running.is_set():
            self._listen()

    def set_random_faults(
        self,
        rate: float,
        seed: int,
        kinds: Sequence[str] = ("reset", "reset_mid", "slowdown"),
        stall_seconds: float = 1.0,
    ) -> None:
        """Give each exchange a fault from `kinds` with probability `rate`, seeded by `seed`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
        with self._lock:
            self._random = (rate, random.Random(seed), tuple(kinds), stall_seconds)

    def clear(self) -> None:
        """Drop every queued and random fault, the stall and the throttle; listen again."""
        with self._lock:
            self._reset_next = 0
            self._reset_after.clear()
            self._respond.clear()
            self._stall_until = 0.0
            self._stall_next.clear()
            self._rate = 0.0
            self._random = None
        self.refuse(False)

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return ProxyStats(
                self._connections,
                self._requests,
                self._bytes_up,
                self._bytes_down,
                dict(self._faults),
            )

    # -- machinery -------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _count(self, kind: str) -> None:
        self._faults[kind] = self._faults.get(kind, 0) + 1

    def _plan(self, request_line: bytes) -> _Plan:
        """Decide (and count) the fault for one exchange; called with the request line, if any."""
        with self._lock:
            if self.http:
                self._requests += 1
            if self._reset_next > 0:
                self._reset_next -= 1
                self._count("reset")
                return _Plan(reset_after=0, kind="reset")
            if self._reset_after:
                remaining, nbytes = self._reset_after[0]
                if remaining <= 1:
                    self._reset_after.pop(0)
                else:
                    self._reset_after[0] = (remaining - 1, nbytes)
                self._count("reset_mid")
                return _Plan(reset_after=nbytes, kind="reset_mid")
            if self.http:
                line = request_line.decode("latin-1")
                for item in self._respond:
                    if item.match is None or item.match in line:
                        item.remaining -= 1
                        if item.remaining <= 0:
                            self._respond.remove(item)
                        self._count(f"http_{item.status}")
                        answer = s3_error_response(item.status, item.code, item.message)
                        return _Plan(respond=answer, kind=f"http_{item.status}")
            if self._stall_next:
                remaining, seconds = self._stall_next[0]
                if remaining <= 1:
                    self._stall_next.pop(0)
                else:
                    self._stall_next[0] = (remaining - 1, seconds)
                self._count("stall")
                return _Plan(hold=seconds, kind="stall")
            if self._random is not None:
                rate, rng, kinds, stall_seconds = self._random
                if rng.random() < rate:
                    kind = rng.choice(kinds)
                    if kind == "slowdown" and not self.http:
                        kind = "reset"
                    self._count(kind)
                    if kind == "reset":
                        return _Plan(reset_after=0, kind=kind)
                    if kind == "reset_mid":
                        return _Plan(reset_after=rng.randint(1, 4096), kind=kind)
                    if kind == "stall":
                        return _Plan(hold=stall_seconds, kind=kind)
                    answer = s3_error_response(503, "SlowDown", "Please reduce your request rate.")
                    return _Plan(respond=answer, kind="http_503")
        return _Plan()

    def _hold(self, conn: _Conn, extra_until: float = 0.0) -> bool:
        """Wait out a global or per-exchange stall; False if the connection closed meanwhile."""
        while not conn.closed.is_set():
            with self._lock:
                until = max(self._stall_until, extra_until)
            left = until - time.monotonic()
            if left <= 0:
                return True
            conn.closed.wait(min(left, 0.05))
        return False

    def _send(self, conn: _Conn, sock: socket.socket, data: bytes, up: bool) -> None:
        """Send `data` at the throttled rate, counting bytes; OSError when the peer is gone."""
        view = memoryview(data)
        while view:
            with self._lock:
                rate = self._rate
            piece = view if rate <= 0 else view[: max(1, int(rate / 50))]
            started = time.monotonic()
            with conn.send_lock if not up else contextlib.nullcontext():
                sock.sendall(piece)
            with self._lock:
                if up:
                    self._bytes_up += len(piece)
                else:
                    self._bytes_down += len(piece)
            view = view[len(piece) :]
            if rate > 0:
                due = started + len(piece) / rate
                if conn.closed.wait(max(0.0, due - time.monotonic())):
                    raise OSError("connection closed")

    def _serve(self, conn: _Conn) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            conn.close(reset=True)
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream = upstream
        if conn.closed.is_set():  # stopped meanwhile
            with contextlib.suppress(OSError):
                upstream.close()
            return
        threading.Thread(target=self._pump_down, args=(conn,), daemon=True).start()
        try:
            if self.http:
                self._pump_http_up(conn)
            else:
                self._pump_raw_up(conn)
        except OSError:
            conn.close()

    def _pump_down(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        try:
            while True:
                data = conn.upstream.recv(_CHUNK)
                if not data:
                    break
                if not self._hold(conn):
                    return
                self._send(conn, conn.client, data, up=False)
        except OSError:
            pass
        conn.close()

    def _pump_raw_up(self, conn: _Conn) -> None:
        """Raw TCP: the whole connection is one exchange."""
        assert conn.upstream is not None
        plan = self._plan(b"")
        if plan.reset_after == 0:
            conn.close(reset=True)
            return
        hold_until = time.monotonic() + plan.hold
        budget = plan.reset_after
        while True:
            data = conn.client.recv(_CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    conn.upstream.shutdown(socket.SHUT_WR)
                return
            if not self._hold(conn, hold_until):
                return
            if budget is not None:
                if len(data) >= budget:
                    self._send(conn, conn.upstream, data[:budget], up=True)
                    conn.close(reset=True)
                    return
                budget -= len(data)
            self._send(conn, conn.upstream, data, up=True)

    def _pump_http_up(self, conn: _Conn) -> None:
        """HTTP/1.1: each request (head + Content-Length body) is one exchange."""
        assert conn.upstream is not None
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.client.recv(_CHUNK)
                if not data:
                    if buffer:
                        self._send(conn, conn.upstream, buffer, up=True)
                    with contextlib.suppress(OSError):
                        conn.upstream.shutdown(socket.SHUT_WR)
                    return
                buffer += data
                if len(buffer) > _MAX_HEAD:  # not HTTP as we know it: pass the rest through
                    self._send(conn, conn.upstream, buffer, up=True)
                    self._copy_rest(conn)
                    return
            end = buffer.index(b"\r\n\r\n") + 4
            head, buffer = buffer[:end], buffer[end:]
            length, chunked, expect = _framing(head)
            plan = self._plan(head.split(b"\r\n", 1)[0])
            if plan.reset_after == 0:
                conn.close(reset=True)
                return
            if plan.respond is not None:
                if not expect:  # drain the body the client is sending, then answer
                    buffer = self._discard(conn, buffer, length)
                with conn.send_lock:
                    conn.client.sendall(plan.respond)
                conn.close()
                return
            if not self._hold(conn, time.monotonic() + plan.hold):
                return
            budget = plan.reset_after
            if chunked:  # framing we do not follow: forward the rest of the connection raw
                self._send(conn, conn.upstream, head + buffer, up=True)
                self._copy_rest(conn)
                return
            left = length
            pending = head + buffer[:left]
            buffer = buffer[left:]
            left -= len(pending) - len(head)
            while True:
                if budget is not None and len(pending) >= budget:
                    self._send(conn, conn.upstream, pending[:budget], up=True)
                    conn.close(reset=True)
                    return
                if budget is not None:
                    budget -= len(pending)
                if not self._hold(conn):
                    return
                self._send(conn, conn.upstream, pending, up=True)
                if left <= 0:
                    break
                pending = conn.client.recv(min(_CHUNK, left))
                if not pending:
                    conn.close()
                    return
                left -= len(pending)

    def _discard(self, conn: _Conn, buffer: bytes, length: int) -> bytes:
        take = min(length, len(buffer))
        left, buffer = length - take, buffer[take:]
        while left > 0:
            data = conn.client.recv(min(_CHUNK, left))
            if not data:
                break
            left -= len(data)
        return buffer

    def _copy_rest(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        while True:
            data = conn.client.recv(_CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    conn.upstream.shutdown(socket.SHUT_WR)
                return
            if not self._hold(conn):
                return
            self._send(conn, conn.upstream, data, up=True)


def _framing(head: bytes) -> tuple[int, bool, bool]:
    """(Content-Length, chunked?, Expect: 100-continue?) of one request head."""
    length, chunked, expect = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"expect" and value == b"100-continue":
            expect = True
    return length, chunked, expect
