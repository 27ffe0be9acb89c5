"""The ledger record: one outcome of one file, as written to the JSON Lines ledger."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

STATUSES = ("uploaded", "rejected", "failed")


def utc_now() -> str:
    """RFC 3339 UTC timestamp with milliseconds, as the ledger writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Record:
    """One outcome of one file; fields that do not apply stay None and are not written."""

    path: str
    status: str
    at: str = field(default_factory=utc_now)
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    format: str | None = None
    protocol: str | None = None
    bucket: str | None = None
    key: str | None = None
    uri: str | None = None
    file_token: str | None = None
    task_file: dict[str, Any] | None = None
    endpoint: str | None = None
    trace_id: str | None = None
    attempts: int | None = None
    seconds: float | None = None
    duplicate_of: str | None = None
    reason: str | None = None
    retryable: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies and costs ~0.3 ms per record.
        return {name: v for name in _FIELD_NAMES if (v := getattr(self, name)) is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


_FIELD_NAMES = tuple(f.name for f in fields(Record))
