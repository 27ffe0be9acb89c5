"""Prometheus metrics on a registry of our own, and the HTTP endpoint that exposes them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tripo_watchd.addresses import is_loopback
from tripo_watchd.records import Record

OUTCOMES = ("uploaded", "duplicate", "rejected", "failed")
MAX_RETRY_REASONS = 20  # distinct `reason` labels kept; later ones count as "other"
DEFAULT_PORT = 9464
_UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def outcome_of(record: Record) -> str:
    """The metrics outcome of a ledger record: uploaded, duplicate, rejected or failed."""
    if record.status == "uploaded":
        return "duplicate" if record.duplicate_of else "uploaded"
    return record.status


@dataclass(frozen=True)
class MetricsServer:
    """The running /metrics endpoint: where it listens; call it to stop it."""

    host: str
    port: int  # the bound port, also when 0 was asked for
    stop: Callable[[], None]

    def __call__(self) -> None:
        self.stop()


class MetricsSink(Protocol):
    """What the daemon calls; both Metrics and NullMetrics provide it."""

    def file_done(self, outcome: str, size: int = 0, seconds: float | None = None) -> None: ...

    def token_request(self, seconds: float) -> None: ...

    def retry(self, reason: str) -> None: ...

    def set_queue(self, queued: int, in_flight: int) -> None: ...

    def set_auth(self, ok: bool) -> None: ...


class Metrics:
    """The daemon's metrics, registered on `self.registry` (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._files = Counter(
            "tripo_watchd_files", "Files finished, by outcome.", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:
            self._files.labels(outcome)  # present as 0 before the first file
        self._bytes = Counter(
            "tripo_watchd_uploaded_bytes", "Bytes uploaded (duplicates excluded).", registry=r
        )
        self._upload_seconds = Histogram(
            "tripo_watchd_upload_seconds",
            "Seconds from reading a file to its upload finishing.",
            buckets=_UPLOAD_BUCKETS,
            registry=r,
        )
        self._token_seconds = Histogram(
            "tripo_watchd_token_request_seconds",
            "Seconds one upload-credential request to the Tripo API took.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self._queued = Gauge("tripo_watchd_queue_depth", "Files waiting for a worker.", registry=r)
        self._in_flight = Gauge("tripo_watchd_in_flight", "Files being processed.", registry=r)
        self._retries = Counter(
            "tripo_watchd_retries", "Whole-file retries, by reason.", ["reason"], registry=r
        )
        self._auth = Gauge(
            "tripo_watchd_auth_ok", "1 while the API key is accepted, 0 while refused.", registry=r
        )
        self._auth.set(1)
        self._reasons: set[str] = set()
        self._lock = threading.Lock()

    def file_done(self, outcome: str, size: int = 0, seconds: float | None = None) -> None:
        """Count one finished file; bytes and duration count only for a real upload."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; use one of {', '.join(OUTCOMES)}")
        self._files.labels(outcome).inc()
        if outcome == "uploaded":
            self._bytes.inc(max(0, size))
            if seconds is not None:
                self._upload_seconds.observe(seconds)

    def token_request(self, seconds: float) -> None:
        self._token_seconds.observe(seconds)

    def retry(self, reason: str) -> None:
        """Count one retry; `reason` should be a short fixed word such as the error class name."""
        with self._lock:
            if reason not in self._reasons and len(self._reasons) >= MAX_RETRY_REASONS:
                reason = "other"
            self._reasons.add(reason)
        self._retries.labels(reason).inc()

    def set_queue(self, queued: int, in_flight: int) -> None:
        self._queued.set(queued)
        self._in_flight.set(in_flight)

    def set_auth(self, ok: bool) -> None:
        self._auth.set(1 if ok else 0)

    def serve(self, listen: str, *, allow_remote: bool = False) -> MetricsServer:
        """Serve /metrics on `listen` ("host:port", "[::1]:port", "port"); call the result to stop.

        Loopback only unless `allow_remote`: the endpoint has no authentication. Raises
        ValueError for a bad or refused address, OSError if the port cannot be bound.
        """
        host, port = parse_listen(listen)
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"metrics listen address {listen!r} is not a loopback address; the metrics "
                "endpoint has no authentication, so it listens on 127.0.0.1 or ::1 only "
                "unless remote access is explicitly allowed"
            )
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return MetricsServer(host, server.server_port, stop)


class NullMetrics:
    """The same calls as Metrics, doing nothing: used when metrics are off."""

    def file_done(self, outcome: str, size: int = 0, seconds: float | None = None) -> None:
        pass

    def token_request(self, seconds: float) -> None:
        pass

    def retry(self, reason: str) -> None:
        pass

    def set_queue(self, queued: int, in_flight: int) -> None:
        pass

    def set_auth(self, ok: bool) -> None:
        pass


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", "[::1]:9464", ":9464" or "9464"."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{listen!r}: write an IPv6 address in brackets, e.g. [::1]:{port_text}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"{listen!r} is not a listen address; use host:port, e.g. 127.0.0.1:{DEFAULT_PORT}"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{listen!r}: the port must be from 0 to 65535")
    return host or "127.0.0.1", port
