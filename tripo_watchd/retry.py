"""Making failed files eligible for upload again (`tripo-watchd retry-failed`)."""

from __future__ import annotations

from dataclasses import replace

from tripo_watchd.ledger import LedgerBackend
from tripo_watchd.records import Record, utc_now


def queue_failed_again(ledger: LedgerBackend) -> int:
    """Append a retryable marker for every path whose latest record is `failed`; return how many."""
    latest: dict[str, Record] = {}
    for record in ledger.records():
        latest[record.path] = record
    count = 0
    for record in latest.values():
        if record.status == "failed" and record.retryable is not True:
            marker = replace(
                record,
                at=utc_now(),
                retryable=True,
                reason=f"queued again by retry-failed (was: {record.reason})",
            )
            ledger.append(marker)
            count += 1
        elif record.status == "failed":
            count += 1
    return count
