"""watchdog's inotify observer, plus the limit and overflow reports watchdog keeps to itself."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import cast

import structlog
from watchdog.observers.api import BaseObserver

from tripo_watchd.mounts import inotify_limit

log = structlog.get_logger("tripo_watchd.watcher")

# errno of a refused inotify call -> the sysctl (under fs.inotify.) that sets the limit.
LIMITS = {errno.ENOSPC: "max_user_watches", errno.EMFILE: "max_user_instances"}
_SUGGESTED = {"max_user_watches": 524288, "max_user_instances": 1024}


def limit_help(exc: OSError) -> dict[str, object]:
    """Log fields naming the inotify limit behind `exc`, its value and how to raise it."""
    name = LIMITS.get(exc.errno or 0, "max_user_watches")
    return {
        "limit": f"fs.inotify.{name}",
        "limit_value": inotify_limit(name),
        "error": str(exc),
        "detail": (
            f"inotify limit fs.inotify.{name} reached; polling instead. Raise it with "
            f"`sudo sysctl -w fs.inotify.{name}={_SUGGESTED[name]}` and keep it in "
            "/etc/sysctl.d/90-tripo-watchd.conf"
        ),
    }


def inotify_observer(
    on_limit: Callable[[str, OSError], None], on_overflow: Callable[[str], None]
) -> BaseObserver:
    """An InotifyObserver that also reports what watchdog 7.x handles silently.

    watchdog raises an inotify limit error only for the root of a watch; a subdirectory it cannot
    watch (at scheduling, or created later) is skipped without a word. On a queue overflow it
    re-adds the watches but emits no event. Each watch group therefore gets a stand-in for the
    shared InotifyFD that reports limit errors before passing them on, and an overflow hook.
    With a watchdog lacking these internals the plain observer is used: limits are then seen
    only at the root, and overflows only by the periodic rescan.
    """
    from watchdog.observers.inotify import InotifyObserver

    observer = InotifyObserver(generate_full_events=True)
    try:
        from watchdog.observers.inotify import InotifyFullEmitter, InotifyWatchGroup
        from watchdog.observers.inotify_c import (
            CallbackId,
            InotifyFD,
            Mask,
            WatchCallback,
            WatchDescriptor,
        )
    except ImportError:
        log.warning("watch.limit_hooks_unavailable", detail="watchdog internals differ")
        return observer
    if getattr(observer, "_emitter_class", None) is not InotifyFullEmitter or not hasattr(
        InotifyWatchGroup, "on_queue_overflow"
    ):
        log.warning("watch.limit_hooks_unavailable", detail="watchdog internals differ")
        return observer

    class Spy:
        """The shared InotifyFD as one watch group sees it, reporting refused watches."""

        def __init__(self, fd: InotifyFD, key: str) -> None:
            self._fd = fd
            self._key = key

        def add_callback(
            self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
        ) -> WatchDescriptor:
            try:
                return self._fd.add_callback(path, mask, callback, id_)
            except OSError as exc:
                if exc.errno in LIMITS:
                    on_limit(self._key, exc)
                raise

        def remove_callbacks(self, callbacks: list[tuple[WatchDescriptor, CallbackId]]) -> None:
            self._fd.remove_callbacks(callbacks)

    class Group(InotifyWatchGroup):
        def on_queue_overflow(self) -> None:
            super().on_queue_overflow()  # watches are re-added first, so a rescan misses nothing
            on_overflow(os.fsdecode(self.path))

    class Emitter(InotifyFullEmitter):
        def on_thread_start(self) -> None:
            # InotifyEmitter.on_thread_start, with the spy standing in for the shared InotifyFD.
            key = os.fsdecode(self.watch.path)
            self._inotify = Group(
                cast(InotifyFD, Spy(self._inotify_fd, key)),
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

    observer._emitter_class = Emitter
    return observer
