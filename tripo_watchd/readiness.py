"""Readiness bookkeeping: when a candidate file is complete (closed, or stat stable long enough)."""

from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass, replace
from enum import Enum


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file waiting to be complete; one small record per pending path."""

    size: int
    mtime_ns: int
    since: float  # monotonic time of the last change seen (event or stat)
    closed: bool  # no close-after-write awaited: closed, moved in, found by a scan, or polled
    gen: int  # matches the one live heap entry of this path


class Verdict(Enum):
    """What a stat check concluded about a candidate."""

    READY = "ready"
    READY_WITHOUT_CLOSE = "ready_without_close"
    CHANGED = "changed"
    WAITING = "waiting"
    GONE = "gone"
    STALE = "stale"  # the candidate was replaced while it was being checked


class ReadinessTable:
    """Pending candidates, a due-time heap over them, and the ready paths awaiting an offer.

    Not thread-safe: the watcher holds its lock around every call. Each pending path has
    exactly one live heap entry (matched by `gen`), so the heap stays about as small as the
    table and a tick only touches the entries that are due.
    """

    def __init__(self, settle_seconds: float) -> None:
        self.settle = max(0.0, settle_seconds)
        # Writers that never close (mmap, another NFS host) are taken after this much quiet.
        self.quiet = max(30.0, 10 * self.settle)
        self._pending: dict[str, Candidate] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._ready: dict[str, None] = {}  # insertion-ordered: offered first in, first out
        self._gens = itertools.count()

    def __contains__(self, path: str) -> bool:
        return path in self._pending or path in self._ready

    def __len__(self) -> int:
        return len(self._pending) + len(self._ready)

    def _due(self, cand: Candidate) -> float:
        return cand.since + (self.settle if cand.closed else self.quiet)

    def add(self, path: str, st: os.stat_result, now: float, *, closed: bool) -> None:
        """Start (or restart) waiting for `path` from this stat."""
        self._ready.pop(path, None)
        cand = Candidate(st.st_size, st.st_mtime_ns, now, closed, next(self._gens))
        self._pending[path] = cand
        heapq.heappush(self._heap, (self._due(cand), cand.gen, path))

    def saw_write(self, path: str, now: float, *, await_close: bool) -> bool:
        """A modify event: the quiet period restarts; False when `path` is not tracked."""
        if path in self._ready:
            del self._ready[path]
            cand = Candidate(-1, -1, now, not await_close, next(self._gens))
            self._pending[path] = cand
            heapq.heappush(self._heap, (self._due(cand), cand.gen, path))
            return True
        cand_or_none = self._pending.get(path)
        if cand_or_none is None:
            return False
        # The due time only moves later here, so the existing heap entry stays valid.
        closed = cand_or_none.closed and not await_close
        self._pending[path] = replace(cand_or_none, since=now, closed=closed)
        return True

    def saw_activity(self, path: str, now: float) -> bool:
        """Some other event for a tracked path: restart its quiet period only."""
        cand = self._pending.get(path)
        if cand is None:
            return path in self._ready
        self._pending[path] = replace(cand, since=now)
        return True

    def discard(self, path: str) -> None:
        """Forget `path` (deleted or moved away)."""
        self._pending.pop(path, None)
        self._ready.pop(path, None)

    def discard_under(self, directory: str) -> int:
        """Forget every path below `directory`; returns how many."""
        prefix = directory.rstrip(os.sep) + os.sep
        gone = [p for p in itertools.chain(self._pending, self._ready) if p.startswith(prefix)]
        for path in gone:
            self.discard(path)
        return len(gone)

    def next_due(self) -> float | None:
        """The earliest time a check may be due, or None when nothing is pending."""
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float, limit: int) -> list[tuple[str, Candidate]]:
        """Pop up to `limit` candidates whose wait is over; the caller stats them unlocked."""
        out: list[tuple[str, Candidate]] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            _, gen, path = heapq.heappop(self._heap)
            cand = self._pending.get(path)
            if cand is None or cand.gen != gen:
                continue
            due = self._due(cand)
            if due > now:
                heapq.heappush(self._heap, (due, gen, path))
                continue
            out.append((path, cand))
        return out

    def check(
        self, path: str, checked: Candidate, st: os.stat_result | None, now: float
    ) -> Verdict:
        """Apply a stat taken for a candidate returned by `take_due`."""
        cand = self._pending.get(path)
        if cand is None or cand.gen != checked.gen:
            return Verdict.STALE
        if st is None:
            del self._pending[path]
            return Verdict.GONE
        if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
            cand = replace(cand, size=st.st_size, mtime_ns=st.st_mtime_ns, since=now)
            self._pending[path] = cand
            heapq.heappush(self._heap, (self._due(cand), cand.gen, path))
            return Verdict.CHANGED
        due = self._due(cand)
        if due > now:
            heapq.heappush(self._heap, (due, cand.gen, path))
            return Verdict.WAITING
        del self._pending[path]
        self._ready[path] = None
        return Verdict.READY if cand.closed else Verdict.READY_WITHOUT_CLOSE

    def has_ready(self) -> bool:
        """True when some path is ready and not yet accepted."""
        return bool(self._ready)

    def ready_batch(self, limit: int) -> list[str]:
        """The oldest ready paths, up to `limit`, in the order they became ready."""
        return list(itertools.islice(self._ready, limit))

    def accepted(self, path: str) -> None:
        """The daemon took `path`: it is no longer the watcher's concern."""
        self._ready.pop(path, None)
