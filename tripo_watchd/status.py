"""Reading the daemon's status file and saying it in a few lines for a person."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(path: Path) -> dict[str, Any]:
    """The status document; `running` is false when the file is missing or its pid is gone."""
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"running": False, "status_file": str(path), "note": "no status file yet"}
    pid = document.get("pid")
    if document.get("running") and not (isinstance(pid, int) and _alive(pid)):
        document["running"] = False
        document["note"] = "the daemon is not running (it did not stop cleanly)"
    document["status_file"] = str(path)
    return document


def describe(document: dict[str, Any]) -> str:
    """A short human summary of a status document."""
    if not document.get("pid"):
        return f"not running ({document.get('note', 'no status')}; {document['status_file']})"
    state = "running" if document.get("running") else "stopped"
    lines = [
        f"tripo-watchd {state} (pid {document.get('pid')}, since {document.get('started_at')}, "
        f"updated {document.get('updated_at')})",
    ]
    if document.get("note"):
        lines.append(f"  note: {document['note']}")
    if document.get("auth") == "refused":
        lines.append("  PAUSED: the Tripo API key was refused; replace it, it is re-read")
    for root, mode in (document.get("roots") or {}).items():
        lines.append(f"  watching {root} ({mode})")
    lines.append(
        "  queued {queued}, in flight {in_flight}, waiting to settle {pending}".format(
            **{k: document.get(k, 0) for k in ("queued", "in_flight", "pending")}
        )
    )
    lines.append(
        "  this run: uploaded {uploaded}, duplicates {duplicates}, rejected {rejected}, "
        "failed {failed}, {bytes} bytes".format(
            **{
                k: document.get(k, 0)
                for k in ("uploaded", "duplicates", "rejected", "failed", "bytes")
            }
        )
    )
    counts = document.get("ledger_counts") or {}
    if counts:
        lines.append(
            "  ledger: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        )
    if document.get("last_upload"):
        last = document["last_upload"]
        lines.append(f"  last upload: {last.get('path')} at {last.get('at')}")
    if document.get("last_error"):
        lines.append(f"  last error: {document['last_error']}")
    return "\n".join(lines)
