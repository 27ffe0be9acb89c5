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

from tripo_watchd.mounts import Mount, fs_type_for, is_remote_fs, read_mounts
from tripo_watchd.readiness import ReadinessTable, Verdict
from tripo_watchd.settings import WatchSettings

log = structlog.get_logger(__name__)

_IS_LINUX = sys.platform.startswith("linux")
_CHECK_BATCH = 1000  # stats per tick at most, so one tick never stalls for long
_OFFER_BATCH = 256
_INOTIFY_HELP = (
    "inotify limit reached (fs.inotify.max_user_watches / fs.inotify.max_user_instances); "
    "polling this folder instead. Raise the limits, e.g. "
    "`sudo sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=1024` "
    "and persist them in /etc/sysctl.d/90-tripo-watchd.conf"
)


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

    __slots__ = ("dirs", "ident", "key", "lost", "missing_logged", "mode", "path", "want", "watch")

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
        self._limit_logged = False
        self._started = False

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

    def _new_observer(self) -> BaseObserver | None:
        try:
            if _IS_LINUX:
                from watchdog.observers.inotify import InotifyObserver

                # Full events tell a file moved in from outside apart from a fresh create.
                observer: BaseObserver = InotifyObserver(generate_full_events=True)
            else:
                observer = Observer()
            observer.start()
            return observer
        except OSError as exc:
            self._log_native_failure(None, exc)
            return None

    def stop(self) -> None:
        """Stop watching and join every thread; safe to call more than once."""
        self._stop.set()
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
        with self._roots_lock:
            for root in self._roots:
                if self._check_root(root):
                    continue  # (re)appeared: already fully scanned
                if root.ident is not None:
                    self._walk(root, root.key, changed_only=False)

    # ----- roots -------------------------------------------------------------------------

    def _check_root(self, root: _Root) -> bool:
        """Notice a root appearing, vanishing or being replaced; True when it was just scanned."""
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
        if root.ident is not None:
            self._unwatch(root)
            with self._cv:
                self._table.discard_under(root.key)
        root.ident = ident
        if ident is None:
            root.missing_logged = True
            log.error("watch.root_missing", path=root.key, detail="will watch when it reappears")
            return False
        root.missing_logged = False
        self._watch(root)
        self._walk(root, root.key, changed_only=False)
        return True

    def _watch(self, root: _Root) -> None:
        root.dirs.clear()
        root.mode = root.want
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
                    self._log_native_failure(root, exc)
                    root.mode = "poll"
        log.info("watch.started", path=root.key, mode=root.mode)

    def _unwatch(self, root: _Root) -> None:
        watch, root.watch = root.watch, None
        if watch is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)

    def _log_native_failure(self, root: _Root | None, exc: OSError) -> None:
        path = root.key if root else None
        if exc.errno in (errno.ENOSPC, errno.EMFILE):
            if not self._limit_logged:
                self._limit_logged = True
                log.error("watch.inotify_limit", path=path, error=str(exc), detail=_INOTIFY_HELP)
        else:
            log.error("watch.native_failed", path=path, error=str(exc))
        log.warning("watch.fallback_poll", path=path)

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
            self._table.add(path, st, time.monotonic(), closed=closed)
            self._cv.notify()
        log.debug("file.seen", path=path, via=how, size=st.st_size)

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

    def _walk(self, root: _Root, top: str, *, changed_only: bool) -> None:
        """Find files below `top` with os.scandir; in poll mode list only changed directories."""
        track = root.mode == "poll" and top == root.key
        recursive = self._settings.recursive
        racy_ns = time.time_ns() - int((self._settings.poll_seconds + 2) * 1e9)
        stack = list(root.dirs) if changed_only else [top]
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
                        self._scan_entry(root, entry, stack, recursive, changed_only and track)
            except OSError:
                continue

    def _scan_entry(
        self,
        root: _Root,
        entry: os.DirEntry[str],
        stack: list[str],
        recursive: bool,
        known_dirs: bool,
    ) -> None:
        if self._ignore.match(entry.name):
            return
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive and not (known_dirs and entry.path in root.dirs):
                    stack.append(entry.path)
            else:  # files, symlinks, and FIFOs/sockets/devices (recorded as rejected)
                self._consider(root, entry.path, closed=True, how="scan")
        except OSError:
            pass

    def _scan_loop(self) -> None:
        """Catch-up scan, then polling, root checks and periodic rescans."""
        self.rescan()
        poll_every = max(0.05, self._settings.poll_seconds)
        next_poll = time.monotonic() + poll_every
        next_rescan = self._next_rescan()
        while not self._stop.is_set():
            now = time.monotonic()
            wake = min(next_poll, next_rescan or next_poll)
            if self._stop.wait(max(0.0, wake - now)):
                return
            now = time.monotonic()
            try:
                if next_rescan is not None and now >= next_rescan:
                    self.rescan()
                    next_rescan = self._next_rescan()
                elif now >= next_poll:
                    self._poll()
                next_poll = time.monotonic() + poll_every
            except Exception:
                log.exception("watch.scan_failed")

    def _next_rescan(self) -> float | None:
        every = self._settings.rescan_seconds
        if every <= 0:
            return None
        return time.monotonic() + every * random.uniform(0.9, 1.1)

    def _poll(self) -> None:
        with self._roots_lock:
            for root in self._roots:
                if not self._check_root(root) and root.ident is not None and root.mode == "poll":
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
                log.debug("file.ready", path=path, size=st.st_size if st else None)
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
