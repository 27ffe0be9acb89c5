"""Disk faults under a running daemon: a full ledger disk, a read-only one, a vanished folder.

The ledger lives on a tiny tmpfs mounted for the test (root with CAP_SYS_ADMIN); where that
mount is not allowed the ledger tests skip. A read-only bind is used for the read-only case:
root ignores file modes, but not a read-only mount.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    DaemonProcess,
    read_ledger,
    run_cli,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd.records import utc_now
from tripo_watchd.sandbox import S3Server, TripoEmulator

PAGE = 4096


def _mount_tmpfs(where: Path, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=64k", "mode=0700", *options))
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted after the test."""
    where = tmp_path / "small-disk"
    if not _mount_tmpfs(where):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def _page_aligned_ledger(path: Path, old: Path) -> None:
    """A valid one-record ledger exactly one page long, so the next append needs a new page."""
    record = {"path": str(old), "status": "rejected", "at": utc_now(), "reason": ""}
    line = json.dumps(record, separators=(",", ":")) + "\n"
    record["reason"] = "x" * (PAGE - len(line.encode()))
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    assert len(data) == PAGE
    path.write_bytes(data)


def _fill(directory: Path) -> Path:
    """Write a filler file until the filesystem says it is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * PAGE)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    return filler


def _config(tmp: Path, emulator: TripoEmulator, s3: S3Server, api_key: str, ledger: Path):
    inbox = tmp / "inbox"
    inbox.mkdir(exist_ok=True)
    return inbox, write_config(
        tmp / "cfg.toml",
        api_base_url=emulator.base_url,
        s3_endpoint_url=s3.endpoint_url,
        ledger=ledger,
        key_file=write_key(tmp / "api-key", api_key),
        watch=[inbox],
        sections={
            "watch": {"settle_seconds": 0.2, "rescan_seconds": 0, "poll_seconds": 0.3},
            "workers": {"count": 2},
        },
    )


def _events_for(daemon: DaemonProcess, name: str, path: Path) -> list[dict]:
    return [e for e in daemon.events(name) if e.get("path") == str(path)]


def test_full_ledger_disk_holds_the_outcome_until_it_can_be_written(
    tmp_path, small_disk, emulator, s3_server, api_key
):
    """With the ledger disk full an upload is not reported done; it lands once space returns."""
    ledger = small_disk / "ledger.jsonl"
    _page_aligned_ledger(ledger, tmp_path / "inbox" / "old.png")
    inbox, config = _config(tmp_path, emulator, s3_server, api_key, ledger)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        filler = _fill(small_disk)
        target = inbox / "while-full.png"
        target.write_bytes(unique_png(31))
        wait_for(lambda: len(daemon.events("ledger.write_failed")) >= 2, timeout=20)
        failure = daemon.events("ledger.write_failed")[0]
        assert "ledger" in failure["reason"] and "space" in failure["reason"].lower(), failure
        assert not _events_for(daemon, "file.uploaded", target)
        assert [r["path"] for r in read_ledger(ledger)] == [str(inbox / "old.png")]
        filler.unlink()
        wait_for(lambda: [r for r in read_ledger(ledger) if r["path"] == str(target)], timeout=40)
        wait_for(lambda: _events_for(daemon, "file.uploaded", target))
        assert daemon.proc is not None and daemon.proc.poll() is None
    (record,) = [r for r in read_ledger(ledger) if r["path"] == str(target)]
    assert record["status"] == "uploaded"
    assert s3_server.object_bytes(record["key"]) == target.read_bytes()


def test_read_only_ledger_disk_is_refused_at_start_with_a_clear_message(
    tmp_path, small_disk, emulator, s3_server, api_key
):
    """A daemon whose ledger folder is read-only says so, naming the ledger, and exits non-zero."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True)
    ledger = small_disk / "ledger.jsonl"
    _, config = _config(tmp_path, emulator, s3_server, api_key, ledger)
    result = run_cli("run", "--config", config, timeout=30)
    assert result.returncode != 0
    assert str(ledger) in result.stderr and "read-only" in result.stderr.lower(), result.stderr


def test_watched_folder_deleted_and_recreated_is_watched_again(
    tmp_path, emulator, s3_server, api_key
):
    """When the watched folder is deleted and made again, files put in the new one are uploaded."""
    ledger = tmp_path / "state" / "ledger.jsonl"
    inbox, config = _config(tmp_path, emulator, s3_server, api_key, ledger)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        (inbox / "before.png").write_bytes(unique_png(41))
        wait_for(lambda: read_ledger(ledger))
        shutil.rmtree(inbox)
        wait_for(lambda: daemon.events("watch.root_missing"))
        inbox.mkdir()
        (inbox / "after.png").write_bytes(unique_png(42))
        wait_for(lambda: len(read_ledger(ledger)) >= 2, timeout=20)
    assert [(Path(r["path"]).name, r["status"]) for r in read_ledger(ledger)] == [
        ("before.png", "uploaded"),
        ("after.png", "uploaded"),
    ]
    assert os.path.isdir(inbox)
