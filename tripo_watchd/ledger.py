"""JSON Lines ledger: append durably, index for dedupe and catch-up, repair a torn tail."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import threading
import zlib
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
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
# Values are matched as [^"]* (sre's fastest loop, about twice as fast as a character class)
# and checked in Python: a backslash (an escape) or a sha256 that is not 64 characters long
# sends the line to the slow path.
_FAST = re.compile(
    rb'\{"path":"([^"]*)","status":"([^"]*)","at":"[^"\\]*"'
    rb'(?:,"size":(\d+))?(?:,"mtime_ns":(-?\d+))?(?:,"sha256":"([^"]*)")?[,}]'
)
_STATUS = re.compile(rb"[a-z_]+")

_BLOCK = 1 << 20

# The index sidecar (<ledger>.idx) lets a restart skip parsing: after a header naming the
# ledger's inode, a sequence of chunks, each digesting the records of one byte range of the
# ledger in file order (path, index entry, sha key); replaying them rebuilds the index. A chunk
# is used only if it starts where the previous one ended, its payload CRC matches, and the
# ledger still holds its range (length and a CRC of the bytes before its end). Anything else
# ends the replay there and the rest of the ledger is parsed as usual.
_IDX_MAGIC = b"tripo-watchd ledger index v2\n"
_IDX_HEADER = struct.Struct("<QQ")  # st_dev, st_ino of the ledger
# b"CHNK", start, end, records, len(statuses JSON), len(paths), sha pairs, big upload sizes,
# CRCs of the payload and of the ledger's last _TAIL bytes before `end`
_IDX_CHUNK = struct.Struct("<4sQQQQQQQII")
_TAIL = 256
_FLUSH_RECORDS = 1 << 14

_MAX_LINE_WARNINGS = 20

# Sizes of uploaded records at least this big are kept, so the pipeline can tell that a big
# file cannot be a duplicate without hashing it first. 5 MiB is the smallest multipart
# threshold config allows, so every file the pipeline streams is covered.
BIG_UPLOAD_BYTES = 5 * 1024 * 1024
_BIG_DIGITS = len(str(BIG_UPLOAD_BYTES))
_UNKNOWN_SIZE = (1 << 64) - 1  # an uploaded record without a size: it may be any size
# More distinct big sizes than this and the set is dropped: every big size "may" be uploaded
# (callers hash first, as without the set), so memory stays bounded whatever the ledger holds.
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


def _key(text: str) -> int:
    return hash(text) & _HASH_MASK


def _sha_key(sha256: str | bytes) -> int:
    # Its leading hex digits: already uniform, and the same in every process, which the index
    # sidecar needs (hash() is seeded per process). Odd values cannot collide with real ones.
    raw = sha256 if isinstance(sha256, bytes) else sha256.encode("utf-8", "surrogatepass")
    try:
        return int(raw[:15], 16)
    except ValueError:
        return zlib.crc32(raw) | 1 << 60


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


def _write_sidecar(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
        self._statuses: list[str] = []
        self._status_ids: dict[str, int] = {}
        self._by_path: dict[int, bytes] = {}
        self._by_sha: dict[int, int] = {}
        # Sizes >= BIG_UPLOAD_BYTES of uploaded records; None: too many to keep, assume any.
        self._big_sizes: set[int] | None = set()
        self._counts: list[int] = []
        self._size = 0  # end of the last complete, fsync'd line
        self._written = 0  # end of the last complete line written; fsync'd up to _size
        self._pending: deque[tuple[int, int, Record]] = deque()  # (start, end, record)
        self._syncing = False  # a leader is in fsync with the lock released
        self._epoch = 0  # bumped when a failed fsync discards the lines past _size
        # ended epoch -> (_size when it ended, why): settles the appends still waiting on it
        self._epoch_ends: dict[int, tuple[int, str]] = {}
        self._dirty = False  # a failed write may have left bytes past _written
        self._bad = 0  # invalid lines seen at open
        # Records indexed since the sidecar's last chunk, which ends at ledger offset _dstart.
        self._dpaths: list[bytes] = []
        self._dentries: list[bytes] = []
        self._dsha_keys: array[int] = array("Q")
        self._dsha_offsets: array[int] = array("Q")
        self._dbig_sizes: array[int] = array("Q")
        self._dstart = 0
        self._idx_fd: int | None = None
        self._idx_tmp: Path | None = None  # a sidecar being built, renamed at the end of open
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
            self._drop_sidecar()
            os.close(self._fd)
            raise LedgerError(f"cannot read ledger {self.path}: {e.strerror}") from e
        self._written = self._size

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
        entry = _PATH_ENTRY.pack(offset, sid, flags, size or 0, mtime_ns or 0)
        self._by_path[pkey] = entry
        self._dpaths.append(path.encode("utf-8", "surrogatepass"))
        self._dentries.append(entry)
        if status == "uploaded" and (size is None or size >= BIG_UPLOAD_BYTES):
            big = _UNKNOWN_SIZE if size is None else size
            self._dbig_sizes.append(big)
            self._note_big_sizes((big,))
        if status == "uploaded" and sha256:
            skey = _sha_key(sha256)
            self._by_sha.setdefault(skey, offset)
            self._dsha_keys.append(skey)
            self._dsha_offsets.append(offset)

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

    def _load_line(self, start: int, line: bytes) -> bool:
        """Index one line the fast path did not take; False if it is not a record."""
        if not line.strip():
            return True
        data = _parse(line)
        if data is not None:
            self._index_slow(start, data)
            return True
        if line.endswith(b"\n"):
            self._bad += 1
            if self._bad <= _MAX_LINE_WARNINGS:
                log.warning(
                    "ledger_line_invalid",
                    ledger=str(self.path),
                    offset=start,
                    excerpt=line[:80].decode("utf-8", "replace"),
                )
        return False

    def _load(self) -> None:
        # The hot loop works on big blocks without slicing out lines, and inlines _index;
        # counts are recomputed from the index once at the end.
        match = _FAST.match
        pack = _PATH_ENTRY.pack
        mask = _HASH_MASK
        by_path, by_sha = self._by_path, self._by_sha
        dpaths, dentries = self._dpaths, self._dentries
        dsha_keys, dsha_offsets = self._dsha_keys, self._dsha_offsets
        dbig_sizes = self._dbig_sizes
        sids: dict[bytes, int] = {}
        uploaded = self._status_id("uploaded")
        base = self._open_sidecar()  # file offset of block[0]
        good_end = base  # end of the last valid line: everything after it is a torn tail
        carry = b""
        while True:
            chunk = os.pread(self._fd, _BLOCK, base + len(carry))
            if not chunk:
                break
            block = carry + chunk if carry else chunk
            find = block.find
            pos = 0
            while (nl := find(b"\n", pos)) >= 0:
                m = match(block, pos, nl)
                if m is not None and block[nl - 1] == 0x7D:  # "}"
                    raw_path, status, size, mtime, sha = m.groups()
                    # An optional group that did not match although its key is there
                    # (null, odd value) must take the slow path, not be read as absent.
                    sid = sids.get(status)
                    if sid is None and _STATUS.fullmatch(status):
                        sid = sids[status] = self._status_id(status.decode("ascii"))
                    if (
                        sid is None
                        or b"\\" in raw_path
                        or (size is None and find(b'"size"', pos, nl) >= 0)
                        or (mtime is None and find(b'"mtime_ns"', pos, nl) >= 0)
                        or (sha is None and find(b'"sha256"', pos, nl) >= 0)
                        or (sha is not None and (len(sha) != 64 or b"\\" in sha))
                    ):
                        path = None
                    else:
                        try:
                            path = raw_path.decode("utf-8")
                        except UnicodeDecodeError:
                            path = None
                    if path is not None:
                        start = base + pos
                        flags = (size is not None) | ((mtime is not None) << 1)
                        # Only "failed" reads the flag; uploads skip scanning for it.
                        if sid != uploaded and find(b'"retryable":false', pos, nl) >= 0:
                            flags |= 4
                        entry = by_path[hash(path) & mask] = pack(
                            start,
                            sid,
                            flags,
                            int(size) if size is not None else 0,
                            int(mtime) if mtime is not None else 0,
                        )
                        dpaths.append(raw_path)
                        dentries.append(entry)
                        if sid == uploaded and (
                            size is None
                            or (len(size) >= _BIG_DIGITS and int(size) >= BIG_UPLOAD_BYTES)
                        ):
                            big = _UNKNOWN_SIZE if size is None else int(size)
                            dbig_sizes.append(big)
                            self._note_big_sizes((big,))
                        if sid == uploaded and sha is not None:
                            try:
                                skey = int(sha[:15], 16)
                            except ValueError:
                                skey = _sha_key(sha)
                            if skey not in by_sha:
                                by_sha[skey] = start
                            dsha_keys.append(skey)
                            dsha_offsets.append(start)
                        pos = nl + 1
                        good_end = base + pos
                        continue
                if self._load_line(base + pos, block[pos : nl + 1]):
                    good_end = base + nl + 1
                pos = nl + 1
            carry = block[pos:]
            base += pos
            if len(dpaths) >= _FLUSH_RECORDS:
                self._flush_digest(good_end)
        offset = base + len(carry)
        if carry and self._load_line(base, carry):
            good_end = offset
        if self._bad > _MAX_LINE_WARNINGS:
            log.warning("ledger_lines_invalid", ledger=str(self.path), count=self._bad)
        counts = [0] * len(self._statuses)
        for entry in by_path.values():
            counts[entry[8]] += 1
        self._counts = counts
        if good_end < offset:
            self._repair(good_end, offset)
        elif offset and os.pread(self._fd, 1, offset - 1) != b"\n":
            # The last record is whole JSON and lacks only its newline: complete it.
            _write_all(self._fd, b"\n")
            _fsync(self._fd)
            good_end = offset + 1
        self._size = good_end
        self._flush_digest(good_end)
        if self._idx_tmp is not None and self._idx_fd is not None:
            try:
                os.replace(self._idx_tmp, self._idx_path)
            except OSError as e:
                self._sidecar_failed(e)
            self._idx_tmp = None

    # -- index sidecar ------------------------------------------------------------------------

    @property
    def _idx_path(self) -> Path:
        return self.path.with_name(self.path.name + ".idx")

    def _open_sidecar(self) -> int:
        """Replay the sidecar's valid chunks; return the ledger offset they cover up to.

        Leaves _idx_fd open to append further chunks: the sidecar cut after its last valid
        chunk, or a fresh one (renamed into place at the end of open) if it was unusable.
        """
        st = os.fstat(self._fd)
        header = _IDX_MAGIC + _IDX_HEADER.pack(st.st_dev, st.st_ino)
        covered = 0
        try:
            fd = os.open(self._idx_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            self._sidecar_failed(e)
            return 0
        if fd >= 0:
            try:
                if os.pread(fd, len(header), 0) == header:
                    covered, idx_end = self._replay(fd, len(header), st.st_size)
                    os.ftruncate(fd, idx_end)
                    os.lseek(fd, idx_end, os.SEEK_SET)
                    self._idx_fd = fd
                    self._dstart = covered
                    return covered
            except (OSError, ValueError, TypeError) as e:
                # A chunk passed its checks and still did not replay: start over from scratch.
                log.warning("ledger_index_unusable", ledger=str(self.path), reason=str(e))
                self._reset_index()
                covered = 0
            os.close(fd)
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + ".tmp")
        try:
            self._idx_fd = os.open(
                self._idx_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            _write_sidecar(self._idx_fd, header)
        except OSError as e:
            self._sidecar_failed(e)
        return covered

    def _reset_index(self) -> None:
        self._by_path.clear()
        self._by_sha.clear()
        self._big_sizes = set()

    def _note_big_sizes(self, sizes: Iterable[int]) -> None:
        """Add sizes of big uploads to the set, dropping it when it grows past its bound."""
        if self._big_sizes is not None:
            self._big_sizes.update(sizes)
            if len(self._big_sizes) > _MAX_BIG_SIZES:
                self._big_sizes = None

    def _replay(self, fd: int, pos: int, ledger_size: int) -> tuple[int, int]:
        """Apply the sidecar's chunks from `pos`; return (ledger offset covered, sidecar end)."""
        covered = 0
        by_path, by_sha, mask = self._by_path, self._by_sha, _HASH_MASK
        width = _PATH_ENTRY.size
        while True:
            raw = os.pread(fd, _IDX_CHUNK.size, pos)
            if len(raw) < _IDX_CHUNK.size:
                return covered, pos
            tag, start, end, n, slen, plen, nsha, nbig, crc, tail_crc = _IDX_CHUNK.unpack(raw)
            size = slen + plen + n * width + nsha * 16 + nbig * 8
            if tag != b"CHNK" or start != covered or end < start or end > ledger_size:
                return covered, pos
            payload = os.pread(fd, size, pos + _IDX_CHUNK.size)
            if len(payload) != size or zlib.crc32(payload) != crc:
                return covered, pos
            tail = os.pread(self._fd, min(_TAIL, end), end - min(_TAIL, end))
            if zlib.crc32(tail) != tail_crc:
                return covered, pos
            statuses = json.loads(payload[:slen])
            known = self._statuses
            if statuses[: len(known)] != known[: len(statuses)]:
                return covered, pos
            for status in statuses[len(known) :]:
                self._status_id(status)
            paths = payload[slen : slen + plen].decode("utf-8", "surrogatepass").split("\0")
            entries = payload[slen + plen : slen + plen + n * width]
            if n and len(paths) != n:
                return covered, pos
            if n:
                by_path.update(
                    zip(
                        [hash(p) & mask for p in paths],
                        [entries[i : i + width] for i in range(0, n * width, width)],
                        strict=True,
                    )
                )
            keys, offsets, bigs = array("Q"), array("Q"), array("Q")
            at = slen + plen + n * width
            keys.frombytes(payload[at : at + nsha * 8])
            offsets.frombytes(payload[at + nsha * 8 : at + nsha * 16])
            bigs.frombytes(payload[at + nsha * 16 :])
            # setdefault: the first upload of a content wins, as when parsing.
            deque(map(by_sha.setdefault, keys, offsets), maxlen=0)
            self._note_big_sizes(bigs)
            covered = end
            pos += _IDX_CHUNK.size + size

    def _flush_digest(self, end: int) -> None:
        """Append a chunk for the records indexed since the last one, up to ledger `end`."""
        n = len(self._dpaths)
        if self._idx_fd is not None and (n or end > self._dstart):
            paths = b"\0".join(self._dpaths)
            if paths.count(b"\0") != max(n - 1, 0):  # a path holding NUL: not digestible
                self._sidecar_failed(None)
            else:
                statuses = json.dumps(self._statuses).encode()
                payload = b"".join(
                    (
                        statuses,
                        paths,
                        *self._dentries,
                        self._dsha_keys.tobytes(),
                        self._dsha_offsets.tobytes(),
                        self._dbig_sizes.tobytes(),
                    )
                )
                try:
                    tail = os.pread(self._fd, min(_TAIL, end), end - min(_TAIL, end))
                    head = _IDX_CHUNK.pack(
                        b"CHNK",
                        self._dstart,
                        end,
                        n,
                        len(statuses),
                        len(paths),
                        len(self._dsha_keys),
                        len(self._dbig_sizes),
                        zlib.crc32(payload),
                        zlib.crc32(tail),
                    )
                    _write_sidecar(self._idx_fd, head + payload)
                except OSError as e:  # the sidecar only saves time: never fail the ledger
                    self._sidecar_failed(e)
        self._dstart = end
        self._dpaths.clear()
        self._dentries.clear()
        del self._dsha_keys[:]
        del self._dsha_offsets[:]
        del self._dbig_sizes[:]

    def _sidecar_failed(self, error: OSError | None) -> None:
        """Stop writing the sidecar for this run; its chunks so far stay valid."""
        if error is not None:
            log.warning("ledger_index_not_saved", ledger=str(self.path), reason=str(error))
        self._drop_sidecar()

    def _drop_sidecar(self) -> None:
        if self._idx_fd is not None:
            os.close(self._idx_fd)
            self._idx_fd = None
        if self._idx_tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._idx_tmp)
            self._idx_tmp = None

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
        pending = self._pending
        while pending and pending[0][1] <= target:
            start, _, rec = pending.popleft()
            self._index(
                start,
                rec.path,
                rec.status,
                rec.size,
                rec.mtime_ns,
                rec.sha256,
                rec.retryable is False,
            )
        if len(self._dpaths) >= _FLUSH_RECORDS:
            self._flush_digest(target)

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
            offset = self._by_sha.get(_sha_key(sha256))
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
            sizes = self._big_sizes
            return sizes is None or size in sizes or _UNKNOWN_SIZE in sizes

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
            self._flush_digest(self._size)
            self._drop_sidecar()
            os.close(self._fd)
