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


def test_group_commit_each_append_durable_on_return(lpath: Path) -> None:
    """With 16 threads appending at once, every append's line is on disk and indexed when it
    returns, and the file holds exactly the lines appended."""
    led = JsonlLedger(lpath)
    n = 200
    missing: list[str] = []

    def work(t: int) -> None:
        for i in range(n):
            rec = uploaded(f"/in/{t}/{i}.glb", sha=f"{t * n + i:064x}")
            led.append(rec)
            if led.last_for_path(rec.path) != rec:
                missing.append(rec.path)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert missing == []
    led.close()
    lines = lpath.read_bytes().split(b"\n")
    assert lines[-1] == b""
    paths = [json.loads(x)["path"] for x in lines[:-1]]
    assert sorted(paths) == sorted(f"/in/{t}/{i}.glb" for t in range(16) for i in range(n))
    assert JsonlLedger(lpath).counts() == {"uploaded": 16 * n}


def test_failed_group_fsync_fails_every_waiter(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the fsync covering several appends fails, all of them raise LedgerError and the file
    is cut back to the last fsynced line, so none of them counts."""
    led = JsonlLedger(lpath)
    first = uploaded("/in/first.png")
    led.append(first)
    before = lpath.read_bytes()
    writers = 4
    written = threading.Semaphore(0)
    real_write = ledger_mod._write_all

    def counting_write(fd: int, data: bytes) -> None:
        real_write(fd, data)
        written.release()

    def fsync_after_all_wrote(fd: int) -> None:
        # The leader's fsync waits until every writer's line is in the file, then fails.
        for _ in range(writers):
            assert written.acquire(timeout=10)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ledger_mod, "_write_all", counting_write)
    monkeypatch.setattr(ledger_mod, "_fsync", fsync_after_all_wrote)
    errors: list[Exception] = []

    def work(t: int) -> None:
        try:
            led.append(uploaded(f"/in/{t}.png", sha=f"{t:064x}"))
        except LedgerError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors) == writers
    assert all("Input/output error" in str(e) for e in errors)
    assert lpath.read_bytes() == before
    assert led.counts() == {"uploaded": 1}
    assert all(led.last_for_path(f"/in/{t}.png") is None for t in range(writers))
    monkeypatch.undo()
    led.append(uploaded("/in/after.png", sha=SHA_B))
    led.close()
    assert [r.path for r in read_records(lpath)] == ["/in/first.png", "/in/after.png"]


def _fill(lpath: Path) -> list[Record]:
    """A ledger with every kind of line the index cares about; returns what was appended."""
    recs = [
        uploaded("/in/a.png", sha=SHA_A),
        uploaded("/in/copy.png", sha=SHA_A),
        Record(path="/in/f.bin", status="failed", size=1, mtime_ns=2, retryable=False),
        Record(path="/in/r.txt", status="rejected", size=3, mtime_ns=4, reason="bad"),
        uploaded(os.fsdecode(b"/in/caf\xe9.glb"), sha=SHA_B),
        uploaded('/in/quote"and\\back.glb', sha="c" * 64),
        Record(path="/in/a.png", status="failed", reason="gone"),
    ]
    led = JsonlLedger(lpath)
    for rec in recs:
        led.append(rec)
    led.close()
    return recs


def _view(led: JsonlLedger, recs: list[Record]) -> list[object]:
    out: list[object] = [led.counts()]
    for rec in recs:
        out.append(led.last_for_path(rec.path))
        out.append(led.is_done(rec.path, rec.size or 0, rec.mtime_ns or 0))
        if rec.sha256:
            out.append(led.uploaded_with_sha256(rec.sha256))
    return out


def _full_scan_view(lpath: Path, recs: list[Record]) -> list[object]:
    lpath.with_name("ledger.jsonl.idx").unlink(missing_ok=True)
    led = JsonlLedger(lpath)
    try:
        return _view(led, recs)
    finally:
        led.close()


class _NoParsing:
    def match(self, *args: object) -> None:
        raise AssertionError("the ledger was parsed although the sidecar covers it")


def test_restart_uses_sidecar_without_parsing(lpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a clean close, reopening rebuilds the same index from <ledger>.idx alone."""
    recs = _fill(lpath)
    expected = _full_scan_view(lpath, recs)
    assert lpath.with_name("ledger.jsonl.idx").exists()
    monkeypatch.setattr(ledger_mod, "_FAST", _NoParsing())
    led = JsonlLedger(lpath)
    assert _view(led, recs) == expected
    assert expected[0] == {"uploaded": 3, "failed": 2, "rejected": 1}
    led.close()


def test_lines_appended_behind_the_sidecars_back_are_indexed(lpath: Path) -> None:
    """Lines written after the sidecar (by a crash or an older version) are parsed and indexed."""
    recs = _fill(lpath)
    late = uploaded("/in/late.png", sha="d" * 64)
    with open(lpath, "ab") as f:
        f.write(ledger_mod.encode_line(late))
    led = JsonlLedger(lpath)
    assert led.last_for_path("/in/late.png") == late
    got = _view(led, [*recs, late])
    led.close()
    assert got == _full_scan_view(lpath, [*recs, late])


@pytest.mark.parametrize("damage", ["flip", "cut", "garbage", "empty"])
def test_corrupt_sidecar_falls_back_to_parsing(lpath: Path, damage: str) -> None:
    """A damaged <ledger>.idx is never trusted: the ledger is parsed instead, same index."""
    recs = _fill(lpath)
    idx = lpath.with_name("ledger.jsonl.idx")
    data = bytearray(idx.read_bytes())
    if damage == "flip":
        data[-40] ^= 0x01  # inside the last chunk's payload
    elif damage == "cut":
        data = data[: len(data) - 30]
    elif damage == "garbage":
        data = bytearray(b"\x00garbage" * 20)
    else:
        data = bytearray()
    idx.write_bytes(bytes(data))
    led = JsonlLedger(lpath)
    got = _view(led, recs)
    led.close()
    assert got == _full_scan_view(lpath, recs)


def test_sidecar_of_another_ledger_is_ignored(lpath: Path) -> None:
    """A ledger replaced by another file, or rewritten in place, gets no stale index."""
    _fill(lpath)
    # Same length, same inode, last record pointing at another path.
    raw = lpath.read_bytes()
    with open(lpath, "r+b") as f:
        f.write(raw.replace(b'"/in/a.png","status":"failed"', b'"/in/b.png","status":"failed"'))
    led = JsonlLedger(lpath)
    assert led.last_for_path("/in/b.png") is not None
    last_a = led.last_for_path("/in/a.png")
    assert last_a is not None and last_a.status == "uploaded"
    led.close()
    # A different file renamed over the ledger: its own inode.
    other = lpath.with_name("other.jsonl")
    other.write_bytes(ledger_mod.encode_line(uploaded("/in/z.png")))
    os.replace(other, lpath)
    led = JsonlLedger(lpath)
    assert led.counts() == {"uploaded": 1}
    assert led.last_for_path("/in/a.png") is None
    led.close()


def test_sidecar_stays_valid_after_truncations(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync and a torn tail cut the ledger; the next open still gets the right index."""
    recs = _fill(lpath)
    led = JsonlLedger(lpath)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ledger_mod, "_fsync", eio)
    with pytest.raises(LedgerError):
        led.append(uploaded("/in/lost.png"))
    monkeypatch.undo()
    kept = uploaded("/in/kept.png")
    led.append(kept)
    led.close()
    with open(lpath, "ab") as f:
        f.write(b'{"path":"/in/torn.png","sta')
    led = JsonlLedger(lpath)
    assert led.last_for_path("/in/lost.png") is None
    assert led.last_for_path("/in/kept.png") == kept
    got = _view(led, [*recs, kept])
    led.close()
    assert got == _full_scan_view(lpath, [*recs, kept])


def test_sidecar_in_many_chunks_replays_in_order(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar written in many pieces while running gives the same index as parsing."""
    monkeypatch.setattr(ledger_mod, "_FLUSH_RECORDS", 3)
    recs = _fill(lpath)
    led = JsonlLedger(lpath)
    more = [uploaded(f"/in/m{i}.png", sha=f"{i:064x}") for i in range(10)]
    for rec in more:
        led.append(rec)
    led.append(Record(path="/in/m3.png", status="failed", reason="gone"))
    led.close()
    real_fast = ledger_mod._FAST
    monkeypatch.setattr(ledger_mod, "_FAST", _NoParsing())
    led = JsonlLedger(lpath)
    got = _view(led, [*recs, *more])
    led.close()
    monkeypatch.setattr(ledger_mod, "_FAST", real_fast)
    assert got == _full_scan_view(lpath, [*recs, *more])


def test_unwritable_sidecar_leaves_the_ledger_working(lpath: Path) -> None:
    """If <ledger>.idx cannot be written the ledger still opens, appends and reopens."""
    lpath.parent.mkdir(parents=True)
    lpath.with_name("ledger.jsonl.idx").mkdir()
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/a.png"))
    led.close()
    again = JsonlLedger(lpath)
    assert [r.path for r in again.records()] == ["/in/a.png"]
    again.close()


BIG = ledger_mod.BIG_UPLOAD_BYTES


def _big_uploads(lpath: Path) -> None:
    """Append big uploads (one superseded by a later record), a big failure and a small upload."""
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/big.glb", sha=SHA_A, size=BIG + 1))
    led.append(uploaded("/in/big.glb", sha=SHA_B, size=BIG + 2))
    led.append(Record(path="/in/other.glb", status="failed", size=BIG + 3, reason="x"))
    led.append(uploaded("/in/small.png", sha="c" * 64, size=100))
    led.close()


def _sizes_view(led: JsonlLedger) -> list[bool]:
    return [led.may_hold_upload_of_size(n) for n in (BIG + 1, BIG + 2, BIG + 3, BIG, 100)]


EXPECTED_SIZES = [True, True, False, False, True]


def test_upload_sizes_are_known_on_append(lpath: Path) -> None:
    """Appending an uploaded record makes its big size known at once; failures do not count."""
    led = JsonlLedger(lpath)
    assert led.may_hold_upload_of_size(BIG + 1) is False
    assert led.may_hold_upload_of_size(BIG - 1) is True  # below the threshold: always "maybe"
    led.close()
    lpath.unlink()
    lpath.with_name("ledger.jsonl.idx").unlink()
    _big_uploads(lpath)
    led = JsonlLedger(lpath)
    led.append(uploaded("/in/new.glb", sha="d" * 64, size=BIG + 9))
    assert led.may_hold_upload_of_size(BIG + 9)
    assert _sizes_view(led) == EXPECTED_SIZES
    led.close()


def test_upload_sizes_are_known_after_a_full_parse(lpath: Path) -> None:
    """Without a sidecar, parsing the ledger (fast and slow lines) finds every big upload size."""
    _big_uploads(lpath)
    with open(lpath, "ab") as f:  # keys in another order: the slow path
        f.write(json.dumps({"status": "uploaded", "path": "/in/s.glb", "size": BIG + 7}).encode())
        f.write(b"\n")
    lpath.with_name("ledger.jsonl.idx").unlink()
    led = JsonlLedger(lpath)
    assert _sizes_view(led) == EXPECTED_SIZES
    assert led.may_hold_upload_of_size(BIG + 7)
    led.close()


def test_upload_sizes_are_known_after_a_sidecar_replay(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening from <ledger>.idx alone restores the big upload sizes too."""
    _big_uploads(lpath)
    monkeypatch.setattr(ledger_mod, "_FAST", _NoParsing())
    led = JsonlLedger(lpath)
    assert _sizes_view(led) == EXPECTED_SIZES
    led.close()


def test_upload_sizes_survive_a_sidecar_written_in_many_chunks(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sizes digested by flushes while running replay the same as those digested at close."""
    monkeypatch.setattr(ledger_mod, "_FLUSH_RECORDS", 1)
    _big_uploads(lpath)
    monkeypatch.setattr(ledger_mod, "_FAST", _NoParsing())
    led = JsonlLedger(lpath)
    assert _sizes_view(led) == EXPECTED_SIZES
    led.close()


def test_an_upload_without_a_size_may_be_of_any_size(lpath: Path) -> None:
    """An uploaded record lacking its size makes every big size a possible duplicate."""
    lpath.parent.mkdir(parents=True)
    line = {"path": "/in/old.glb", "status": "uploaded", "at": "x", "sha256": SHA_A}
    lpath.write_text(json.dumps(line, separators=(",", ":")) + "\n")
    led = JsonlLedger(lpath)
    assert led.may_hold_upload_of_size(BIG + 5)
    led.close()
    led = JsonlLedger(lpath)  # and again from the sidecar
    assert led.may_hold_upload_of_size(BIG + 5)
    led.close()


def test_too_many_big_sizes_make_every_big_size_possible(
    lpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its bound the size set is dropped and every big size counts as possibly uploaded."""
    monkeypatch.setattr(ledger_mod, "_MAX_BIG_SIZES", 2)
    _big_uploads(lpath)
    led = JsonlLedger(lpath)
    assert led.may_hold_upload_of_size(BIG + 3) is False
    led.append(uploaded("/in/third.glb", sha="e" * 64, size=BIG + 4))
    assert led.may_hold_upload_of_size(BIG + 3) is True
    led.close()
