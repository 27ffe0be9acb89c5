"""Tests for the after-outcome hooks: real subprocesses, never blocking uploads."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tripo_watchd.hooks import HookRunner
from tripo_watchd.records import Record


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def writer(out: Path) -> list[str]:
    """A hook writing its stdin and the two variables into `out`."""
    code = (
        "import os, sys, json; data = sys.stdin.read(); "
        f"open({str(out)!r}, 'w').write(json.dumps([data, os.environ['TRIPO_WATCHD_STATUS'], "
        "os.environ['TRIPO_WATCHD_PATH']]))"
    )
    return [sys.executable, "-c", code]


def test_hook_receives_exact_record(tmp_path: Path) -> None:
    """The on_uploaded command gets the record JSON on stdin plus status and path variables."""
    out = tmp_path / "out.json"
    record = Record(path="/in/ü model.glb", status="uploaded", size=3, key="k/1").to_json()
    runner = HookRunner(writer(out), None)
    runner.submit(record, "uploaded")
    runner.close(wait=10)
    stdin, status, path = json.loads(out.read_text())
    assert stdin == record
    assert status == "uploaded" and path == "/in/ü model.glb"


def test_rejected_runs_its_own_command_only(tmp_path: Path) -> None:
    """A rejected file runs on_rejected; statuses without a command run nothing."""
    up, rej = tmp_path / "up.json", tmp_path / "rej.json"
    runner = HookRunner(writer(up), writer(rej))
    runner.submit(Record(path="/in/a.txt", status="rejected").to_json(), "rejected")
    runner.submit(Record(path="/in/b.glb", status="failed").to_json(), "failed")
    runner.close(wait=10)
    assert json.loads(rej.read_text())[1] == "rejected"
    assert not up.exists()


def test_failing_hook_is_logged(events: list[dict[str, Any]]) -> None:
    """A hook exiting non-zero is logged as hook.failed with its exit code and stderr."""
    code = "import sys; sys.stderr.write('boom'); sys.exit(3)"
    runner = HookRunner([sys.executable, "-c", code], None)
    runner.submit(Record(path="/in/a.glb", status="uploaded").to_json(), "uploaded")
    runner.close(wait=10)
    (failed,) = [e for e in events if e["event"] == "hook.failed"]
    assert failed["exit_code"] == 3 and failed["stderr"] == "boom"
    assert failed["path"] == "/in/a.glb"


def test_slow_hook_is_killed_and_never_blocks_submit(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    """A hook over its timeout is killed with its children, and submit returns at once."""
    child_pid = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    runner = HookRunner([sys.executable, "-c", code], None, timeout_seconds=0.5, max_workers=1)
    record = Record(path="/in/a.glb", status="uploaded").to_json()
    started = time.monotonic()
    for _ in range(3):
        runner.submit(record, "uploaded")
    assert time.monotonic() - started < 0.2
    wait_for(lambda: any(e["event"] == "hook.failed" for e in events), timeout=8)
    failed = next(e for e in events if e["event"] == "hook.failed")
    assert "timed out" in failed["reason"]
    pid = int(child_pid.read_text())
    wait_for(lambda: not _alive(pid))
    runner.close(wait=0)


def test_full_queue_drops_the_hook_run(events: list[dict[str, Any]]) -> None:
    """When too many hook runs are waiting, more are dropped and logged, without blocking."""
    code = "import time; time.sleep(60)"
    runner = HookRunner([sys.executable, "-c", code], None, max_workers=1, queue_size=1)
    record = Record(path="/in/a.glb", status="uploaded").to_json()
    started = time.monotonic()
    for _ in range(5):
        runner.submit(record, "uploaded")
    assert time.monotonic() - started < 0.2
    assert any(e["event"] == "hook.dropped" for e in events)
    runner.close(wait=0)


def test_missing_executable_is_logged(events: list[dict[str, Any]]) -> None:
    """A hook command that does not exist is logged as hook.failed, never raised."""
    runner = HookRunner(["/nonexistent/tripo-hook"], None)
    runner.submit(Record(path="/in/a.glb", status="uploaded").to_json(), "uploaded")
    runner.close(wait=10)
    (failed,) = [e for e in events if e["event"] == "hook.failed"]
    assert failed["reason"] == "command not found"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
