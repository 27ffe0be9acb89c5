"""Tests for the JSON Lines ledger."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from tripo_watchd import ledger as ledger_mod
from tripo_watchd.errors import LedgerError
from tripo_watchd.ledger import JsonlLedger, LedgerBackend, read_records
from tripo_watchd.records import Record

SHA_A = "a" * 64
SHA_B = "b" * 64


def uploaded(path: str, sha: str = SHA_A, size: int = 10, mtime_ns: int = 1000) -> Record:
    return Record(
        path=path,
        status="uploaded",
        size=size,
        mtime_ns=mtime_ns,
        sha256=sha,
        bucket="bkt",
        key=f"k/{sha[:8]}",
        file_token="ft-1",
    )


@pytest.fixture
def lpath(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.jsonl"


def test_round_trip_after_reopen(lpath: Path) -> None:
    """Records appended before a restart are all there, in order, after reopening."""
    led: LedgerBackend = JsonlLedger(lpath)
    a = uploaded("/in/a.png")
    b = Record(path="/in/b.txt", status="rejected", size=3, mtime_ns=5, reason="not a model")
    led.append(a)
    led.append(b)
    led.close()
    again = JsonlLedger(lpath)
    assert list(again.records()) == [a, b]
    assert again.last_for_path("/in/a.png") == a
    assert oct(lpath.parent.stat().st_mode & 0o777) == "0o700"
    again.close()


def test_appended_line_visible_to_other_reader(lpath: Path) -> None:
    """Once append returns, the record is on disk for any other reader of the file."""
    led = JsonlLedger(lpath)
    rec = uploaded("/in/a.png")
    led.append(rec)
    lines = lpath.read_bytes().splitlines()
    assert [Record.from_dict(json.loads(x)) for x in lines] == [rec]
    led.close()


def test_concurrent_appends_give_whole_lines(lpath: Path) -> None:
    """Eight worker threads appending at once produce exactly 8xN valid lines."""
    led = JsonlLedger(lpath)
    n = 50

    def work(t: int) -> None:
        for i in range(n):
            led.append(uploaded(f"/in/{t}/{i}.glb", sha=f"{t * n + i:064x}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = lpath.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert len(lines) - 1 == 8 * n
    assert all(json.loads(x)["status"] == "uploaded" for x in lines[:-1])
    assert led.counts() == {"uploaded": 8 * n}
    led.close()


def test_torn_tail_is_moved_aside(lpath: Path) -> None:
    """A line cut short by a crash is moved to <ledger>.torn and the ledger stays appendable."""
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/a.png"))
    led.close()
    with open(lpath, "ab") as f:
        f.write(b'{"path":"/in/b.png","status":"uplo')
    again = JsonlLedger(lpath)
    assert [r.path for r in again.records()] == ["/in/a.png"]
    assert lpath.with_name("ledger.jsonl.torn").read_bytes() == (
        b'{"path":"/in/b.png","status":"uplo\n'
    )
    again.append(uploaded("/in/c.png"))
    again.close()
    assert [r.path for r in JsonlLedger(lpath).records()] == ["/in/a.png", "/in/c.png"]


def test_invalid_last_line_with_newline_is_torn(lpath: Path) -> None:
    """A last line that ends in a newline but is not a record is also moved aside."""
    good = uploaded("/in/a.png").to_json().encode() + b"\n"
    lpath.parent.mkdir(parents=True)
    lpath.write_bytes(good + b"\x00\x00garbage\n")
    led = JsonlLedger(lpath)
    assert lpath.read_bytes() == good
    assert b"garbage" in lpath.with_name("ledger.jsonl.torn").read_bytes()
    led.close()


def test_whole_last_record_missing_only_newline_is_kept(lpath: Path) -> None:
    """A final record that is complete JSON but lacks its newline is kept, not discarded."""
    lpath.parent.mkdir(parents=True)
    lpath.write_bytes(uploaded("/in/a.png").to_json().encode())
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/b.png", sha=SHA_B))
    led.close()
    assert [r.path for r in JsonlLedger(lpath).records()] == ["/in/a.png", "/in/b.png"]


def test_garbage_middle_line_is_skipped(lpath: Path) -> None:
    """A hand-edited bad line in the middle is skipped; the records around it survive."""
    a = uploaded("/in/a.png").to_json()
    b = uploaded("/in/b.png", sha=SHA_B).to_json()
    lpath.parent.mkdir(parents=True)
    lpath.write_text(f"{a}\nthis is not json\n\n{b}\n", encoding="utf-8")
    led = JsonlLedger(lpath)
    assert [r.path for r in led.records()] == ["/in/a.png", "/in/b.png"]
    assert led.counts() == {"uploaded": 2}
    assert not lpath.with_name("ledger.jsonl.torn").exists()
    led.close()


@pytest.mark.parametrize(
    "name",
    [
        os.fsdecode(b"/in/caf\xe9-latin1.glb"),  # undecodable byte -> lone surrogate
        "/in/new\nline.glb",
        '/in/quote"and\\back.glb',
        "/in/日本語.glb",
        '/in/x","status":"failed.glb',
    ],
)
def test_odd_names_round_trip(lpath: Path, name: str) -> None:
    """Names with non-UTF-8 bytes, newlines, quotes or backslashes come back exactly."""
    led = JsonlLedger(lpath)
    rec = uploaded(name)
    led.append(rec)
    led.close()
    raw = lpath.read_bytes()
    raw.decode("utf-8")  # the file stays valid UTF-8
    assert raw.count(b"\n") == 1
    again = JsonlLedger(lpath)
    assert again.last_for_path(name) == rec
    assert again.is_done(name, 10, 1000)
    assert list(again.records()) == [rec]
    again.close()


def test_lookup_semantics(lpath: Path) -> None:
    """is_done, dedupe, last_for_path and counts follow the latest record per path."""
    led = JsonlLedger(lpath)
    first = uploaded("/in/a.png", sha=SHA_A, size=10, mtime_ns=1)
    led.append(Record(path="/in/a.png", status="failed", reason="network"))
    assert not led.is_done("/in/a.png", 10, 1)
    led.append(first)
    assert led.is_done("/in/a.png", 10, 1)
    assert not led.is_done("/in/a.png", 10, 2)  # touched since
    assert not led.is_done("/in/a.png", 11, 1)  # grew since
    led.append(uploaded("/in/copy.png", sha=SHA_A))
    assert led.uploaded_with_sha256(SHA_A) == first  # the first upload wins
    assert led.uploaded_with_sha256(SHA_B) is None
    led.append(Record(path="/in/r.txt", status="rejected", size=1, mtime_ns=2, reason="bad"))
    assert led.is_done("/in/r.txt", 1, 2)
    led.append(Record(path="/in/a.png", status="failed", reason="gone"))
    assert not led.is_done("/in/a.png", 10, 1)
    last = led.last_for_path("/in/a.png")
    assert last is not None and last.status == "failed"
    assert led.last_for_path("/in/none") is None
    assert led.counts() == {"failed": 1, "uploaded": 1, "rejected": 1}
    assert [r.path for r in led.records("rejected")] == ["/in/r.txt"]
    led.close()
    again = JsonlLedger(lpath)
    assert again.counts() == {"failed": 1, "uploaded": 1, "rejected": 1}
    assert again.uploaded_with_sha256(SHA_A) == first
    assert not again.is_done("/in/a.png", 10, 1)
    again.close()


def test_write_failure_raises_and_recovers(lpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk raises LedgerError naming the file; once space returns, lines are not glued."""
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/a.png"))
    real = ledger_mod._write_all

    def half_then_enospc(fd: int, data: bytes) -> None:
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ledger_mod, "_write_all", half_then_enospc)
    with pytest.raises(LedgerError) as exc:
        led.append(uploaded("/in/b.png", sha=SHA_B))
    assert str(lpath) in str(exc.value) and "No space left" in str(exc.value)
    assert led.last_for_path("/in/b.png") is None
    monkeypatch.setattr(ledger_mod, "_write_all", real)
    led.append(uploaded("/in/c.png", sha=SHA_B))
    led.close()
    lines = lpath.read_bytes().splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["/in/a.png", "/in/c.png"]


def test_fsync_failure_does_not_count(lpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If fsync fails (EIO) the record is rolled back, so it is never counted as written."""
    led = JsonlLedger(lpath)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(LedgerError):
        led.append(uploaded("/in/a.png"))
    monkeypatch.undo()
    assert lpath.read_bytes() == b""
    assert led.counts() == {}
    led.close()


def test_second_process_is_refused(lpath: Path) -> None:
    """Two daemons on one ledger would corrupt each other's index, so the second is refused."""
    led = JsonlLedger(lpath)
    with pytest.raises(LedgerError, match="in use"):
        JsonlLedger(lpath)
    led.close()
    JsonlLedger(lpath).close()


def test_append_after_close_raises(lpath: Path) -> None:
    """Appending to a closed ledger is an error, not a silent loss."""
    led = JsonlLedger(lpath)
    led.close()
    with pytest.raises(LedgerError):
        led.append(uploaded("/in/a.png"))


def test_read_records_beside_a_running_owner(lpath: Path) -> None:
    """Listing the ledger while the daemon holds it works and never truncates its last line."""
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/a.png"))
    with open(lpath, "ab") as f:
        f.write(b'{"path":"/in/b.png","sta')  # the owner is mid-write
    assert [r.path for r in read_records(lpath)] == ["/in/a.png"]
    assert lpath.read_bytes().endswith(b'"sta')
    assert list(read_records(lpath, "failed")) == []
    led.close()
