"""A bandwidth cap shared by all workers: rate parsing, a token bucket and a pacing reader."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from tripo_watchd.streams import StreamWrapper

_UNITS = {
    "": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
}
# The byte unit "B" must be upper case: "Mb" conventionally means megabits.
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgG][iI]?)?B)?\s*(?:/\s*s)?\s*$")
_BITS = re.compile(r"(?i:bit|bps)|[kKmMgG][iI]?b\s*(?:/|$)")
_READ_SLICE = 256 * 1024  # pace big reads in slices, so the link sees a steady stream


def parse_rate(text: str) -> int:
    """Bytes per second from "20MB/s", "512 KiB/s", "1.5GB", "800000" (bytes); > 0."""
    match = _RATE.match(text)
    if match is None:
        hint = ""
        if _BITS.search(text):
            hint = " (bits are not accepted: divide by 8 and use bytes, e.g. 100 Mbit/s = 12.5MB/s)"
        raise ValueError(
            f"{text!r} is not a transfer rate{hint}; use a number with an optional unit "
            "B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024) "
            'and an optional "/s", e.g. "20MB/s"'
        )
    number, prefix = match.group(1), (match.group(2) or "").upper()
    rate = int(float(number) * _UNITS[prefix])
    if rate <= 0:
        raise ValueError(f"{text!r} is not allowed; the rate must be at least 1 byte per second")
    return rate


class Bandwidth:
    """A thread-safe token bucket: `consume(n)` blocks until n bytes fit under the cap.

    Callers are served in the order they ask; up to `burst_bytes` may pass at once after a pause.
    """

    def __init__(
        self,
        bytes_per_second: float,
        *,
        burst_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be greater than 0")
        self.bytes_per_second = float(bytes_per_second)
        self._burst_seconds = burst_bytes / self.bytes_per_second
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0  # when the bytes reserved so far will have gone out at the cap

    def reserve(self, n: int) -> float:
        """Book `n` bytes and return how many seconds the caller must wait before sending them."""
        with self._lock:
            now = self._clock()
            self._next = max(self._next, now) + n / self.bytes_per_second
            return max(0.0, self._next - self._burst_seconds - now)

    def consume(self, n: int, stop: threading.Event | None = None) -> None:
        """Block until `n` bytes may be sent; returns early if `stop` is set."""
        delay = self.reserve(n)
        if delay > 0:
            (stop or threading.Event()).wait(delay)


class ThrottledReader(StreamWrapper):
    """A read-only file-like over a file object or bytes, paced by a shared Bandwidth.

    Usable as boto3's `put_object(Body=...)` and as s3transfer's `upload(fileobj)`: it has
    read/seek/tell/readable/seekable and `len()` (the whole body's size). `callback`, if
    given, receives each newly read byte count once (re-reads after a seek back are not
    counted again), so it can drive upload progress for `put_object`, which has no Callback.
    """

    def __init__(
        self,
        source: IO[bytes] | bytes,
        bandwidth: Bandwidth | None,
        *,
        callback: Callable[[int], Any] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(io.BytesIO(source) if isinstance(source, bytes) else source)
        self._bandwidth = bandwidth
        self._callback = callback
        self._stop = stop
        here = self._stream.tell()
        self._size = self._stream.seek(0, io.SEEK_END)
        self._stream.seek(here)
        self._high_water = here
        self._transferring = True

    def signal_not_transferring(self) -> None:
        """botocore is reading the body to sign it, not to send it: do not pace or count."""
        self._transferring = False

    def signal_transferring(self) -> None:
        """Reads send bytes again (s3transfer's event handlers call these two)."""
        self._transferring = True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._stream.tell())
        if not self._transferring:
            return self._stream.read(size)
        if self._bandwidth is None:
            return self._account(self._stream.read(size))
        parts: list[bytes] = []
        while size > 0:
            chunk = self._stream.read(min(size, _READ_SLICE))
            if not chunk:
                break
            self._bandwidth.consume(len(chunk), self._stop)
            parts.append(self._account(chunk))
            size -= len(chunk)
        return b"".join(parts)

    def _account(self, chunk: bytes) -> bytes:
        position = self._stream.tell()
        if self._callback is not None and position > self._high_water:
            self._callback(position - self._high_water)
        self._high_water = max(self._high_water, position)
        return chunk

    def __len__(self) -> int:
        return self._size


_shared: dict[float, Bandwidth] = {}
_shared_lock = threading.Lock()


def shared_bandwidth(bytes_per_second: float) -> Bandwidth:
    """The one Bandwidth of this process for that rate, so every worker's sender shares it."""
    with _shared_lock:
        bandwidth = _shared.get(bytes_per_second)
        if bandwidth is None:
            bandwidth = _shared[bytes_per_second] = Bandwidth(bytes_per_second)
        return bandwidth
