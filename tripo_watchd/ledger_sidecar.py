"""The index sidecar (<ledger>.idx): checksummed chunks, replayed at open, appended later."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from array import array
from collections import deque
from pathlib import Path

import structlog

from .ledger_index import HASH_MASK, PATH_ENTRY, LedgerIndex

log = structlog.get_logger("tripo_watchd.ledger")

# The index sidecar (<ledger>.idx) lets a restart skip parsing: after a header naming the
# ledger's inode, a sequence of chunks, each digesting the records of one byte range of the
# ledger in file order (path, index entry, sha key); replaying them rebuilds the index. A chunk
# is used only if it starts where the previous one ended, its payload CRC matches, and the
# ledger still holds its range (length and a CRC of the bytes before its end). Anything else
# ends the replay there and the rest of the ledger is parsed as usual.
MAGIC = b"tripo-watchd ledger index v2\n"
HEADER = struct.Struct("<QQ")  # st_dev, st_ino of the ledger
# b"CHNK", start, end, records, len(statuses JSON), len(paths), sha pairs, big upload sizes,
# CRCs of the payload and of the ledger's last TAIL bytes before `end`
CHUNK = struct.Struct("<4sQQQQQQQII")
TAIL = 256


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _tail_crc(ledger_fd: int, end: int) -> int:
    return zlib.crc32(os.pread(ledger_fd, min(TAIL, end), end - min(TAIL, end)))


class Sidecar:
    """One ledger's sidecar: replay it into an index at open, then append a chunk per flush.

    It only saves time: any failure stops writing it for this run and never fails the ledger.
    """

    def __init__(self, ledger_path: Path, ledger_fd: int) -> None:
        self.path = ledger_path.with_name(ledger_path.name + ".idx")
        self._ledger = str(ledger_path)
        self._ledger_fd = ledger_fd
        self._fd: int | None = None
        self._tmp: Path | None = None  # a sidecar being built, renamed by commit()
        self.start = 0  # ledger offset where the last chunk ends

    def open(self, index: LedgerIndex) -> int:
        """Replay the sidecar's valid chunks into `index`; return the ledger offset covered.

        Leaves the sidecar open to append further chunks: cut after its last valid chunk, or
        a fresh one (renamed into place by commit()) if it was unusable.
        """
        st = os.fstat(self._ledger_fd)
        header = MAGIC + HEADER.pack(st.st_dev, st.st_ino)
        covered = 0
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            self.failed(e)
            return 0
        if fd >= 0:
            try:
                if os.pread(fd, len(header), 0) == header:
                    covered, idx_end = self._replay(index, fd, len(header), st.st_size)
                    os.ftruncate(fd, idx_end)
                    os.lseek(fd, idx_end, os.SEEK_SET)
                    self._fd = fd
                    self.start = covered
                    return covered
            except (OSError, ValueError, TypeError) as e:
                # A chunk passed its checks and still did not replay: start over from scratch.
                log.warning("ledger_index_unusable", ledger=self._ledger, reason=str(e))
                index.reset()
                covered = 0
            os.close(fd)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self._fd = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            _write(self._fd, header)
        except OSError as e:
            self.failed(e)
        return covered

    def _replay(self, index: LedgerIndex, fd: int, pos: int, ledger_size: int) -> tuple[int, int]:
        """Apply the chunks from `pos`; return (ledger offset covered, sidecar end)."""
        covered = 0
        by_path, by_sha, mask = index.by_path, index.by_sha, HASH_MASK
        width = PATH_ENTRY.size
        while True:
            raw = os.pread(fd, CHUNK.size, pos)
            if len(raw) < CHUNK.size:
                return covered, pos
            tag, start, end, n, slen, plen, nsha, nbig, crc, tail_crc = CHUNK.unpack(raw)
            size = slen + plen + n * width + nsha * 16 + nbig * 8
            if tag != b"CHNK" or start != covered or end < start or end > ledger_size:
                return covered, pos
            payload = os.pread(fd, size, pos + CHUNK.size)
            if len(payload) != size or zlib.crc32(payload) != crc:
                return covered, pos
            if _tail_crc(self._ledger_fd, end) != tail_crc:
                return covered, pos
            statuses = json.loads(payload[:slen])
            known = index.statuses
            if statuses[: len(known)] != known[: len(statuses)]:
                return covered, pos
            for status in statuses[len(known) :]:
                index.status_id(status)
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
            index.note_big_sizes(bigs)
            covered = end
            pos += CHUNK.size + size

    def flush(self, index: LedgerIndex, end: int) -> None:
        """Append a chunk for `index.delta` (indexed since the last chunk), up to ledger `end`."""
        delta = index.delta
        n = len(delta.paths)
        if self._fd is not None and (n or end > self.start):
            paths = b"\0".join(delta.paths)
            if paths.count(b"\0") != max(n - 1, 0):  # a path holding NUL: not digestible
                self.failed(None)
            else:
                statuses = json.dumps(index.statuses).encode()
                payload = b"".join(
                    (
                        statuses,
                        paths,
                        *delta.entries,
                        delta.sha_keys.tobytes(),
                        delta.sha_offsets.tobytes(),
                        delta.big_sizes.tobytes(),
                    )
                )
                try:
                    head = CHUNK.pack(
                        b"CHNK",
                        self.start,
                        end,
                        n,
                        len(statuses),
                        len(paths),
                        len(delta.sha_keys),
                        len(delta.big_sizes),
                        zlib.crc32(payload),
                        _tail_crc(self._ledger_fd, end),
                    )
                    _write(self._fd, head + payload)
                except OSError as e:  # the sidecar only saves time: never fail the ledger
                    self.failed(e)
        self.start = end
        delta.clear()

    def commit(self) -> None:
        """Rename a sidecar built from scratch during open into place."""
        if self._tmp is not None and self._fd is not None:
            try:
                os.replace(self._tmp, self.path)
            except OSError as e:
                self.failed(e)
            self._tmp = None

    def failed(self, error: OSError | None) -> None:
        """Stop writing the sidecar for this run; its chunks so far stay valid."""
        if error is not None:
            log.warning("ledger_index_not_saved", ledger=self._ledger, reason=str(error))
        self.close()

    def close(self) -> None:
        """Close the sidecar, removing one still being built."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
