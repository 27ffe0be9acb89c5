"""Ledger lines: encode a record, parse a line, stream a ledger's records, the fast-path regex."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import Record

# The writer's own key order (Record.to_dict): path, status, at, size, mtime_ns, sha256, ...
# A line matching this prefix skips json.loads at open; anything else takes the slow path.
# Values are matched as [^"]* (sre's fastest loop, about twice as fast as a character class)
# and checked in Python: a backslash (an escape) or a sha256 that is not 64 characters long
# sends the line to the slow path.
FAST = re.compile(
    rb'\{"path":"([^"]*)","status":"([^"]*)","at":"[^"\\]*"'
    rb'(?:,"size":(\d+))?(?:,"mtime_ns":(-?\d+))?(?:,"sha256":"([^"]*)")?[,}]'
)
STATUS = re.compile(rb"[a-z_]+")


def encode_line(record: Record) -> bytes:
    """One ledger line as UTF-8; names with undecodable bytes (lone surrogates) use \\u escapes."""
    try:
        return (record.to_json() + "\n").encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record.to_dict(), ensure_ascii=True, separators=(",", ":"))
        return (text + "\n").encode("ascii")


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A line's record as a dict with a str path and status, or None if it is not one."""
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
            data = parse_line(line) if line.endswith(b"\n") else None
            if data is not None and (status is None or data["status"] == status):
                yield Record.from_dict(data)
