"""Notice complete new files in watched folders: watchdog events, readiness, rescans, polling."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import random
import re
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from tripo_watchd.inotify import LIMITS, inotify_observer, limit_help
from tripo_watchd.mounts import Mount, fs_type_for, inotify_limit, is_remote_fs, read_mounts
from tripo_watchd.readiness import ReadinessTable, Verdict
from tripo_watchd.settings import WatchSettings

log = structlog.get_logger(__name__)

# watchdog warns when `mkdir -p` makes it register a nested directory's callback twice; it is
# harmless (the callback is the same) and would print raw text into a JSON log stream.
warnings.filterwarnings(
    "ignore", message="Callback with id .* already exists", category=RuntimeWarning
)

_IS_LINUX = sys.platform.startswith("linux")
_CHECK_BATCH = 1000  # stats per tick at most, so one tick never stalls for long
_OFFER_BATCH = 256
_OVERFLOW_BURST_GAP = 60.0  # overflows closer together than this are one burst: one log line


# Only what readiness needs. Open and read-only-close events would also fire for every directory
# our own scans open; on 10,000 directories that overflows inotify's queue, and each overflow
# makes watchdog re-walk the tree, which overflows it again.
_WANTED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
]


class _Root:
    """Mutable state of one watched root."""

    __slots__ = (
        "dirs",
        "fallback_limit",
        "ident",
        "key",
        "limit_error",
        "lost",
        "missing_logged",
        "mode",
        "mounted",
        "overflowed",
        "path",
        "want",
        "watch",
    )

    def __init__(self, path: Path, want: str) -> None:
        self.path = path
        self.key = os.fspath(path)
        self.want = want  # "native" | "poll": what the settings and mount table ask for
        self.mode = want  # what is in force now (native may have fallen back to poll)
        self.ident: tuple[int, int] | None = None  # (st_dev, st_ino) while present
        self.watch: ObservedWatch | None = None
        self.dirs: dict[str, int] = {}  # poll mode: directory -> mtime_ns at its last listing
        self.missing_logged = False
        self.lost = False  # the watched directory itself went away (its inode may be reused)
        self.mounted = False  # the root is a mount point (so it can be unmounted from under us)
        # Set by observer threads, acted on by the scanner thread (which may unschedule).
        self.limit_error: OSError | None = None
        self.overflowed = False
        self.fallback_limit: int | None = None  # max_user_watches when this root fell back


class _Handler(FileSystemEventHandler):
    """Routes one root's watchdog events into the watcher."""

    def __init__(self, watcher: Watcher, root: _Root) -> None:
        self._watcher = watcher
        self._root = root

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(self._root, event)
        except Exception:
            log.exception("watch.event_failed", path=os.fsdecode(event.src_path))


class Watcher:
    """Watch `settings.paths` and call `on_ready(path)` once per complete new file."""

    def __init__(
        self,
        settings: WatchSettings,
        on_ready: Callable[[Path], bool],
        *,
        is_known: Callable[[Path, os.stat_result], bool] = lambda p, st: False,
    ) -> None:
        self._settings = settings
        self._on_ready = on_ready
        self._is_known = is_known
        self._ignore = re.compile("|".join(fnmatch.translate(p) for p in settings.ignore) or "(?!)")
        mounts = read_mounts() if settings.mode == "auto" else ()
        self._roots = [
            _Root(p, self._wanted_mode(p, mounts))
            for p in dict.fromkeys(Path(os.path.abspath(p.expanduser())) for p in settings.paths)
        ]
        self._real_roots = tuple(os.path.realpath(r.key) for r in self._roots)
        self._table = ReadinessTable(settings.settle_seconds)
        self._cv = threading.Condition()
        self._roots_lock = threading.RLock()
        self._stop = threading.Event()
        self._blocked = False
        self._period = max(0.02, min(0.1, settings.settle_seconds / 4))
        self._observer: BaseObserver | None = None
        self._threads: list[threading.Thread] = []
        self._kick = threading.Event()  # wakes the scanner for a limit error or an overflow
        self._overflow_at = -_OVERFLOW_BURST_GAP  # monotonic time of the last overflow
        self._scans = 0
        self._started = False
        self._caught_up = threading.Event()

    def _wanted_mode(self, path: Path, mounts: tuple[Mount, ...]) -> str:
        mode = self._settings.mode
        if mode in ("native", "poll"):
            return mode
        fs_type = fs_type_for(path, mounts)
        if is_remote_fs(fs_type):
            log.info("watch.remote_fs", path=str(path), fs_type=fs_type, mode="poll")
            return "poll"
        return "native"

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the observers, then the catch-up scan of every root (in the background)."""
        if self._started:
            return
        self._started = True
        if any(r.want == "native" for r in self._roots):
            self._observer = self._new_observer()
        ticker = threading.Thread(target=self._tick_loop, name="watcher-ticker", daemon=True)
        scanner = threading.Thread(target=self._scan_loop, name="watcher-scanner", daemon=True)
        self._threads = [ticker, scanner]
        for thread in self._threads:
            thread.start()

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until the catch-up scan has found every file already in the roots."""
        return self._caught_up.wait(timeout)

    def _new_observer(self) -> BaseObserver | None:
        try:
            if _IS_LINUX:
                # Full events tell a file moved in from outside apart from a fresh create.
                observer = inotify_observer(self._inotify_limit_hit, self._inotify_overflowed)
            else:
                observer = Observer()
            observer.start()
            return observer
        except OSError as exc:
            paths = [r.key for r in self._roots if r.want == "native"]
            if exc.errno in LIMITS:
                log.error("watch.inotify_limit", paths=paths, **limit_help(exc))
            else:
                log.error("watch.native_failed", paths=paths, error=str(exc))
            return None

    def stop(self) -> None:
        """Stop watching and join every thread; safe to call more than once."""
        self._stop.set()
        self._kick.set()
        with self._cv:
            self._cv.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._threads = []
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def modes(self) -> dict[Path, str]:
        """Each root and how it is watched: "native" or "poll"."""
        return {r.path: r.mode for r in self._roots}

    def pending_count(self) -> int:
        """Candidates not yet offered and accepted."""
        with self._cv:
            return len(self._table)

    def requeue(self, path: Path) -> None:
        """The file changed during upload: wait for it to settle again, then offer it again."""
        key = os.fspath(path)
        st = self._stat_regular(key)
        if st is None:
            return
        with self._cv:
            self._table.add(key, st, time.monotonic(), closed=True)
            self._cv.notify()
        log.info("file.requeued", path=key)

    def rescan(self) -> None:
        """Walk every root now; files not known and not already candidates become candidates."""
        started = time.monotonic()
        files = directories = 0
        with self._roots_lock:
            for root in self._roots:
                self._check_root(root)
                self._retry_native(root)
                if root.ident is not None:
                    found, listed = self._walk(root, root.key, changed_only=False)
                    files += found
                    directories += listed
        self._scans += 1
        log.info(
            "watch.scan_done",
            reason="catch-up" if self._scans == 1 else "rescan",
            roots=len(self._roots),
            files=files,
            directories=directories,
            seconds=round(time.monotonic() - started, 3),
        )

    def _full_scan(self, root: _Root, reason: str) -> None:
        """Walk one root completely: it (re)appeared, fell back to polling, or overflowed."""
        if root.ident is None:
            return
        started = time.monotonic()
        # After lost events, or with no events from now on, a candidate's close may never come.
        events_lost = reason in ("overflow", "fallback")
        files, directories = self._walk(root, root.key, changed_only=False, events_lost=events_lost)
        log.info(
            "watch.scan_done",
            reason=reason,
            path=root.key,
            files=files,
            directories=directories,
            seconds=round(time.monotonic() - started, 3),
        )

    # ----- roots -------------------------------------------------------------------------

    def _check_root(self, root: _Root) -> bool:
        """Notice a root appearing, vanishing, being replaced or unmounted; True when (re)watched.

        One stat per root and poll: a vanished or unmounted root costs nothing while it is away.
        """
        try:
            st = os.stat(root.key)
            ident: tuple[int, int] | None = (
                (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
            )
        except OSError:
            ident = None
        if root.lost:
            root.lost = False
            self._unwatch(root)
            root.ident = None
        if ident == root.ident:
            if ident is None and not root.missing_logged:
                root.missing_logged = True
                log.error("watch.root_missing", path=root.key, detail="will watch when it appears")
            return False
        was_mounted = root.mounted
        if root.ident is not None:
            self._unwatch(root)
            with self._cv:
                self._table.discard_under(root.key)
        root.ident = ident
        if ident is None:
            root.missing_logged = True
            root.mounted = False
            log.error("watch.root_missing", path=root.key, detail="will watch when it reappears")
            return False
        root.mounted = os.path.ismount(root.key)
        if was_mounted and not root.mounted:
            # A lazy unmount leaves the bare mount point: watched too (files written there are
            # real), and the change of device when the filesystem returns starts a catch-up.
            root.missing_logged = True
            log.error(
                "watch.root_missing",
                path=root.key,
                detail="its filesystem was unmounted; will catch up when it is mounted again",
            )
        elif root.missing_logged:
            root.missing_logged = False
            log.info("watch.root_back", path=root.key, mounted=root.mounted)
        if self._settings.mode == "auto":
            root.want = self._wanted_mode(root.path, read_mounts())
        self._watch(root)
        return True

    def _watch(self, root: _Root) -> None:
        root.dirs.clear()
        root.mode = root.want
        root.limit_error = None
        root.overflowed = False
        root.fallback_limit = None
        if root.want == "native":
            if self._observer is None:
                root.mode = "poll"
            else:
                try:
                    root.watch = self._observer.schedule(
                        _Handler(self, root),
                        root.key,
                        recursive=self._settings.recursive,
                        event_filter=_WANTED_EVENTS,
                    )
                except OSError as exc:
                    if exc.errno in LIMITS:
                        root.limit_error = exc
                    else:
                        log.error("watch.native_failed", path=root.key, error=str(exc))
                        log.warning("watch.fallback_poll", path=root.key)
                        root.mode = "poll"
                if root.limit_error is not None:  # the root's or a subdirectory's watch
                    self._fall_back(root)
        log.info("watch.started", path=root.key, mode=root.mode)

    def _unwatch(self, root: _Root) -> None:
        watch, root.watch = root.watch, None
        if watch is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)

    def _fall_back(self, root: _Root) -> None:
        """An inotify limit refused a watch in this root: poll all of it, with one error."""
        exc, root.limit_error = root.limit_error, None
        if exc is None or root.mode != "native":
            return
        self._unwatch(root)  # a partial watch would miss events; give its watches back
        root.mode = "poll"
        root.dirs.clear()
        if exc.errno == errno.ENOSPC:
            root.fallback_limit = inotify_limit("max_user_watches")
        log.error("watch.inotify_limit", path=root.key, **limit_help(exc))

    def _retry_native(self, root: _Root) -> None:
        """After the watch limit was raised, a root that fell back to polling is watched again."""
        if root.fallback_limit is None or root.ident is None or root.mode != "poll":
            return
        now = inotify_limit("max_user_watches")
        if now is None or now <= root.fallback_limit:
            return
        log.info("watch.native_retry", path=root.key, limit_value=now)
        self._watch(root)

    def _inotify_limit_hit(self, key: str, exc: OSError) -> None:
        """Observer threads: a watch in root `key` was refused. Only flag it: the scanner acts."""
        for root in self._roots:
            if root.key == key:
                root.limit_error = exc
        self._kick.set()

    def _inotify_overflowed(self, key: str) -> None:
        """Observer thread: inotify dropped events (watchdog has re-added its watches)."""
        for root in self._roots:
            if root.key == key:
                root.overflowed = True
        self._kick.set()

    def _handle_kicks(self) -> None:
        """Act on what observer threads flagged: fall back to polling, or rescan after overflow."""
        with self._roots_lock:
            overflowed = []
            for root in self._roots:
                if root.limit_error is not None:
                    was = root.mode
                    self._fall_back(root)
                    if root.mode != was:
                        self._full_scan(root, "fallback")
                if root.overflowed:
                    root.overflowed = False
                    if root.mode == "native" and root.ident is not None:
                        overflowed.append(root)
            if not overflowed:
                return
            now = time.monotonic()
            if now - self._overflow_at >= _OVERFLOW_BURST_GAP:
                log.warning(
                    "watch.overflow",
                    paths=[r.key for r in overflowed],
                    max_queued_events=inotify_limit("max_queued_events"),
                    detail="inotify queue overflowed and events were lost; rescanning",
                )
            self._overflow_at = now
            for root in overflowed:
                self._full_scan(root, "overflow")

    # ----- filtering and stat --------------------------------------------------------------

    def _ignored(self, root: _Root, path: str) -> bool:
        rel = path[len(root.key) :].lstrip(os.sep)
        return any(self._ignore.match(part) for part in rel.split(os.sep) if part)

    def _stat_regular(self, path: str) -> os.stat_result | None:
        """Stat a would-be candidate; None for directories and vanished paths.

        A regular file (or a symlink to one inside the roots) gives its own stat. A FIFO,
        socket, device or a symlink out of the roots gives its lstat: it is never read, but the
        daemon records why it was not uploaded, once (the ledger knows it by that lstat).
        """
        try:
            link = os.lstat(path)
            if stat.S_ISDIR(link.st_mode):
                return None
            if not stat.S_ISLNK(link.st_mode):
                return link
            if not self._settings.follow_symlinks_outside and not self._inside_roots(path):
                return link
            st = os.stat(path)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return st
        return None if stat.S_ISDIR(st.st_mode) else link

    def _inside_roots(self, path: str) -> bool:
        target = os.path.realpath(path)
        return any(
            target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in self._real_roots
        )

    def _consider(
        self, root: _Root, path: str, *, closed: bool, how: str, reset: bool = False
    ) -> None:
        """A possibly new file: becomes a candidate unless ignored, irregular or already known.

        `reset` restarts waiting from a fresh stat even when the path is already a candidate.
        """
        if self._ignored(root, path):
            return
        with self._cv:
            if path in self._table and not reset:
                self._table.saw_activity(path, time.monotonic())
                return
        st = self._stat_regular(path)
        if st is None or self._is_known(Path(path), st):
            return
        if not stat.S_ISREG(st.st_mode):
            closed = True  # never written through here: only waits to be rejected
        if not closed and (st.st_nlink > 1 or os.path.islink(path)):
            closed = True  # a new link is complete the moment it exists: no close will come
        with self._cv:
            if path in self._table and not reset and how == "scan":
                return
            first = path not in self._table
            self._table.add(path, st, time.monotonic(), closed=closed)
            self._cv.notify()
        # One info line when a file first appears; later events for it are debug detail.
        (log.info if first else log.debug)("file.seen", path=path, via=how, size=st.st_size)

    # ----- events ---------------------------------------------------------------------------

    def _on_event(self, root: _Root, event: FileSystemEvent) -> None:
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path)
        await_close = _IS_LINUX and root.mode == "native"
        if event.is_directory:
            if src == root.key and kind in ("deleted", "moved"):
                root.lost = True
            if kind in ("deleted", "moved") and src:
                with self._cv:
                    self._table.discard_under(src)
            # inotify misses files made in a new directory before its watch exists: scan it.
            new_dir = src if kind == "created" else dest if kind == "moved" else ""
            recursive = self._settings.recursive
            if recursive and new_dir and new_dir != root.key and not self._ignored(root, new_dir):
                self._walk(root, new_dir, changed_only=False)
            return
        if kind == "moved":
            if src:
                with self._cv:
                    self._table.discard(src)
            if dest:
                self._consider(root, dest, closed=True, how="moved", reset=True)
        elif kind == "deleted":
            with self._cv:
                self._table.discard(src)
        elif kind == "created":
            closed = event.is_synthetic or not await_close
            self._consider(root, src, closed=closed, how="created")
        elif kind == "modified":
            with self._cv:
                if self._table.saw_write(src, time.monotonic(), await_close=await_close):
                    self._cv.notify()
                    return
            self._consider(root, src, closed=not await_close, how="modified")
        elif kind == "closed":
            self._consider(root, src, closed=True, how="closed", reset=True)

    # ----- scanning ---------------------------------------------------------------------------

    def _walk(
        self, root: _Root, top: str, *, changed_only: bool, events_lost: bool = False
    ) -> tuple[int, int]:
        """Find files below `top` with os.scandir; in poll mode list only changed directories.

        With `events_lost`, candidates already waiting restart waiting for a stable stat instead
        of a close event. Returns how many files and directories were listed.
        """
        track = root.mode == "poll" and top == root.key
        recursive = self._settings.recursive
        racy_ns = time.time_ns() - int((self._settings.poll_seconds + 2) * 1e9)
        stack = list(root.dirs) if changed_only else [top]
        files = directories = 0
        while stack and not self._stop.is_set():
            directory = stack.pop()
            if track:
                try:
                    mtime = os.stat(directory).st_mtime_ns
                except OSError:
                    root.dirs.pop(directory, None)
                    continue
                # A directory changed within the timestamp granularity is listed again.
                if changed_only and root.dirs.get(directory) == mtime and mtime < racy_ns:
                    continue
                root.dirs[directory] = mtime
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        files += self._scan_entry(
                            root, entry, stack, recursive, changed_only and track, events_lost
                        )
            except OSError:
                continue
            directories += 1
        return files, directories

    def _scan_entry(
        self,
        root: _Root,
        entry: os.DirEntry[str],
        stack: list[str],
        recursive: bool,
        known_dirs: bool,
        events_lost: bool,
    ) -> int:
        """Queue a subdirectory for listing or consider a file; 1 when it was a file."""
        if self._ignore.match(entry.name):
            return 0
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive and not (known_dirs and entry.path in root.dirs):
                    stack.append(entry.path)
                return 0
            # files, symlinks, and FIFOs/sockets/devices (recorded as rejected)
            self._consider(root, entry.path, closed=True, how="scan", reset=events_lost)
        except OSError:
            return 0
        return 1

    def _scan_loop(self) -> None:
        """Catch-up scan, then polling, root checks and periodic rescans."""
        try:
            self.rescan()
        finally:
            self._caught_up.set()
        poll_every = max(0.05, self._settings.poll_seconds)
        next_poll = time.monotonic() + poll_every
        next_rescan = self._next_rescan()
        while not self._stop.is_set():
            now = time.monotonic()
            wake = min(next_poll, next_rescan or next_poll)
            self._kick.wait(max(0.0, wake - now))
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self._handle_kicks()
                now = time.monotonic()
                if next_rescan is not None and now >= next_rescan:
                    self.rescan()
                    next_rescan = self._next_rescan()
                    next_poll = time.monotonic() + poll_every
                elif now >= next_poll:
                    self._poll()
                    next_poll = time.monotonic() + poll_every
            except Exception:
                log.exception("watch.scan_failed")
                next_poll = time.monotonic() + poll_every  # never spin on a persistent failure

    def _next_rescan(self) -> float | None:
        every = self._settings.rescan_seconds
        if every <= 0:
            return None
        return time.monotonic() + every * random.uniform(0.9, 1.1)

    def _poll(self) -> None:
        with self._roots_lock:
            for root in self._roots:
                if self._check_root(root):
                    self._full_scan(root, "appeared")
                elif root.ident is not None and root.mode == "poll":
                    self._walk(root, root.key, changed_only=True)

    # ----- readiness ticker --------------------------------------------------------------------

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                self._cv.wait(self._wait_time())
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception:
                log.exception("watch.tick_failed")

    def _wait_time(self) -> float | None:
        if self._table.has_ready():
            return self._period if self._blocked else 0.0
        due = self._table.next_due()
        if due is None:
            return None  # nothing pending: sleep until an event arrives
        wait = due - time.monotonic()
        return max(wait, 0.02) if wait > 0 else 0.0

    def _tick(self) -> None:
        with self._cv:
            due = self._table.take_due(time.monotonic(), _CHECK_BATCH)
        checked = [(path, cand, self._stat_regular(path)) for path, cand in due]
        now = time.monotonic()
        with self._cv:
            verdicts = [(p, self._table.check(p, c, st, now), st) for p, c, st in checked]
            batch = self._table.ready_batch(_OFFER_BATCH)
        for path, verdict, st in verdicts:
            if verdict is Verdict.READY:
                log.info("file.ready", path=path, size=st.st_size if st else None)
            elif verdict is Verdict.READY_WITHOUT_CLOSE:
                log.info("file.ready_without_close", path=path, quiet_seconds=self._table.quiet)
        self._blocked = False
        for path in batch:
            try:
                accepted = self._on_ready(Path(path))
            except Exception:
                log.exception("file.offer_failed", path=path)
                accepted = False
            if not accepted:
                self._blocked = True  # the daemon's queue is full: offer again next tick
                break
            with self._cv:
                self._table.accepted(path)
            log.debug("file.offered", path=path)
