"""User commands run after each outcome, off the upload path, with the ledger record on stdin."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import structlog

log = structlog.get_logger(__name__)

STDERR_TAIL = 1000  # characters of a failed hook's stderr kept for the log


@dataclass(frozen=True)
class _Run:
    argv: tuple[str, ...]
    record_json: str
    status: str
    path: str


class HookRunner:
    """Runs `on_uploaded` / `on_rejected` (argv lists, no shell) on a few background threads.

    `submit` never blocks: when `queue_size` runs are already waiting, the new run is dropped
    and logged (the upload itself is never affected). Failures are logged as `hook.failed`.
    """

    def __init__(
        self,
        on_uploaded: Sequence[str] | None,
        on_rejected: Sequence[str] | None,
        timeout_seconds: float = 30,
        max_workers: int = 2,
        *,
        queue_size: int = 100,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._commands: dict[str, tuple[str, ...]] = {}
        if on_uploaded:
            self._commands["uploaded"] = tuple(on_uploaded)
        if on_rejected:
            self._commands["rejected"] = tuple(on_rejected)
        self._timeout = timeout_seconds
        self._environ = dict(os.environ if environ is None else environ)
        self._queue: queue.Queue[_Run | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False
        self._abandon = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"hook-{n}", daemon=True)
            for n in range(max_workers if self._commands else 0)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, record_json: str, status: str) -> None:
        """Queue the hook for `status` ("uploaded" or "rejected"); other statuses have none."""
        argv = self._commands.get(status)
        if argv is None or self._closed:
            return
        path = _path_of(record_json)
        try:
            self._queue.put_nowait(_Run(argv, record_json, status, path))
        except queue.Full:
            log.warning(
                "hook.dropped",
                command=argv[0],
                status=status,
                path=path,
                reason="too many hook runs waiting",
            )

    def close(self, wait: float) -> None:
        """Stop taking runs; give queued and running hooks `wait` seconds, then kill the rest."""
        self._closed = True
        deadline = time.monotonic() + wait
        for _ in self._threads:
            self._put_sentinel(deadline)
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._abandon.set()
            with self._lock:
                running = list(self._running)
            for proc in running:
                _kill_group(proc)
            for thread in self._threads:
                thread.join(timeout=1.0)

    # -- workers ------------------------------------------------------------------------------

    def _put_sentinel(self, deadline: float) -> None:
        with contextlib.suppress(queue.Full):  # workers then notice `_abandon` instead
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            try:
                run = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._abandon.is_set():
                    return
                continue
            if run is None:
                return
            if self._abandon.is_set():
                log.warning(
                    "hook.dropped",
                    command=run.argv[0],
                    status=run.status,
                    path=run.path,
                    reason="the daemon is stopping",
                )
                continue
            try:
                self._run(run)
            except Exception:  # a hook must never take a worker thread down
                log.exception(
                    "hook.failed",
                    command=run.argv[0],
                    status=run.status,
                    path=run.path,
                    reason="internal error",
                )

    def _run(self, run: _Run) -> None:
        env = {**self._environ, "TRIPO_WATCHD_STATUS": run.status, "TRIPO_WATCHD_PATH": run.path}
        fields = {"command": run.argv[0], "status": run.status, "path": run.path}
        started = time.monotonic()
        with tempfile.TemporaryFile() as stderr:
            try:
                # A session of its own, so a timeout can kill everything the hook started.
                proc = subprocess.Popen(
                    run.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except FileNotFoundError:
                log.warning("hook.failed", **fields, reason="command not found")
                return
            except PermissionError:
                log.warning("hook.failed", **fields, reason="command is not executable")
                return
            except OSError as exc:
                log.warning("hook.failed", **fields, reason=f"cannot start: {exc.strerror or exc}")
                return
            with self._lock:
                self._running.add(proc)
            try:
                proc.communicate(run.record_json.encode("utf-8"), timeout=self._timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                timed_out = True
            finally:
                with self._lock:
                    self._running.discard(proc)
            seconds = round(time.monotonic() - started, 3)
            if timed_out:
                log.warning(
                    "hook.failed",
                    **fields,
                    seconds=seconds,
                    reason=f"timed out after {self._timeout:g} s; killed",
                    stderr=_tail(stderr),
                )
            elif proc.returncode != 0:
                log.warning(
                    "hook.failed",
                    **fields,
                    seconds=seconds,
                    exit_code=proc.returncode,
                    stderr=_tail(stderr),
                )
            else:
                log.debug("hook.done", **fields, seconds=seconds)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(stream: IO[bytes]) -> str:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - 4 * STDERR_TAIL))
    return stream.read().decode("utf-8", "replace")[-STDERR_TAIL:].strip()


def _path_of(record_json: str) -> str:
    try:
        path = json.loads(record_json).get("path", "")
    except (ValueError, AttributeError):
        return ""
    return path if isinstance(path, str) else ""
