"""A Tripo API emulator over real HTTP: STS tokens, v3 presign, balance, and faults on demand."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import socket
import ssl
import string
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tripo_watchd.sandbox.s3server import LocalS3
from tripo_watchd.sandbox.service import Service

FORMATS = ("webp", "jpeg", "png", "glb", "obj", "fbx", "stl")
TOKEN_PATH = "/v2/openapi/upload/sts/token"
V2_BALANCE_PATH = "/v2/openapi/user/balance"
PRESIGN_PATH = "/v3/files/presign"
V3_BALANCE_PATH = "/v3/account/balance"
FAULTS_PATH = "/_emulator/faults"
UPLOAD_PREFIX = "/_s3/"
FAULT_KINDS = (
    "status",
    "delay",
    "malformed",
    "bad_shape",
    "code_in_200",
    "reset",
    "expired_credentials",
)
# Chaos runs skip `delay` by default: it only slows a run down unless timeouts are short.
DEFAULT_RANDOM_KINDS = tuple(k for k in FAULT_KINDS if k != "delay")


@dataclass(frozen=True)
class Fault:
    """One misbehaviour applied to the next `count` requests whose path contains `endpoint`.

    kind: status (HTTP `status`, body `code`, optional Retry-After `retry_after`),
    delay (answer normally after `seconds`), malformed (200, not JSON), bad_shape
    (200, code 0, `data` lacks fields), code_in_200 (200, body `code`), reset (close the
    socket without an answer), expired_credentials (a normal-looking answer S3 refuses).
    """

    kind: str
    count: int = 1
    endpoint: str = TOKEN_PATH
    status: int = 500
    code: int = 1000
    retry_after: str | None = None
    seconds: float = 0.0
    message: str = "injected fault"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; allowed: {FAULT_KINDS}")
        if self.count < 1:
            raise ValueError("fault count must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator answered (status 0: the socket was reset without an answer)."""

    monotonic_time: float
    wall_time: float
    method: str
    path: str
    format: str | None
    status: int
    code: int | None
    trace_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IssuedToken:
    """An STS token the emulator handed out; `valid` is False for expired_credentials fakes."""

    api_key: str
    format: str
    bucket: str
    key: str
    sts_ak: str
    trace_id: str
    valid: bool
    sts_sk: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)


_Route = Callable[[str, bytes, "Fault | None", str], "tuple[_Reply, str]"]


@dataclass
class _Queued:
    fault: Fault
    remaining: int


@dataclass(frozen=True)
class _Presigned:
    signature: str
    deadline: float  # time.monotonic()


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    code: int | None
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False


def _json_reply(
    status: int, payload: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> _Reply:
    code = payload.get("code")
    return _Reply(
        status,
        json.dumps(payload).encode(),
        code if isinstance(code, int) else None,
        headers=headers,
    )


def _s3_error(status: int, code: str, message: str) -> _Reply:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    return _Reply(status, body, None, content_type="application/xml")


def _fake_key(prefix: str, length: int, alphabet: str) -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


class TripoEmulator(Service):
    """The Tripo API on 127.0.0.1 over real HTTP, minting credentials on a local S3."""

    def __init__(
        self,
        s3: LocalS3,
        api_keys: Iterable[str] = ("tsk_sandbox",),
        s3_host: str = "s3.us-west-2.amazonaws.com",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.s3 = s3
        self.api_keys: set[str] = set(api_keys)
        self.s3_host = s3_host
        self.port = port
        self.ssl_context = ssl_context
        self.presign_expires_in = 1800
        self.balance = 100.0
        self.requests: list[RequestRecord] = []
        self.tokens: list[IssuedToken] = []
        self.file_tokens: dict[str, tuple[str, str]] = {}
        self._presigned: dict[str, _Presigned] = {}
        self._faults: list[_Queued] = []
        self._random: tuple[float, random.Random, tuple[Fault, ...]] | None = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v2/openapi"

    @property
    def v3_base_url(self) -> str:
        return f"{self.root_url}/v3"

    def start(self) -> TripoEmulator:
        """Listen on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.emulator = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake delayed answers and cut open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- faults ----------------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each applies to the next `count` requests matching its endpoint."""
        with self._cond:
            self._faults.extend(_Queued(f, f.count) for f in faults)

    def set_random_faults(
        self, rate: float, seed: int, kinds: Sequence[str | Fault] = DEFAULT_RANDOM_KINDS
    ) -> None:
        """Give each matching request a fault with probability `rate`, reproducibly by `seed`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        templates = tuple(k if isinstance(k, Fault) else Fault(kind=k) for k in kinds)
        if not templates:
            raise ValueError("kinds must not be empty")
        with self._cond:
            self._random = (rate, random.Random(seed), templates)

    def clear_faults(self) -> None:
        """Drop queued faults and stop random ones."""
        with self._cond:
            self._faults.clear()
            self._random = None

    def pending_faults(self) -> int:
        """How many fault applications are still queued."""
        with self._cond:
            return sum(q.remaining for q in self._faults)

    def _take_fault(self, path: str) -> Fault | None:
        with self._cond:
            for queued in self._faults:
                if queued.fault.endpoint in path:
                    queued.remaining -= 1
                    if queued.remaining <= 0:
                        self._faults.remove(queued)
                    return queued.fault
            if self._random is not None:
                rate, rng, templates = self._random
                matching = [t for t in templates if t.endpoint in path]
                if matching and rng.random() < rate:
                    return rng.choice(matching)
        return None

    # -- observation -----------------------------------------------------------------------

    def token_count(self) -> int:
        """How many STS tokens were handed out (code 0 answers, fakes included)."""
        with self._cond:
            return len(self.tokens)

    def records(self) -> list[RequestRecord]:
        """A snapshot of the request log."""
        with self._cond:
            return list(self.requests)

    def wait_for(self, predicate: Callable[[TripoEmulator], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(self)` holds after some request, or `timeout`; say which."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def _log(self, record: RequestRecord) -> None:
        with self._cond:
            self.requests.append(record)
            self._cond.notify_all()

    # -- request handling ------------------------------------------------------------------

    def _handle(
        self, method: str, target: str, headers: Any, body: bytes, trace_id: str
    ) -> tuple[_Reply, str]:
        """Answer one request; returns the reply and the format it asked for (if any)."""
        split = urlsplit(target)
        path = split.path
        if path.startswith("/_emulator/"):
            return self._control(method, path, body), ""
        fault = self._take_fault(path)
        if fault is not None and fault.kind == "delay" and self._stopping.wait(fault.seconds):
            return _Reply(0, b"", None, reset=True), ""
        if fault is not None and fault.kind == "reset":
            return _Reply(0, b"", None, reset=True), ""
        if path.startswith(UPLOAD_PREFIX):
            if fault is not None and fault.kind == "status":
                return _s3_error(fault.status, "ServiceUnavailable", fault.message), ""
            return self._upload(method, path, split.query, headers, body), ""
        v3 = path.startswith("/v3/")
        routes: dict[tuple[str, str], _Route] = {
            ("POST", TOKEN_PATH): self._sts_token,
            ("GET", V2_BALANCE_PATH): self._balance,
            ("POST", PRESIGN_PATH): self._presign,
            ("GET", V3_BALANCE_PATH): self._balance,
        }
        route = routes.get((method, path))
        if route is None:
            return self._error(v3, 404, 1000 if not v3 else 404, f"no route {method} {path}"), ""
        if fault is not None and fault.kind in ("status", "malformed", "code_in_200"):
            return self._fault_reply(fault, v3), ""
        auth = headers.get("Authorization", "")
        api_key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if api_key not in self.api_keys:
            return self._error(v3, 401, 2 if v3 else 1002, "authentication failed"), ""
        return route(api_key, body, fault, trace_id)

    def _error(self, v3: bool, status: int, code: int, message: str) -> _Reply:
        payload: dict[str, Any] = {"code": code, "message": message}
        if v3:
            payload["status"] = "error"
        return _json_reply(status, payload)

    def _fault_reply(self, fault: Fault, v3: bool) -> _Reply:
        if fault.kind == "malformed":
            return _Reply(200, b"<html><body>502 Bad Gateway</body></html>", None, "text/html")
        if fault.kind == "code_in_200":
            return self._error(v3, 200, fault.code, fault.message)
        reply = self._error(v3, fault.status, fault.code, fault.message)
        if fault.retry_after is not None:
            return _Reply(
                reply.status, reply.body, reply.code, headers=(("Retry-After", fault.retry_after),)
            )
        return reply

    def _format(self, v3: bool, body: bytes) -> tuple[str | None, _Reply | None]:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return None, self._error(v3, 400, 1003, "request body must be a JSON object")
        fmt = data.get("format")
        if fmt not in FORMATS:
            return None, self._error(v3, 400, 1004, f"format must be one of {', '.join(FORMATS)}")
        return str(fmt), None

    def _sts_token(
        self, api_key: str, body: bytes, fault: Fault | None, trace_id: str
    ) -> tuple[_Reply, str]:
        fmt, error = self._format(False, body)
        if error is not None or fmt is None:
            return error or self._error(False, 400, 1004, "bad format"), ""
        client_id = hashlib.md5(api_key.encode(), usedforsecurity=False).hexdigest()
        day = datetime.now(UTC).strftime("%Y%m%d")
        key = f"tcli_{client_id}/{day}/{uuid.uuid4()}/input.{fmt}"
        bucket = self.s3.bucket
        if fault is not None and fault.kind == "expired_credentials":
            creds = {
                "AccessKeyId": _fake_key("ASIA", 16, string.ascii_uppercase + string.digits),
                "SecretAccessKey": _fake_key("", 40, string.ascii_letters + string.digits),
                "SessionToken": _fake_key("IQoJb3JpZ2luX2Vj", 300, string.ascii_letters),
            }
        else:
            creds = self.s3.mint_credentials(bucket, key)
        data: dict[str, Any] = {
            "s3_host": self.s3_host,
            "resource_bucket": bucket,
            "resource_uri": key,
            "session_token": creds["SessionToken"],
            "sts_ak": creds["AccessKeyId"],
            "sts_sk": creds["SecretAccessKey"],
        }
        if fault is not None and fault.kind == "bad_shape":
            data = {"resource_bucket": bucket}
        token = IssuedToken(
            api_key=api_key,
            format=fmt,
            bucket=bucket,
            key=key,
            sts_ak=creds["AccessKeyId"],
            trace_id=trace_id,
            sts_sk=creds["SecretAccessKey"],
            session_token=creds["SessionToken"],
            valid=fault is None or fault.kind not in ("expired_credentials", "bad_shape"),
        )
        with self._cond:
            self.tokens.append(token)
        return _json_reply(200, {"code": 0, "data": data}), fmt

    def _balance(
        self, api_key: str, body: bytes, fault: Fault | None, trace_id: str
    ) -> tuple[_Reply, str]:
        return _json_reply(
            200, {"code": 0, "status": "success", "data": {"balance": self.balance, "frozen": 0.0}}
        ), ""

    def _presign(
        self, api_key: str, body: bytes, fault: Fault | None, trace_id: str
    ) -> tuple[_Reply, str]:
        fmt, error = self._format(True, body)
        if error is not None or fmt is None:
            return error or self._error(True, 400, 1004, "bad format"), ""
        day = datetime.now(UTC).strftime("%Y%m%d")
        key = f"v3/{day}/{uuid.uuid4()}/input.{fmt}"
        file_token = f"file_{uuid.uuid4()}"
        expires_in = max(1, int(self.presign_expires_in))
        url = self._presign_url(self.s3.bucket, key, expires_in)
        split = urlsplit(url)
        signature = parse_qs(split.query).get("X-Amz-Signature", [""])[0]
        lifetime = -1.0 if fault is not None and fault.kind == "expired_credentials" else expires_in
        with self._cond:
            self._presigned[unquote(split.path)] = _Presigned(
                signature, time.monotonic() + lifetime
            )
            self.file_tokens[file_token] = (self.s3.bucket, key)
        data: dict[str, Any] = {
            "upload_url": url,
            "file_token": file_token,
            "expires_in": expires_in,
        }
        if fault is not None and fault.kind == "bad_shape":
            data = {"file_token": file_token}
        return _json_reply(200, {"code": 0, "status": "success", "data": data}), fmt

    def _upload(self, method: str, path: str, query: str, headers: Any, body: bytes) -> _Reply:
        """A presigned PUT: check signature and expiry as S3 would, then store as admin."""
        if method != "PUT":
            return _s3_error(405, "MethodNotAllowed", "only PUT is allowed on upload URLs")
        with self._cond:
            issued = self._presigned.get(unquote(path))
        signature = parse_qs(query).get("X-Amz-Signature", [""])[0]
        if issued is None or not secrets.compare_digest(signature, issued.signature):
            return _s3_error(403, "SignatureDoesNotMatch", "The request signature does not match")
        if time.monotonic() > issued.deadline:
            return _s3_error(403, "AccessDenied", "Request has expired")
        bucket, _, key = unquote(path[len(UPLOAD_PREFIX) :]).partition("/")
        etag = self.s3.put_bytes(key, body, bucket, headers.get("Content-Type"))
        return _Reply(200, b"", None, headers=(("ETag", etag),))

    def _presign_url(self, bucket: str, key: str, expires_in: int) -> str:
        # Signed as S3 signs a presigned PUT, but aimed at this emulator: moto with
        # authentication on cannot serve presigned requests (it answers 500).
        url = f"{self.root_url}{UPLOAD_PREFIX}{bucket}/{quote(key, safe='/~')}"
        request = AWSRequest(method="PUT", url=url)
        credentials = Credentials(self.s3.admin_access_key, self.s3.admin_secret_key)
        S3SigV4QueryAuth(credentials, "s3", self.s3.region, expires=expires_in).add_auth(request)
        signed = request.url
        assert signed is not None
        return signed

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        try:
            if path == FAULTS_PATH and method == "POST":
                data = json.loads(body or b"[]")
                items = data if isinstance(data, list) else [data]
                faults = [Fault.from_dict(item) for item in items]
                self.inject(*faults)
                return _json_reply(200, {"code": 0, "data": {"queued": len(faults)}})
            if path == FAULTS_PATH and method == "DELETE":
                self.clear_faults()
                return _json_reply(200, {"code": 0, "data": {}})
            if path == "/_emulator/random_faults" and method == "POST":
                data = json.loads(body)
                kinds = [Fault.from_dict(k) if isinstance(k, dict) else k for k in data["kinds"]]
                self.set_random_faults(float(data["rate"]), int(data["seed"]), kinds)
                return _json_reply(200, {"code": 0, "data": {}})
            if path == "/_emulator/api_keys" and method == "PUT":
                keys = json.loads(body)
                if not isinstance(keys, list):
                    raise ValueError("api_keys must be a JSON list")
                self.api_keys.clear()
                self.api_keys.update(str(k) for k in keys)
                return _json_reply(200, {"code": 0, "data": {}})
            if path == "/_emulator/requests" and method == "GET":
                records = [r.to_dict() for r in self.records()]
                return _json_reply(200, {"code": 0, "data": records})
        except (ValueError, TypeError, KeyError) as exc:
            return _json_reply(400, {"code": 1003, "message": str(exc)})
        return _json_reply(404, {"code": 1000, "message": f"no route {method} {path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    emulator: TripoEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request (timeouts, TLS refusals) are normal in tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (40 ms on Linux) on every kept-alive request. Real API servers do not stall.
    disable_nagle_algorithm = True
    server: _Server
    server_version = "TripoEmulator/1"

    def setup(self) -> None:
        emulator = self.server.emulator
        if emulator.ssl_context is not None:
            # Handshake here, in the connection's thread, not in the accept loop.
            self.request = emulator.ssl_context.wrap_socket(self.request, server_side=True)
        with emulator._cond:
            emulator._connections.add(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.emulator._cond:
                self.server.emulator._connections.discard(self.request)
            if self.server.emulator.ssl_context is not None:
                self.request.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        emulator = self.server.emulator
        arrived_mono, arrived_wall = time.monotonic(), time.time()
        trace_id = str(uuid.uuid4())
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            reply, fmt = emulator._handle(self.command, self.path, self.headers, body, trace_id)
        except Exception as exc:  # an emulator bug must still look like an answer
            reply, fmt = _json_reply(500, {"code": 1001, "message": f"emulator: {exc}"}), ""
        path = urlsplit(self.path).path
        if not path.startswith("/_emulator/"):
            emulator._log(
                RequestRecord(
                    monotonic_time=arrived_mono,
                    wall_time=arrived_wall,
                    method=self.command,
                    path=path,
                    format=fmt or None,
                    status=reply.status,
                    code=reply.code,
                    trace_id=trace_id,
                )
            )
        if reply.reset:
            self._reset()
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("X-Tripo-Trace-ID", trace_id)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _reset(self) -> None:
        self.close_connection = True
        try:
            # Linger 0: close sends RST, as a crashed proxy would.
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.request.close()
        except OSError:
            pass

    do_GET = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_HEAD = _serve
