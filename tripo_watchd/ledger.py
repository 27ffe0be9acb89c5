"""JSON Lines ledger: append durably, index for dedupe and catch-up, repair a torn tail."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import structlog

from .errors import LedgerError
from .records import Record

log = structlog.get_logger(__name__)

# Index keys are 60-bit string hashes instead of the strings themselves: a million paths as
# str keys alone cost ~130 MB. A collision (p ~ 1e-6 at 1e6 paths) is caught where a record is
# read back (its path/sha256 is compared); is_done would additionally need equal size+mtime_ns.
_HASH_MASK = (1 << 60) - 1

# Per path: offset of its latest line, status id, flags (1: size set, 2: mtime set), size, mtime.
_PATH_ENTRY = struct.Struct("<QBBqq")

# The writer's own key order (Record.to_dict): path, status, at, size, mtime_ns, sha256, ...
# A line matching this prefix skips json.loads at open; anything else takes the slow path.
# The sha256 group is `+` with a length check in Python: sre's counted repeat {64} alone
# doubled the cost of each match.
_FAST = re.compile(
    rb'\{"path":"([^"\\]*)","status":"([a-z_]+)","at":"[^"\\]*"'
    rb'(?:,"size":(\d+))?(?:,"mtime_ns":(-?\d+))?(?:,"sha256":"([0-9a-f]+)")?[,}]'
)

_BLOCK = 1 << 22

_MAX_LINE_WARNINGS = 20


class LedgerBackend(Protocol):
    """Where outcomes are recorded and looked up again."""

    def append(self, record: Record) -> None: ...
    def last_for_path(self, path: str) -> Record | None: ...
    def uploaded_with_sha256(self, sha256: str) -> Record | None: ...
    def is_done(self, path: str, size: int, mtime_ns: int) -> bool: ...
    def records(self, status: str | None = None) -> Iterator[Record]: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def _key(text: str) -> int:
    return hash(text) & _HASH_MASK


def _sha_key(sha256: str) -> int:
    # Hashed as bytes so that open can key the raw hex digits without decoding them.
    return hash(sha256.encode("utf-8", "surrogatepass")) & _HASH_MASK


def encode_line(record: Record) -> bytes:
    """One ledger line as UTF-8; names with undecodable bytes (lone surrogates) use \\u escapes."""
    try:
        return (record.to_json() + "\n").encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record.to_dict(), ensure_ascii=True, separators=(",", ":"))
        return (text + "\n").encode("ascii")


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        return None
    if not isinstance(data.get("status"), str):
        return None
    return data


def read_records(
    path: Path, status: str | None = None, *, end: int | None = None
) -> Iterator[Record]:
    """Stream a ledger's valid records without locking or repairing it (safe beside a daemon).

    A torn last line is skipped, never repaired: only the owning JsonlLedger may truncate.
    """
    with open(path, "rb") as f:
        pos = 0
        for line in f:
            pos += len(line)
            if end is not None and pos > end:
                break
            data = _parse(line) if line.endswith(b"\n") else None
            if data is not None and (status is None or data["status"] == status):
                yield Record.from_dict(data)


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
    """The ledger as an append-only JSON Lines file plus an in-memory index built at open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._statuses: list[str] = []
        self._status_ids: dict[str, int] = {}
        self._by_path: dict[int, bytes] = {}
        self._by_sha: dict[int, int] = {}
        self._counts: list[int] = []
        self._size = 0  # end of the last complete, fsync'd line
        self._dirty = False  # a failed write may have left bytes past _size
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
        try:
            self._load()
        except OSError as e:
            os.close(self._fd)
            raise LedgerError(f"cannot read ledger {self.path}: {e.strerror}") from e

    # -- open ---------------------------------------------------------------------------------

    def _status_id(self, status: str) -> int:
        sid = self._status_ids.get(status)
        if sid is None:
            sid = len(self._statuses)
            self._statuses.append(status)
            self._status_ids[status] = sid
            self._counts.append(0)
        return sid

    def _index(
        self,
        offset: int,
        path: str,
        status: str,
        size: int | None,
        mtime_ns: int | None,
        sha256: str | None,
        final: bool = False,
    ) -> None:
        sid = self._status_id(status)
        pkey = _key(path)
        old = self._by_path.get(pkey)
        if old is not None:
            self._counts[old[8]] -= 1  # byte 8 of _PATH_ENTRY is the status id
        self._counts[sid] += 1
        flags = (size is not None) | ((mtime_ns is not None) << 1) | (final << 2)
        self._by_path[pkey] = _PATH_ENTRY.pack(offset, sid, flags, size or 0, mtime_ns or 0)
        if status == "uploaded" and sha256:
            self._by_sha.setdefault(_key(sha256), offset)

    def _index_slow(self, offset: int, data: dict[str, Any]) -> None:
        size, mtime_ns, sha = data.get("size"), data.get("mtime_ns"), data.get("sha256")
        self._index(
            offset,
            data["path"],
            data["status"],
            size if isinstance(size, int) else None,
            mtime_ns if isinstance(mtime_ns, int) else None,
            sha if isinstance(sha, str) else None,
            data.get("retryable") is False,
        )

    def _load(self) -> None:
        fast = _FAST.match
        index = self._index
        offset = 0
        good_end = 0  # end of the last valid line: everything after it is a torn tail
        bad = 0
        with open(self._fd, "rb", closefd=False, buffering=1 << 20) as f:
            f.seek(0)
            for line in f:
                start, offset = offset, offset + len(line)
                m = fast(line)
                if m is not None and line.endswith(b"}\n"):
                    raw_path, status, size, mtime, sha = m.groups()
                    # An optional group that did not match although its key is there
                    # (null, odd value) must take the slow path, not be read as absent.
                    if (
                        (size is None and b'"size"' in line)
                        or (mtime is None and b'"mtime_ns"' in line)
                        or (sha is None and b'"sha256"' in line)
                    ):
                        raw_path = None
                    try:
                        path = raw_path.decode("utf-8") if raw_path is not None else None
                    except UnicodeDecodeError:
                        path = None
                    if path is not None:
                        index(
                            start,
                            path,
                            status.decode("ascii"),
                            int(size) if size is not None else None,
                            int(mtime) if mtime is not None else None,
                            sha.decode("ascii") if sha is not None else None,
                            b'"retryable":false' in line,
                        )
                        good_end = offset
                        continue
                if not line.strip():
                    good_end = offset
                    continue
                data = _parse(line)
                if data is not None:
                    self._index_slow(start, data)
                    good_end = offset
                    continue
                if line.endswith(b"\n"):
                    bad += 1
                    if bad <= _MAX_LINE_WARNINGS:
                        log.warning(
                            "ledger_line_invalid",
                            ledger=str(self.path),
                            offset=start,
                            excerpt=line[:80].decode("utf-8", "replace"),
                        )
        if bad > _MAX_LINE_WARNINGS:
            log.warning("ledger_lines_invalid", ledger=str(self.path), count=bad)
        if good_end < offset:
            self._repair(good_end, offset)
        elif offset and os.pread(self._fd, 1, offset - 1) != b"\n":
            # The last record is whole JSON and lacks only its newline: complete it.
            _write_all(self._fd, b"\n")
            os.fsync(self._fd)
            good_end = offset + 1
        self._size = good_end

    def _repair(self, good_end: int, end: int) -> None:
        torn = os.pread(self._fd, end - good_end, good_end)
        torn_path = self.path.with_name(self.path.name + ".torn")
        fd = os.open(torn_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, torn if torn.endswith(b"\n") else torn + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.ftruncate(self._fd, good_end)
        os.fsync(self._fd)
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
                    os.ftruncate(self._fd, self._size)
                    self._dirty = False
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as e:
                self._dirty = True
                try:
                    os.ftruncate(self._fd, self._size)
                    self._dirty = False
                except OSError:
                    pass  # retried before the next append
                raise LedgerError(f"cannot write ledger {self.path}: {e.strerror or e}") from e
            offset = self._size
            self._size += len(data)
            self._index(
                offset,
                record.path,
                record.status,
                record.size,
                record.mtime_ns,
                record.sha256,
                record.retryable is False,
            )

    # -- reading ------------------------------------------------------------------------------

    def _read_at(self, offset: int) -> dict[str, Any] | None:
        chunk = b""
        while True:
            more = os.pread(self._fd, 4096, offset + len(chunk))
            chunk += more
            end = chunk.find(b"\n")
            if end >= 0:
                return _parse(chunk[:end])
            if not more:
                return _parse(chunk)

    def last_for_path(self, path: str) -> Record | None:
        """The latest record of any status for `path`, or None."""
        with self._lock:
            entry = self._by_path.get(_key(path))
        if entry is None:
            return None
        data = self._read_at(_PATH_ENTRY.unpack(entry)[0])
        if data is None or data["path"] != path:
            return None
        return Record.from_dict(data)

    def uploaded_with_sha256(self, sha256: str) -> Record | None:
        """The first 'uploaded' record with this content, to point a duplicate at."""
        with self._lock:
            offset = self._by_sha.get(_key(sha256))
        if offset is None:
            return None
        data = self._read_at(offset)
        if data is None or data.get("sha256") != sha256:
            return None
        return Record.from_dict(data)

    def is_done(self, path: str, size: int, mtime_ns: int) -> bool:
        """True if the latest record for `path` is uploaded, rejected or failed for good, at this
        size+mtime_ns: catch-up and rescans leave such a file alone."""
        with self._lock:
            entry = self._by_path.get(_key(path))
            if entry is None:
                return False
            _, sid, flags, esize, emtime = _PATH_ENTRY.unpack(entry)
            status = self._statuses[sid]
        return (
            (status in ("uploaded", "rejected") or (status == "failed" and bool(flags & 4)))
            and flags & 3 == 3
            and esize == size
            and emtime == mtime_ns
        )

    def records(self, status: str | None = None) -> Iterator[Record]:
        """Stream every valid record in file order (optionally one status), skipping bad lines."""
        with self._lock:
            end = self._size
        return read_records(self.path, status, end=end)

    def counts(self) -> dict[str, int]:
        """status -> number of paths whose latest record has that status."""
        with self._lock:
            return {s: n for s, n in zip(self._statuses, self._counts, strict=True) if n}

    def close(self) -> None:
        """Release the file; further appends raise LedgerError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
