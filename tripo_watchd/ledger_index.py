"""The ledger's compact in-memory index: packed per-path entries, sha offsets, big sizes, counts."""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Iterable
from typing import Any

# Index keys are 60-bit string hashes instead of the strings themselves: a million paths as
# str keys alone cost ~130 MB. A collision (p ~ 1e-6 at 1e6 paths) is caught where a record is
# read back (its path/sha256 is compared); is_done would additionally need equal size+mtime_ns.
HASH_MASK = (1 << 60) - 1

# Per path: offset of its latest line, status id, flags (1: size set, 2: mtime set, 4: failed
# for good), size, mtime. Byte 8 of an entry is its status id.
PATH_ENTRY = struct.Struct("<QBBqq")

# Sizes of uploaded records at least this big are kept, so the pipeline can tell that a big
# file cannot be a duplicate without hashing it first. 5 MiB is the smallest multipart
# threshold config allows, so every file the pipeline streams is covered.
BIG_UPLOAD_BYTES = 5 * 1024 * 1024
BIG_DIGITS = len(str(BIG_UPLOAD_BYTES))
UNKNOWN_SIZE = (1 << 64) - 1  # an uploaded record without a size: it may be any size


def path_key(text: str) -> int:
    """A path's index key (per-process: hash() is seeded)."""
    return hash(text) & HASH_MASK


def sha_key(sha256: str | bytes) -> int:
    """A sha256's index key, the same in every process (the sidecar stores them)."""
    # Its leading hex digits: already uniform. Odd values cannot collide with real ones.
    raw = sha256 if isinstance(sha256, bytes) else sha256.encode("utf-8", "surrogatepass")
    try:
        return int(raw[:15], 16)
    except ValueError:
        return zlib.crc32(raw) | 1 << 60


class Delta:
    """What was indexed since the sidecar's last chunk, in file order, for its next chunk."""

    def __init__(self) -> None:
        self.paths: list[bytes] = []
        self.entries: list[bytes] = []
        self.sha_keys: array[int] = array("Q")
        self.sha_offsets: array[int] = array("Q")
        self.big_sizes: array[int] = array("Q")

    def clear(self) -> None:
        self.paths.clear()
        self.entries.clear()
        del self.sha_keys[:]
        del self.sha_offsets[:]
        del self.big_sizes[:]


class LedgerIndex:
    """Latest entry per path, first upload per sha256, big upload sizes and per-status counts.

    Not thread-safe: the owning ledger holds its lock around every call. Attributes are public
    so the open-time scan and the sidecar replay can fill them in bulk.
    """

    def __init__(self, max_big_sizes: int) -> None:
        self.statuses: list[str] = []
        self.status_ids: dict[str, int] = {}
        self.by_path: dict[int, bytes] = {}
        self.by_sha: dict[int, int] = {}
        # Sizes >= BIG_UPLOAD_BYTES of uploaded records; None: too many to keep, assume any.
        self.big_sizes: set[int] | None = set()
        # More distinct big sizes than this and the set is dropped: every big size "may" be
        # uploaded (callers hash first, as without the set), so memory stays bounded.
        self.max_big_sizes = max_big_sizes
        self.counts: list[int] = []
        self.delta = Delta()

    def status_id(self, status: str) -> int:
        """The small id of `status`, assigning the next one to a status not seen before."""
        sid = self.status_ids.get(status)
        if sid is None:
            sid = len(self.statuses)
            self.statuses.append(status)
            self.status_ids[status] = sid
            self.counts.append(0)
        return sid

    def add(
        self,
        offset: int,
        path: str,
        status: str,
        size: int | None,
        mtime_ns: int | None,
        sha256: str | None,
        final: bool = False,
    ) -> None:
        """Index the record at ledger `offset`, keeping counts up to date."""
        sid = self.status_id(status)
        pkey = path_key(path)
        old = self.by_path.get(pkey)
        if old is not None:
            self.counts[old[8]] -= 1
        self.counts[sid] += 1
        flags = (size is not None) | ((mtime_ns is not None) << 1) | (final << 2)
        entry = PATH_ENTRY.pack(offset, sid, flags, size or 0, mtime_ns or 0)
        self.by_path[pkey] = entry
        delta = self.delta
        delta.paths.append(path.encode("utf-8", "surrogatepass"))
        delta.entries.append(entry)
        if status == "uploaded" and (size is None or size >= BIG_UPLOAD_BYTES):
            big = UNKNOWN_SIZE if size is None else size
            delta.big_sizes.append(big)
            self.note_big_sizes((big,))
        if status == "uploaded" and sha256:
            skey = sha_key(sha256)
            self.by_sha.setdefault(skey, offset)
            delta.sha_keys.append(skey)
            delta.sha_offsets.append(offset)

    def add_parsed(self, offset: int, data: dict[str, Any]) -> None:
        """Index a record parsed by json (see ledger_lines.parse_line), ignoring odd values."""
        size, mtime_ns, sha = data.get("size"), data.get("mtime_ns"), data.get("sha256")
        self.add(
            offset,
            data["path"],
            data["status"],
            size if isinstance(size, int) else None,
            mtime_ns if isinstance(mtime_ns, int) else None,
            sha if isinstance(sha, str) else None,
            data.get("retryable") is False,
        )

    def note_big_sizes(self, sizes: Iterable[int]) -> None:
        """Add sizes of big uploads to the set, dropping it when it grows past its bound."""
        if self.big_sizes is not None:
            self.big_sizes.update(sizes)
            if len(self.big_sizes) > self.max_big_sizes:
                self.big_sizes = None

    def reset(self) -> None:
        """Forget every path, sha and size (statuses and the delta stay)."""
        self.by_path.clear()
        self.by_sha.clear()
        self.big_sizes = set()

    def recount(self) -> None:
        """Recompute the per-status counts from the entries (after a bulk fill)."""
        counts = [0] * len(self.statuses)
        for entry in self.by_path.values():
            counts[entry[8]] += 1
        self.counts = counts

    def offset_for_path(self, path: str) -> int | None:
        """Ledger offset of the latest line for `path` (or a colliding one), or None."""
        entry = self.by_path.get(path_key(path))
        return None if entry is None else int(PATH_ENTRY.unpack(entry)[0])

    def offset_for_sha(self, sha256: str) -> int | None:
        """Ledger offset of the first upload with this sha256 (or a colliding one), or None."""
        return self.by_sha.get(sha_key(sha256))

    def may_hold_upload_of_size(self, size: int) -> bool:
        """False only if no big upload has this size; sizes below the threshold are untracked."""
        if size < BIG_UPLOAD_BYTES:
            return True
        sizes = self.big_sizes
        return sizes is None or size in sizes or UNKNOWN_SIZE in sizes

    def is_done(self, path: str, size: int, mtime_ns: int) -> bool:
        """True if `path` is uploaded, rejected or failed for good at this size+mtime_ns."""
        entry = self.by_path.get(path_key(path))
        if entry is None:
            return False
        _, sid, flags, esize, emtime = PATH_ENTRY.unpack(entry)
        status = self.statuses[sid]
        return (
            (status in ("uploaded", "rejected") or (status == "failed" and bool(flags & 4)))
            and flags & 3 == 3
            and esize == size
            and emtime == mtime_ns
        )

    def count_map(self) -> dict[str, int]:
        """status -> number of paths whose latest record has that status."""
        return {s: n for s, n in zip(self.statuses, self.counts, strict=True) if n}
