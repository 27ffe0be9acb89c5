"""The sd_notify protocol: readiness, status and watchdog datagrams to systemd."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET`; a silent no-op when it is unset."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = environ.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        """True when systemd gave us a socket to notify."""
        return self._address is not None

    def ready(self, status: str = "") -> None:
        """Tell systemd start-up (or a reload) has finished."""
        if status:
            self.send(READY="1", STATUS=status)
        else:
            self.send(READY="1")

    def status(self, text: str) -> None:
        """Set the one-line status `systemctl status` shows."""
        self.send(STATUS=text)

    def stopping(self) -> None:
        """Tell systemd shutdown has begun."""
        self.send(STOPPING="1")

    def reloading(self) -> None:
        """Tell systemd a reload has begun; call `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING="1", MONOTONIC_USEC=str(usec))

    def watchdog_ping(self) -> None:
        """Reset the service watchdog timer."""
        self.send(WATCHDOG="1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None if the watchdog is not ours."""
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def send(self, **fields: str) -> bool:
        """Send one datagram of KEY=value lines; never raises, False when it was not delivered."""
        if self._address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            with self._lock:
                first = not self._failure_logged
                self._failure_logged = True
            if first:
                log.warning("sd_notify failed", socket=self._display(), error=str(exc))
            return False
        return True

    def _display(self) -> str:
        address = self._address
        if isinstance(address, bytes):
            return "@" + address[1:].decode(errors="replace")
        return str(address)


def _socket_address(value: str) -> str | bytes | None:
    """Turn $NOTIFY_SOCKET into a connectable address; '@' means the abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock addresses (vsock:CID:PORT) and anything else are not ours to speak to.
    return None
