"""Open-time parse of ledger lines into the index: a regex fast path, json for everything else."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import structlog

from .ledger_index import (
    BIG_DIGITS,
    BIG_UPLOAD_BYTES,
    HASH_MASK,
    PATH_ENTRY,
    UNKNOWN_SIZE,
    LedgerIndex,
    sha_key,
)
from .ledger_lines import STATUS, parse_line

log = structlog.get_logger("tripo_watchd.ledger")

BLOCK = 1 << 20
MAX_LINE_WARNINGS = 20


class Scan:
    """Index one ledger's lines from an offset on, counting (and warning about) invalid ones."""

    def __init__(self, ledger: str, fd: int, index: LedgerIndex) -> None:
        self._ledger = ledger
        self._fd = fd
        self._index = index
        self.bad = 0  # invalid lines seen

    def _slow_line(self, start: int, line: bytes) -> bool:
        """Index one line the fast path did not take; False if it is not a record."""
        if not line.strip():
            return True
        data = parse_line(line)
        if data is not None:
            self._index.add_parsed(start, data)
            return True
        if line.endswith(b"\n"):
            self.bad += 1
            if self.bad <= MAX_LINE_WARNINGS:
                log.warning(
                    "ledger_line_invalid",
                    ledger=self._ledger,
                    offset=start,
                    excerpt=line[:80].decode("utf-8", "replace"),
                )
        return False

    def run(
        self,
        base: int,
        fast: re.Pattern[bytes],
        flush_every: int,
        flush: Callable[[int], None],
    ) -> tuple[int, int]:
        """Index every line from ledger offset `base`; return (end of last valid line, EOF).

        `fast` matches the writer's own lines; `flush(end)` is called whenever `flush_every`
        records are waiting in the index's delta. Counts are recomputed once at the end.
        """
        # The hot loop works on big blocks without slicing out lines, and inlines
        # LedgerIndex.add.
        index = self._index
        match = fast.match
        pack = PATH_ENTRY.pack
        mask = HASH_MASK
        by_path, by_sha = index.by_path, index.by_sha
        delta = index.delta
        dpaths, dentries = delta.paths, delta.entries
        dsha_keys, dsha_offsets = delta.sha_keys, delta.sha_offsets
        dbig_sizes = delta.big_sizes
        sids: dict[bytes, int] = {}
        uploaded = index.status_id("uploaded")
        good_end = base  # end of the last valid line: everything after it is a torn tail
        carry = b""
        while True:
            chunk = os.pread(self._fd, BLOCK, base + len(carry))
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
                    if sid is None and STATUS.fullmatch(status):
                        sid = sids[status] = index.status_id(status.decode("ascii"))
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
                            or (len(size) >= BIG_DIGITS and int(size) >= BIG_UPLOAD_BYTES)
                        ):
                            big = UNKNOWN_SIZE if size is None else int(size)
                            dbig_sizes.append(big)
                            index.note_big_sizes((big,))
                        if sid == uploaded and sha is not None:
                            try:
                                skey = int(sha[:15], 16)
                            except ValueError:
                                skey = sha_key(sha)
                            if skey not in by_sha:
                                by_sha[skey] = start
                            dsha_keys.append(skey)
                            dsha_offsets.append(start)
                        pos = nl + 1
                        good_end = base + pos
                        continue
                if self._slow_line(base + pos, block[pos : nl + 1]):
                    good_end = base + nl + 1
                pos = nl + 1
            carry = block[pos:]
            base += pos
            if len(dpaths) >= flush_every:
                flush(good_end)
        offset = base + len(carry)
        if carry and self._slow_line(base, carry):
            good_end = offset
        if self.bad > MAX_LINE_WARNINGS:
            log.warning("ledger_lines_invalid", ledger=self._ledger, count=self.bad)
        index.recount()
        return good_end, offset
