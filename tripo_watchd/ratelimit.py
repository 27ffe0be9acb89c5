"""A process-wide pacer so bursts of files are spread out instead of hammered into 429s."""

from __future__ import annotations

import threading
import time


class Pacer:
    """Allows `per_minute` acquisitions a minute, spread evenly; 0 means no limit."""

    def __init__(self, per_minute: float) -> None:
        self._interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> None:
        """Block until this caller's turn (or until `stop` is set)."""
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next)
            self._next = turn + self._interval
        delay = turn - time.monotonic()
        if delay > 0:
            (stop or threading.Event()).wait(delay)


_shared: dict[float, Pacer] = {}
_shared_lock = threading.Lock()


def shared_pacer(per_minute: float) -> Pacer:
    """The one pacer of this process for that rate (workers share it)."""
    with _shared_lock:
        pacer = _shared.get(per_minute)
        if pacer is None:
            pacer = _shared[per_minute] = Pacer(per_minute)
        return pacer
