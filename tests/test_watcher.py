"""The watcher offers every complete new file once, on real folders with real observers."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tripo_watchd.mounts import fs_type_for, is_remote_fs, parse_mountinfo
from tripo_watchd.readiness import ReadinessTable, Verdict
from tripo_watchd.settings import WatchSettings
from tripo_watchd.watcher import Watcher

SETTLE = 0.2


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Collector:
    """An on_ready that records (path, size, time) and can refuse, like a full queue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.offers: list[tuple[Path, int, float]] = []
        self.accepting = True
        self.refused = 0

    def __call__(self, path: Path) -> bool:
        with self.lock:
            if not self.accepting:
                self.refused += 1
                return False
            self.offers.append((path, path.stat().st_size, time.monotonic()))
            return True

    def is_known(self, path: Path, st: os.stat_result) -> bool:
        return path in self.paths()

    def paths(self) -> list[Path]:
        with self.lock:
            return [p for p, _, _ in self.offers]

    def count(self, path: Path) -> int:
        return self.paths().count(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return inbox


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[Watcher, Collector]]]:
    watchers: list[Watcher] = []

    def _make(root: Path, *, ready: bool = True, **kw: object) -> tuple[Watcher, Collector]:
        settings = WatchSettings(
            paths=(root,), settle_seconds=SETTLE, mode="native", poll_seconds=0.2, rescan_seconds=0
        )
        settings = replace(settings, **kw)  # type: ignore[arg-type]
        collector = Collector()
        watcher = Watcher(settings, collector, is_known=collector.is_known)
        watchers.append(watcher)
        if ready and root.is_dir():
            # A file present at start is offered by the catch-up scan, which runs after the
            # watch is in place: once it is offered, the watcher is live.
            sentinel = root / "sentinel.bin"
            sentinel.write_bytes(b"s")
            watcher.start()
            assert wait_for(lambda: collector.count(sentinel) == 1)
        else:
            watcher.start()
        return watcher, collector

    yield _make
    for watcher in watchers:
        watcher.stop()


def stays_false(predicate: Callable[[], bool], timeout: float = 3 * SETTLE) -> bool:
    """True when `predicate` never holds within `timeout` (a bounded negative check)."""
    return not wait_for(predicate, timeout)


def test_file_created_in_place_is_offered_once(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """A file written into the inbox is offered exactly once."""
    watcher, got = make(root)
    target = root / "a.png"
    target.write_bytes(b"x" * 100)
    assert wait_for(lambda: got.count(target) == 1)
    watcher.rescan()
    assert stays_false(lambda: got.count(target) > 1)
    assert watcher.pending_count() == 0


def test_slow_writer_is_offered_after_close_with_final_size(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """A slow renderer's file is offered only after it is closed, with its full size."""
    _, got = make(root)
    target = root / "render.exr"
    closed_at: list[float] = []

    def writer() -> None:
        with open(target, "wb") as fh:
            for _ in range(5):
                fh.write(b"y" * 1000)
                fh.flush()
                time.sleep(0.3)  # the workload: a slow renderer, not synchronisation
        closed_at.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    assert wait_for(lambda: got.count(target) == 1)
    thread.join()
    (_, size, when) = next(o for o in got.offers if o[0] == target)
    assert size == 5000
    assert when >= closed_at[0]
    assert stays_false(lambda: got.count(target) > 1)


def test_rename_into_place_offers_final_name_only(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """A download written as .part then renamed is offered once under its final name."""
    _, got = make(root)
    part = root / "x.png.part"
    part.write_bytes(b"p" * 500)
    final = root / "x.png"
    part.rename(final)
    assert wait_for(lambda: got.count(final) == 1)
    assert got.count(part) == 0
    assert stays_false(lambda: got.count(final) > 1)


def test_file_moved_in_from_outside_is_offered(
    make: Callable[..., tuple[Watcher, Collector]], root: Path, tmp_path: Path
) -> None:
    """A file moved into the inbox from elsewhere is offered."""
    _, got = make(root)
    outside = tmp_path / "elsewhere.glb"
    outside.write_bytes(b"m" * 300)
    outside.rename(root / "moved.glb")
    assert wait_for(lambda: got.count(root / "moved.glb") == 1)


def test_new_nested_directory_written_immediately(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """`mkdir -p a/b && cp x a/b/` is seen even though inotify watches a/b late."""
    _, got = make(root)
    nested = root / "a" / "b"
    nested.mkdir(parents=True)
    files = [nested / f"f{i}.png" for i in range(5)]
    for f in files:
        f.write_bytes(b"n")
    assert wait_for(lambda: all(got.count(f) == 1 for f in files))


def test_whole_tree_moved_in(
    make: Callable[..., tuple[Watcher, Collector]], root: Path, tmp_path: Path
) -> None:
    """A directory tree (3 levels, 20 files) moved in has every file offered once."""
    _, got = make(root)
    src = tmp_path / "job"
    files = []
    for i in range(20):
        sub = src / f"l1_{i % 2}" / f"l2_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"frame{i}.png").write_bytes(b"t" * (i + 1))
        files.append(root / "job" / sub.relative_to(src) / f"frame{i}.png")
    src.rename(root / "job")
    assert wait_for(lambda: all(got.count(f) == 1 for f in files))
    assert stays_false(lambda: any(got.count(f) > 1 for f in files))


def test_ignore_patterns_and_hidden_dirs(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """Temporary names and anything in hidden folders are never offered."""
    _, got = make(root)
    hidden = root / ".cache"
    hidden.mkdir()
    for name in ("a.tmp", "b.crdownload", ".hidden.png", "c.png~"):
        (root / name).write_bytes(b"i")
    (hidden / "d.png").write_bytes(b"i")
    good = root / "good.png"
    good.write_bytes(b"g")
    assert wait_for(lambda: got.count(good) == 1)
    assert stays_false(lambda: len(got.paths()) > 2)


def test_fifo_is_offered_once_for_its_rejection_and_a_directory_never(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """A FIFO called x.png is offered once (never opened) so the daemon can say why it was not
    uploaded; a directory called x.png is never offered."""
    _, got = make(root)
    os.mkfifo(root / "pipe.png")
    (root / "x.png").mkdir()
    good = root / "good.obj"
    good.write_bytes(b"g")
    assert wait_for(lambda: got.count(good) == 1 and got.count(root / "pipe.png") == 1)
    assert root / "x.png" not in got.paths()


def test_symlink_pointing_outside_is_offered_for_rejection(
    make: Callable[..., tuple[Watcher, Collector]], root: Path, tmp_path: Path
) -> None:
    """A symlink out of the watched folders is offered as itself (to be rejected, not read)."""
    _, got = make(root)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"s")
    (root / "link.png").symlink_to(secret)
    inner = root / "inner.png"
    inner.write_bytes(b"i")
    (root / "inner_link.png").symlink_to(inner)
    assert wait_for(lambda: got.count(inner) == 1 and got.count(root / "inner_link.png") == 1)
    assert wait_for(lambda: got.count(root / "link.png") == 1)


def test_poll_mode_detects_new_file(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """With mode="poll" (network shares) a new file in a subfolder is still offered."""
    watcher, got = make(root, mode="poll")
    assert watcher.modes() == {root: "poll"}
    (root / "deep" / "er").mkdir(parents=True)
    target = root / "deep" / "er" / "p.png"
    target.write_bytes(b"p" * 10)
    assert wait_for(lambda: got.count(target) == 1)


def test_rescan_finds_files_events_missed(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """rescan() finds a file no event reported (here: polling effectively off)."""
    watcher, got = make(root, mode="poll", poll_seconds=3600)
    target = root / "missed.png"
    target.write_bytes(b"m")
    assert stays_false(lambda: got.count(target) == 1, timeout=2 * SETTLE)
    watcher.rescan()
    assert wait_for(lambda: got.count(target) == 1)


def test_catch_up_offers_existing_files_except_known(root: Path) -> None:
    """Files already in the inbox at start are offered, except those the daemon already has."""
    old = root / "old.png"
    old.write_bytes(b"o")
    done = root / "done.png"
    done.write_bytes(b"d")
    got = Collector()
    watcher = Watcher(
        WatchSettings(paths=(root,), settle_seconds=SETTLE, mode="native", rescan_seconds=0),
        got,
        is_known=lambda p, st: p == done,
    )
    watcher.start()
    try:
        assert wait_for(lambda: got.count(old) == 1)
        assert stays_false(lambda: got.count(done) > 0)
    finally:
        watcher.stop()
        watcher.stop()


def test_backpressure_keeps_offering_until_accepted(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """When the daemon's queue is full nothing is dropped: files are offered again later."""
    watcher, got = make(root)
    with got.lock:
        got.accepting = False
    files = [root / f"q{i}.png" for i in range(10)]
    for f in files:
        f.write_bytes(b"q")
    assert wait_for(lambda: got.refused >= 3 and watcher.pending_count() == 10)
    with got.lock:
        got.accepting = True
    assert wait_for(lambda: all(got.count(f) == 1 for f in files))
    assert watcher.pending_count() == 0


def test_requeue_waits_for_settle_again(
    make: Callable[..., tuple[Watcher, Collector]], root: Path
) -> None:
    """A file that changed during upload is offered again, only after it settles again."""
    watcher, got = make(root, mode="poll", poll_seconds=3600)
    target = root / "changing.png"
    target.write_bytes(b"1")
    watcher.rescan()
    assert wait_for(lambda: got.count(target) == 1)
    target.write_bytes(b"22")
    requeued_at = time.monotonic()
    watcher.requeue(target)
    assert watcher.pending_count() == 1
    assert wait_for(lambda: got.count(target) == 2)
    second = [o for o in got.offers if o[0] == target][1]
    assert second[1] == 2 and second[2] >= requeued_at + SETTLE


def test_modes_report_native_and_poll(
    make: Callable[..., tuple[Watcher, Collector]], root: Path, tmp_path: Path
) -> None:
    """modes() tells the operator how each folder is watched."""
    native, _ = make(root)
    assert native.modes() == {root: "native"}
    other = tmp_path / "share"
    other.mkdir()
    polled, _ = make(other, mode="poll")
    assert polled.modes() == {other: "poll"}


def test_missing_root_is_watched_once_it_appears(
    make: Callable[..., tuple[Watcher, Collector]], tmp_path: Path
) -> None:
    """A folder that does not exist yet is picked up when it is created, and again if re-created."""
    later = tmp_path / "later"
    _, got = make(later, ready=False)
    later.mkdir()
    first = later / "first.png"
    first.write_bytes(b"1")
    assert wait_for(lambda: got.count(first) == 1)
    shutil.rmtree(later)
    later.mkdir()
    second = later / "second.png"
    second.write_bytes(b"2")
    assert wait_for(lambda: got.count(second) == 1)


def test_each_full_scan_logs_scan_done_with_counts(root: Path) -> None:
    """The catch-up scan and each rescan log `watch.scan_done` with files, folders and seconds."""
    (root / "a" / "b").mkdir(parents=True)
    for name in ("top.png", "a/one.png", "a/b/two.png", ".hidden.png"):
        (root / name).write_bytes(b"f")
    got = Collector()
    settings = WatchSettings(paths=(root,), settle_seconds=SETTLE, mode="native", rescan_seconds=0)
    watcher = Watcher(settings, got, is_known=got.is_known)
    with capture_logs() as logs:
        watcher.start()
        try:
            assert wait_for(lambda: len(got.paths()) == 3)
            watcher.rescan()
        finally:
            watcher.stop()
    done = [e for e in logs if e["event"] == "watch.scan_done"]
    assert [e["reason"] for e in done] == ["catch-up", "rescan"]
    for event in done:
        assert event["log_level"] == "info"
        assert (event["files"], event["directories"]) == (3, 3)
        assert 0 <= event["seconds"] < 5


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
40 27 0:40 / /mnt/render rw,relatime shared:20 - nfs4 filer:/render rw,vers=4.2
41 40 0:41 / /mnt/render/local rw - ext4 /dev/sdb1 rw
42 27 0:42 / /mnt/win\040share rw - cifs //nas/share rw
43 27 0:43 / /home/me/remote rw,nosuid - fuse.sshfs me@host:/ rw
44 27 0:44 / /data rw - xfs /dev/sdc1 rw
garbage line
"""


@pytest.mark.parametrize(
    ("path", "fs_type", "remote"),
    [
        ("/mnt/render/job1/frame.exr", "nfs4", True),
        ("/mnt/render/local/cache", "ext4", False),
        ("/mnt/win share/inbox", "cifs", True),
        ("/home/me/remote/x", "fuse.sshfs", True),
        ("/home/me/Tripo/inbox", "ext4", False),
        ("/data", "xfs", False),
        ("/database", "ext4", False),
    ],
)
def test_mountinfo_picks_the_filesystem_of_a_path(path: str, fs_type: str, remote: bool) -> None:
    """Auto mode polls network and FUSE shares by the longest matching mount point."""
    mounts = parse_mountinfo(MOUNTINFO)
    assert fs_type_for(Path(path), mounts) == fs_type
    assert is_remote_fs(fs_type) is remote


def test_writer_that_never_closes_is_taken_after_quiet_period() -> None:
    """A file written through mmap or from another host (no close event) is taken once quiet."""
    table = ReadinessTable(settle_seconds=0.5)
    st = os.stat(__file__)
    table.add("f", st, now=0.0, closed=False)
    assert table.take_due(1.0, 10) == []  # settle passed, but the writer has not closed
    table.saw_write("f", now=5.0, await_close=True)
    assert table.take_due(31.0, 10) == []  # quiet restarted at the last write
    due = table.take_due(35.0, 10)
    assert [p for p, _ in due] == ["f"]
    assert table.check("f", due[0][1], st, now=35.0) is Verdict.READY_WITHOUT_CLOSE
    assert table.ready_batch(10) == ["f"]
