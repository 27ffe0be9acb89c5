"""The watcher survives inotify limits, lost events and an unmounted folder, on the real kernel.

These tests lower `/proc/sys/fs/inotify/*` for a moment (root only; the old value is always
written back) and mount tmpfs filesystems; where that is not allowed they skip.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_watcher import SETTLE, Collector, stays_false, wait_for

from tripo_watchd.settings import WatchSettings
from tripo_watchd.watcher import Watcher

INOTIFY = Path("/proc/sys/fs/inotify")
POLL = 0.1


@contextlib.contextmanager
def lowered(name: str, value: int) -> Iterator[None]:
    """Set fs.inotify.`name` to `value` for the block; skip the test if it cannot be written."""
    path = INOTIFY / name
    try:
        old = path.read_text()
        path.write_text(f"{value}\n")
    except OSError as exc:
        pytest.skip(f"cannot write {path}: {exc}")
    try:
        yield
    finally:
        path.write_text(old)


def watches_in_use() -> int:
    """inotify watches held by this user's processes: one `inotify wd:` line each in fdinfo."""
    uid, total = os.getuid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    total += sum(line.startswith("inotify wd:") for line in info)
    return total


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for watcher in made:
        watcher.stop()


def new_watcher(made: list[Watcher], root: Path) -> tuple[Watcher, Collector]:
    settings = WatchSettings(
        paths=(root,), settle_seconds=SETTLE, mode="native", poll_seconds=POLL, rescan_seconds=0
    )
    got = Collector()
    watcher = Watcher(settings, got, is_known=got.is_known)
    made.append(watcher)
    return watcher, got


def start_live(watcher: Watcher, got: Collector, root: Path) -> None:
    """Start, and return once the catch-up scan (which follows the watch) offered a sentinel."""
    sentinel = root / "sentinel.bin"
    sentinel.write_bytes(b"s")
    watcher.start()
    assert wait_for(lambda: got.count(sentinel) == 1)


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_watch_limit_inside_the_tree_polls_that_folder_with_one_clear_error(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    """When max_user_watches runs out on subfolders, one error names the sysctl, the folder is
    polled, a file deep inside is still offered, and raising the limit restores native watching."""
    root = tmp_path / "inbox"
    for i in range(30):
        for j in range(10):
            (root / f"d{i}" / f"e{j}").mkdir(parents=True)
    watcher, got = new_watcher(watchers, root)
    with capture_logs() as logs:
        with lowered("max_user_watches", watches_in_use() + 20):
            watcher.start()
            assert wait_for(lambda: watcher.modes() == {root: "poll"})
        deep = root / "d29" / "e9" / "deep.png"
        deep.write_bytes(b"d")
        assert wait_for(lambda: got.count(deep) == 1)
        (error,) = named(logs, "watch.inotify_limit")
        assert error["log_level"] == "error" and error["path"] == str(root)
        assert error["limit"] == "fs.inotify.max_user_watches"
        assert "sysctl -w fs.inotify.max_user_watches=" in error["detail"]
        watcher.rescan()  # the limit is back up: the next rescan watches natively again
        assert watcher.modes() == {root: "native"}
        again = root / "d0" / "e0" / "again.png"
        again.write_bytes(b"a")
        assert wait_for(lambda: got.count(again) == 1)
        assert len(named(logs, "watch.inotify_limit")) == 1


def test_watch_limit_hit_by_new_folders_falls_back_to_polling(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    """Folders created later that inotify can no longer watch switch the root to polling, and
    files in them are offered."""
    root = tmp_path / "inbox"
    root.mkdir()
    watcher, got = new_watcher(watchers, root)
    start_live(watcher, got, root)
    with capture_logs() as logs:
        with lowered("max_user_watches", watches_in_use() + 5):
            for i in range(40):
                (root / f"n{i}" / "sub").mkdir(parents=True)
            assert wait_for(lambda: watcher.modes() == {root: "poll"})
        files = [root / f"n{i}" / "sub" / "x.png" for i in (0, 39)]
        for f in files:
            f.write_bytes(b"x")
        assert wait_for(lambda: all(got.count(f) == 1 for f in files))
        assert len(named(logs, "watch.inotify_limit")) == 1


def test_inotify_instance_limit_polls_every_folder(tmp_path: Path, watchers: list[Watcher]) -> None:
    """When max_user_instances allows no new inotify instance, the error names that sysctl and
    files are still offered by polling."""
    root = tmp_path / "inbox"
    root.mkdir()
    watcher, got = new_watcher(watchers, root)
    with capture_logs() as logs:
        with lowered("max_user_instances", 0):
            watcher.start()  # the observer (and its inotify instance) is made here
        assert wait_for(lambda: watcher.modes() == {root: "poll"})
        target = root / "a.png"
        target.write_bytes(b"a")
        assert wait_for(lambda: got.count(target) == 1)
        (error,) = named(logs, "watch.inotify_limit")
        assert error["limit"] == "fs.inotify.max_user_instances"
        assert "sysctl -w fs.inotify.max_user_instances=" in error["detail"]


def test_queue_overflow_rescans_and_offers_every_file_once(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    """When inotify drops events in a burst, one warning is logged and every file is still
    offered exactly once."""
    root = tmp_path / "inbox"
    root.mkdir()
    watcher, got = new_watcher(watchers, root)
    with lowered("max_queued_events", 4):  # read once, when the inotify instance is made
        watcher.start()
    with capture_logs() as logs:
        start_live(watcher, got, root)
        # Another process writes faster than this one reads (no shared GIL): it overflows.
        burst = (
            "import pathlib, sys\n"
            "for i in range(1000): pathlib.Path(sys.argv[1], f'burst{i}.png').write_bytes(b'b')"
        )
        subprocess.run([sys.executable, "-c", burst, str(root)], check=True, timeout=30)
        files = [root / f"burst{i}.png" for i in range(1000)]

        def offered() -> Counter[Path]:
            return Counter(got.paths())

        assert wait_for(lambda: all(offered()[f] == 1 for f in files), timeout=10)
        assert stays_false(lambda: any(offered()[f] > 1 for f in files))
        (warning,) = named(logs, "watch.overflow")
        assert warning["paths"] == [str(root)]
        assert watcher.modes() == {root: "native"}


def _mount(*args: str) -> bool:
    try:
        done = subprocess.run(["mount", *args], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_unmounted_folder_is_reported_once_and_caught_up_when_mounted_again(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    """A watched folder whose filesystem is unmounted is reported once, and files on it are
    offered when it is mounted again."""
    root, staging = tmp_path / "inbox", tmp_path / "staging"
    root.mkdir()
    staging.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        watcher, got = new_watcher(watchers, root)
        start_live(watcher, got, root)
        with capture_logs() as logs:
            subprocess.run(["umount", "-l", str(root)], check=True, timeout=10)
            assert wait_for(lambda: len(named(logs, "watch.root_missing")) == 1)
            assert stays_false(lambda: len(named(logs, "watch.root_missing")) > 1, 10 * POLL)
            assert _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging))
            waiting = staging / "while-away.png"
            waiting.write_bytes(b"w")
            assert _mount("--bind", str(staging), str(root))
            assert wait_for(lambda: got.count(root / "while-away.png") == 1)
            after = root / "after.png"
            after.write_bytes(b"a")
            assert wait_for(lambda: got.count(after) == 1)
            assert watcher.modes() == {root: "native"}
            assert len(named(logs, "watch.root_missing")) == 1
    finally:
        for where in (root, root, staging):
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)
