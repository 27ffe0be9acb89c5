"""Progress of one big upload: periodic `upload.progress` log events and a terminal bar."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

log = structlog.get_logger(__name__)

MB = 1000 * 1000


class Progress:
    """boto3 `Callback` (bytes since the last call): logs percent and MB/s at most every N s.

    Thread-safe (s3transfer calls it from several threads); negative counts, which s3transfer
    sends when it retries a part, are taken back.
    """

    def __init__(
        self,
        total: int,
        *,
        path: str = "",
        interval_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        self._total = total
        self._path = path
        self._interval = interval_seconds
        self._clock = clock
        self._log = logger if logger is not None else log
        self._lock = threading.Lock()
        self._sent = 0
        self._last_time = clock()
        self._last_sent = 0

    @property
    def sent(self) -> int:
        return self._sent

    def __call__(self, bytes_transferred: int) -> None:
        with self._lock:
            self._sent = max(0, self._sent + bytes_transferred)
            now = self._clock()
            elapsed = now - self._last_time
            if elapsed < self._interval:
                return
            rate = (self._sent - self._last_sent) / elapsed / MB
            self._last_time, self._last_sent = now, self._sent
            sent = self._sent
        self._log.info(
            "upload.progress",
            path=self._path,
            percent=_percent(sent, self._total),
            sent_bytes=sent,
            total_bytes=self._total,
            mb_per_s=round(rate, 2),
        )


class TerminalBar:
    """A single `\\r`-redrawn progress line on `stream`; does nothing unless it is a TTY."""

    def __init__(
        self,
        stream: TextIO,
        total: int,
        *,
        label: str = "",
        width: int = 30,
        min_interval: float = 0.1,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._total = total
        self._label = label
        self._width = width
        self._min_interval = min_interval
        self.enabled = _is_tty(stream) if enabled is None else enabled
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._drawn_at: float | None = None
        self._sent = 0
        self._line_length = 0

    def __call__(self, bytes_transferred: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._sent = max(0, self._sent + bytes_transferred)
            now = self._clock()
            if self._drawn_at is not None and now - self._drawn_at < self._min_interval:
                return
            self._draw(now)

    def finish(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        with self._lock:
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()
            self.enabled = False

    def _draw(self, now: float) -> None:
        fraction = min(1.0, self._sent / self._total) if self._total else 1.0
        filled = int(fraction * self._width)
        elapsed = now - self._started
        rate = self._sent / elapsed / MB if elapsed > 0 else 0.0
        bar = "#" * filled + "." * (self._width - filled)
        prefix = f"{self._label} " if self._label else ""
        line = f"{prefix}[{bar}] {fraction * 100:5.1f}%  {rate:6.1f} MB/s"
        # Pad with spaces so a shorter line fully covers the previous one.
        self._stream.write("\r" + line.ljust(self._line_length))
        self._stream.flush()
        self._line_length = len(line)
        self._drawn_at = now


def fan_out(*callbacks: Callable[[int], Any]) -> Callable[[int], None]:
    """One callback that passes each byte count to all of `callbacks`."""

    def call(bytes_transferred: int) -> None:
        for callback in callbacks:
            callback(bytes_transferred)

    return call


def _percent(sent: int, total: int) -> float:
    return round(min(100.0, 100.0 * sent / total), 1) if total else 100.0


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
