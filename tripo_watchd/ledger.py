"""JSON Lines ledger: append durably, index for dedupe and catch-up, repair a torn tail."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import structlog

from .errors import LedgerError
from .ledger_index import BIG_UPLOAD_BYTES, LedgerIndex
from .ledger_lines import FAST, encode_line, parse_line, read_records
from .ledger_scan import Scan
from .ledger_sidecar import Sidecar
from .records import Record

__all__ = ["BIG_UPLOAD_BYTES", "JsonlLedger", "LedgerBackend", "encode_line", "read_records"]

log = structlog.get_logger(__name__)

# Hooks read at call time, so tests can patch them here: the fast-path regex used at open,
# how many records the sidecar digests per chunk, and the bound on distinct big upload sizes.
_FAST = FAST
_FLUSH_RECORDS = 1 << 14
_MAX_BIG_SIZES = 1 << 16


class LedgerBackend(Protocol):
    """Where outcomes are recorded and looked up again."""

    def append(self, record: Record) -> None: ...
    def last_for_path(self, path: str) -> Record | None: ...
    def uploaded_with_sha256(self, sha256: str) -> Record | None: ...
    def may_hold_upload_of_size(self, size: int) -> bool: ...
    def is_done(self, path: str, size: int, mtime_ns: int) -> bool: ...
    def records(self, status: str | None = None) -> Iterator[Record]: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out; the one place bytes reach the ledger (tests patch it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync(fd: int) -> None:
    """os.fsync, looked up at call time so tests can make it fail."""
    os.fsync(fd)


def _make_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


class JsonlLedger:
    """The ledger as an append-only JSON Lines file plus an in-memory index built at open.

    Appends use group commit: each writer writes its line under the lock, then one fsync
    (by whichever waiter gets there first) covers every line written so far.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._synced_cv = threading.Condition(self._lock)
        self._index = LedgerIndex(_MAX_BIG_SIZES)
        self._size = 0  # end of the last complete, fsync'd line
        self._written = 0  # end of the last complete line written; fsync'd up to _size
        self._pending: deque[tuple[int, int, Record]] = deque()  # (start, end, record)
        self._syncing = False  # a leader is in fsync with the lock released
        self._epoch = 0  # bumped when a failed fsync discards the lines past _size
        # ended epoch -> (_size when it ended, why): settles the appends still waiting on it
        self._epoch_ends: dict[int, tuple[int, str]] = {}
        self._dirty = False  # a failed write may have left bytes past _written
        self._closed = False
        try:
            _make_dirs(self.path.parent)
            self._fd = os.open(
                self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            raise LedgerError(f"ledger {self.path} is in use by another process") from e
        self._sidecar = Sidecar(self.path, self._fd)
        try:
            self._load()
        except OSError as e:
            self._sidecar.close()
            os.close(self._fd)
            raise LedgerError(f"cannot read ledger {self.path}: {e.strerror}") from e
        self._written = self._size

    # -- open ---------------------------------------------------------------------------------

    def _load(self) -> None:
        """Build the index from the sidecar and the lines past it, then repair a torn tail."""
        index, sidecar = self._index, self._sidecar
        index.status_id("uploaded")  # id 0 in every run, before the sidecar's statuses
        base = sidecar.open(index)
        good_end, offset = Scan(str(self.path), self._fd, index).run(
            base, _FAST, _FLUSH_RECORDS, lambda end: sidecar.flush(index, end)
        )
        if good_end < offset:
            self._repair(good_end, offset)
        elif offset and os.pread(self._fd, 1, offset - 1) != b"\n":
            # The last record is whole JSON and lacks only its newline: complete it.
            _write_all(self._fd, b"\n")
            _fsync(self._fd)
            good_end = offset + 1
        self._size = good_end
        sidecar.flush(index, good_end)
        sidecar.commit()

    def _repair(self, good_end: int, end: int) -> None:
        torn = os.pread(self._fd, end - good_end, good_end)
        torn_path = self.path.with_name(self.path.name + ".torn")
        fd = os.open(torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, torn if torn.endswith(b"\n") else torn + b"\n")
            _fsync(fd)
        finally:
            os.close(fd)
        os.ftruncate(self._fd, good_end)
        _fsync(self._fd)
        log.warning(
            "ledger_torn_tail_repaired",
            ledger=str(self.path),
            moved_bytes=len(torn),
            moved_to=str(torn_path),
        )

    # -- writing ------------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Write one record and fsync it; the outcome counts only once this returns."""
        data = encode_line(record)
        with self._lock:
            if self._closed:
                raise LedgerError(f"ledger {self.path} is closed")
            try:
                if self._dirty:
                    os.ftruncate(self._fd, self._written)
                    self._dirty = False
                _write_all(self._fd, data)
            except OSError as e:
                self._dirty = True
                self._truncate()
                raise self._error(e) from e
            start, end, epoch = self._written, self._written + len(data), self._epoch
            self._written = end
            self._pending.append((start, end, record))
            while True:
                if epoch != self._epoch:
                    durable, why = self._epoch_ends[epoch]
                    if end <= durable:
                        return
                    raise LedgerError(why)
                if self._size >= end:
                    return
                if self._syncing:
                    self._synced_cv.wait()
                else:
                    self._sync()

    def _sync(self) -> None:
        """Lead one group commit: fsync everything written so far, then index it.

        Called and returns with the lock held; releases it around the fsync itself.
        """
        target = self._written
        self._syncing = True
        self._lock.release()
        try:
            _fsync(self._fd)
        except OSError as e:
            error: OSError | None = e
        else:
            error = None
        finally:
            self._lock.acquire()
            self._syncing = False
            self._synced_cv.notify_all()
        if error is not None:
            # Lines written since the last good fsync may or may not be on disk: discard them
            # all, and fail every append that wrote one (they wait on this epoch).
            exc = self._error(error)
            self._epoch_ends[self._epoch] = (self._size, exc.message)
            self._epoch += 1
            self._pending.clear()
            self._written = self._size
            self._dirty = True
            self._truncate()
            raise exc from error
        self._size = target
        pending, index = self._pending, self._index
        while pending and pending[0][1] <= target:
            start, _, rec = pending.popleft()
            index.add(
                start,
                rec.path,
                rec.status,
                rec.size,
                rec.mtime_ns,
                rec.sha256,
                rec.retryable is False,
            )
        if len(index.delta.paths) >= _FLUSH_RECORDS:
            self._sidecar.flush(index, target)

    def _truncate(self) -> None:
        """Cut the file back to the last complete line written (lock held)."""
        try:
            os.ftruncate(self._fd, self._written)
            self._dirty = False
        except OSError:
            pass  # retried before the next append

    def _error(self, e: OSError) -> LedgerError:
        return LedgerError(f"cannot write ledger {self.path}: {e.strerror or e}")

    # -- reading ------------------------------------------------------------------------------

    def _read_at(self, offset: int) -> dict[str, Any] | None:
        chunk = b""
        while True:
            more = os.pread(self._fd, 4096, offset + len(chunk))
            chunk += more
            end = chunk.find(b"\n")
            if end >= 0:
                return parse_line(chunk[:end])
            if not more:
                return parse_line(chunk)

    def last_for_path(self, path: str) -> Record | None:
        """The latest record of any status for `path`, or None."""
        with self._lock:
            offset = self._index.offset_for_path(path)
        if offset is None:
            return None
        data = self._read_at(offset)
        if data is None or data["path"] != path:
            return None
        return Record.from_dict(data)

    def uploaded_with_sha256(self, sha256: str) -> Record | None:
        """The first 'uploaded' record with this content, to point a duplicate at."""
        with self._lock:
            offset = self._index.offset_for_sha(sha256)
        if offset is None:
            return None
        data = self._read_at(offset)
        if data is None or data.get("sha256") != sha256:
            return None
        return Record.from_dict(data)

    def may_hold_upload_of_size(self, size: int) -> bool:
        """False only if no 'uploaded' record has this size, so a file of it is no duplicate.

        Sizes below BIG_UPLOAD_BYTES are not tracked: for them this is always True.
        """
        if size < BIG_UPLOAD_BYTES:
            return True
        with self._lock:
            return self._index.may_hold_upload_of_size(size)

    def is_done(self, path: str, size: int, mtime_ns: int) -> bool:
        """True if the latest record for `path` is uploaded, rejected or failed for good, at this
        size+mtime_ns: catch-up and rescans leave such a file alone."""
        with self._lock:
            return self._index.is_done(path, size, mtime_ns)

    def records(self, status: str | None = None) -> Iterator[Record]:
        """Stream every valid record in file order (optionally one status), skipping bad lines."""
        with self._lock:
            end = self._size
        return read_records(self.path, status, end=end)

    def counts(self) -> dict[str, int]:
        """status -> number of paths whose latest record has that status."""
        with self._lock:
            return self._index.count_map()

    def close(self) -> None:
        """Release the file once in-flight appends finish; further appends raise LedgerError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._syncing or self._written > self._size:
                if self._syncing:
                    self._synced_cv.wait()
                else:
                    with contextlib.suppress(LedgerError):
                        self._sync()
            self._sidecar.flush(self._index, self._size)
            self._sidecar.close()
            os.close(self._fd)
