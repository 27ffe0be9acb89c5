"""The running daemon: watcher → bounded queue → worker threads, lifecycle, status, sd_notify."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from tripo_watchd.errors import AuthError, FileChanged, TripoWatchdError
from tripo_watchd.hooks import HookRunner
from tripo_watchd.ledger import JsonlLedger
from tripo_watchd.logs import register_secret
from tripo_watchd.metrics import Metrics, MetricsServer, MetricsSink, NullMetrics, outcome_of
from tripo_watchd.notify import Notifier
from tripo_watchd.pipeline import Pipeline
from tripo_watchd.placement import Placement
from tripo_watchd.protocols import UploadProtocol
from tripo_watchd.protocols.registry import make_protocol
from tripo_watchd.records import Record, utc_now
from tripo_watchd.retry import queue_failed_again
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import HookSettings, MetricsSettings, Settings
from tripo_watchd.watcher import Watcher

log = structlog.get_logger(__name__)

ProtocolFactory = Callable[[Settings, Callable[[], Secret]], UploadProtocol]


def status_path_for(settings: Settings) -> Path:
    """Where the daemon keeps its status file: beside the ledger."""
    return settings.ledger.path.with_name("status.json")


@dataclass
class Stats:
    """What this run has done so far; guarded by the daemon's lock."""

    started_at: str = field(default_factory=utc_now)
    uploaded: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    last_error: str | None = None
    last_upload: dict[str, Any] | None = None


class _KeyWatcher:
    """Re-reads the API key while uploads are paused by a 401, with a growing backoff."""

    def __init__(self, key: Any, resume: threading.Event, stop: threading.Event) -> None:
        self._key = key
        self._resume = resume
        self._stop = stop
        self.min_seconds = float(os.environ.get("TRIPO_WATCHD_AUTH_RETRY_SECONDS", "60"))

    def wait_for_new_key(self) -> None:
        delay = self.min_seconds
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            if self._key.reload():
                log.warning("auth.key_changed", action="resuming uploads")
                return
            if time.monotonic() >= deadline:
                log.warning("auth.retrying", after_seconds=round(delay))
                return
            self._stop.wait(min(1.0, delay))


class Daemon:
    """Owns the queue and the workers; `run()` blocks until `stop()` is called."""

    def __init__(
        self,
        settings: Settings,
        api_key: Any,
        *,
        dry_run: bool = False,
        notifier: Notifier | None = None,
        protocol_factory: ProtocolFactory | None = None,
        load_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._api_key = api_key
        self._dry_run = dry_run
        self._notifier = notifier or Notifier()
        self._protocol_factory = protocol_factory or (
            lambda s, key: make_protocol(s, key, register_secret)
        )
        self._load_settings = load_settings
        self._ledger = JsonlLedger(settings.ledger.path)
        self._queue: queue.Queue[Path] = queue.Queue(maxsize=max(8, settings.workers.count * 4))
        self._lock = threading.Lock()
        self._in_flight: set[Path] = set()
        self._leftovers_tried: set[Path] = set()
        self._placement = Placement(settings.pipeline)
        self._busy = 0
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._retry_failed = threading.Event()
        self._auth_ok = threading.Event()
        self._auth_ok.set()
        self._auth_lock = threading.Lock()
        self._key_refused = False  # until a request with the key succeeds again
        self._stats = Stats()
        self._workers: list[threading.Thread] = []
        self._generation = 0
        self._watcher: Watcher | None = None
        self._hooks = _hook_runner(settings.hooks)
        self._metrics: MetricsSink = Metrics() if settings.metrics.listen else NullMetrics()
        self._metrics_server: MetricsServer | None = None

    # -- public ------------------------------------------------------------------------------

    def run(self) -> int:
        """Watch and upload until stopped; return the process exit code."""
        self._serve_metrics()
        self._start_generation()
        assert self._watcher is not None
        self._wait_caught_up()
        log.info(
            "daemon.started",
            roots=[str(p) for p in self.settings.watch.paths],
            modes={str(k): v for k, v in self._watcher.modes().items()},
            workers=self.settings.workers.count,
            ledger=str(self.settings.ledger.path),
            protocol=self.settings.api.protocol,
            dry_run=self._dry_run,
        )
        self._write_status()
        self._notifier.ready(self._status_line())
        ping_every = self._notifier.watchdog_interval()
        last_summary = last_status = 0.0
        while not self._stop.is_set():
            self._stop.wait(min(1.0, ping_every or 1.0))
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
            if self._retry_failed.is_set():
                self._retry_failed.clear()
                self._do_retry_failed()
            now = time.monotonic()
            if ping_every:
                self._notifier.watchdog_ping()
            if now - last_status >= 2.0:
                last_status = now
                self._write_status()
                self._notifier.status(self._status_line())
                figures = self._figures()
                self._metrics.set_queue(figures["queued"], figures["in_flight"])
            if now - last_summary >= 60.0 and (self._busy or not self._queue.empty()):
                last_summary = now
                log.info("daemon.summary", **self._figures())
        self._shutdown()
        return 0

    def _serve_metrics(self) -> None:
        if not isinstance(self._metrics, Metrics):
            return
        listen = self.settings.metrics.listen
        try:
            self._metrics_server = self._metrics.serve(
                listen, allow_remote=self.settings.metrics.allow_remote
            )
            server = self._metrics_server
            log.info("metrics.listening", host=server.host, port=server.port)
        except (OSError, ValueError) as exc:
            log.error("metrics.failed", listen=listen, reason=str(exc))

    def _wait_caught_up(self) -> None:
        """READY means watched and caught up: wait for the first scan, keeping systemd informed."""
        ping = self._notifier.watchdog_interval()
        while self._watcher is not None and not self._stop.is_set():
            if self._watcher.wait_caught_up(min(0.5, ping or 0.5)):
                return
            if ping:
                self._notifier.watchdog_ping()
            self._notifier.status("catching up: scanning the watched folders")

    def stop(self) -> None:
        """Ask the daemon to finish the files in flight and return from `run()`."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the daemon to re-read its configuration (SIGHUP)."""
        self._reload.set()

    def request_retry_failed(self) -> None:
        """Ask the daemon to queue every failed file again (SIGUSR1, `retry-failed`)."""
        self._retry_failed.set()

    # -- watcher side ------------------------------------------------------------------------

    def _offer(self, path: Path) -> bool:
        with self._lock:
            if path in self._in_flight:
                return True
            try:
                self._queue.put_nowait(path)
            except queue.Full:
                return False
            self._in_flight.add(path)
        log.debug("file.queued", path=str(path))
        return True

    def _is_known(self, path: Path, st: os.stat_result) -> bool:
        with self._lock:
            if path in self._in_flight:
                return True
        if not self._ledger.is_done(str(path), st.st_size, st.st_mtime_ns):
            return False
        self._place_leftover(path)
        return True

    def _place_leftover(self, path: Path) -> None:
        """Finish the move or delete of a recorded file that is still in its folder.

        That happens when the daemon stopped between a file's record and its after-upload step
        (SIGKILL, power loss); each such path is tried once per run, so a move that keeps
        failing is not retried at every rescan.
        """
        placement = self._placement
        if self._dry_run or not placement.moves_files:
            return  # the common case, taken for every known file of a catch-up scan
        with self._lock:
            if path in self._leftovers_tried:
                return
            self._leftovers_tried.add(path)
        last = self._ledger.last_for_path(str(path))
        if last is None or last.status not in ("uploaded", "rejected"):
            return
        log.info("file.after_upload_resumed", path=str(path), status=last.status)
        if last.status == "uploaded":
            placement.uploaded(path)
        else:
            placement.rejected(path)

    # -- workers -----------------------------------------------------------------------------

    def _start_generation(self) -> None:
        self._generation += 1
        generation = self._generation
        roots = tuple(root.resolve() for root in self.settings.watch.paths)
        self._placement = Placement(self.settings.pipeline, roots)
        self._watcher = Watcher(self.settings.watch, self._offer, is_known=self._is_known)
        self._workers = [
            threading.Thread(
                target=self._work, args=(generation,), name=f"worker-{generation}-{n}", daemon=True
            )
            for n in range(self.settings.workers.count)
        ]
        for thread in self._workers:
            thread.start()
        self._watcher.start()

    def _work(self, generation: int) -> None:
        settings = self.settings
        protocol = self._protocol_factory(settings, self._api_key)
        pipeline = Pipeline(
            settings,
            self._ledger,
            protocol,
            roots=settings.watch.paths,
            dry_run=self._dry_run,
            stop=self._stop,
            metrics=self._metrics,
        )
        try:
            while not self._stop.is_set() and generation == self._generation:
                if not self._auth_ok.wait(timeout=0.5):
                    continue
                try:
                    path = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._handle(pipeline, path)
        finally:
            protocol.close()

    def _handle(self, pipeline: Pipeline, path: Path) -> None:
        with self._lock:
            self._busy += 1
        then: Callable[[], None] | None = None  # what to do with the path once it is released
        try:
            record = pipeline.process(path)
            if record.attempts:  # the API took the key for this file
                self._key_works()
            self._count(record)
            if not self._dry_run:
                self._metrics.file_done(outcome_of(record), record.size or 0, record.seconds)
                self._hooks.submit(record.to_json(), record.status)
        except FileChanged as exc:
            log.info("file.changed", path=str(path), reason=exc.message)
            watcher = self._watcher
            if watcher is not None:
                then = lambda: watcher.requeue(path)  # noqa: E731
        except AuthError as exc:
            self._pause_for_auth(exc)
            then = lambda: self._offer_again(path)  # noqa: E731
        except TripoWatchdError as exc:
            log.info("file.deferred", path=str(path), reason=exc.message)
        except Exception:  # a bug must never stop the daemon: log it, keep the file pending
            log.exception("file.crashed", path=str(path))
            with self._lock:
                self._stats.last_error = f"internal error on {path}"
        finally:
            with self._lock:
                self._busy -= 1
                self._in_flight.discard(path)
        if then is not None:
            then()

    def _offer_again(self, path: Path) -> None:
        while not self._stop.is_set() and not self._offer(path):
            self._stop.wait(0.2)

    def _pause_for_auth(self, exc: AuthError) -> None:
        if not self._auth_lock.acquire(blocking=False):
            return  # another worker is already handling the pause
        try:
            if not self._auth_ok.is_set():
                return
            self._auth_ok.clear()
            self._key_refused = True
            self._metrics.set_auth(False)
            message = (
                f"{exc.message}; uploads are paused. Put a valid key in place "
                "(it is re-read automatically); nothing is marked failed."
            )
            with self._lock:
                self._stats.last_error = message
            log.error("auth.failed", reason=message, trace_id=exc.trace_id)
            self._notifier.status("paused: the Tripo API key was refused")
            watcher = _KeyWatcher(self._api_key, self._auth_ok, self._stop)
            threading.Thread(target=self._await_key, args=(watcher,), daemon=True).start()
        finally:
            self._auth_lock.release()

    def _await_key(self, watcher: _KeyWatcher) -> None:
        watcher.wait_for_new_key()
        self._auth_ok.set()  # let one worker try; the key is "ok" again only once it works

    def _key_works(self) -> None:
        if self._key_refused:
            self._key_refused = False
            self._metrics.set_auth(True)
            log.info("auth.ok", action="uploads resumed")

    def _count(self, record: Record) -> None:
        with self._lock:
            stats = self._stats
            if record.status == "uploaded":
                if record.duplicate_of:
                    stats.duplicates += 1
                else:
                    stats.uploaded += 1
                    stats.bytes_uploaded += record.size or 0
                stats.last_upload = {"path": record.path, "key": record.key, "at": record.at}
            elif record.status == "rejected":
                stats.rejected += 1
            elif record.status == "failed":
                stats.failed += 1
                stats.last_error = f"{record.path}: {record.reason}"

    # -- lifecycle ---------------------------------------------------------------------------

    def _do_reload(self) -> None:
        if self._load_settings is None:
            return
        self._notifier.reloading()
        try:
            new = self._load_settings()
        except TripoWatchdError as exc:
            log.error("config.reload_failed", reason=exc.message)
            self._notifier.ready(self._status_line())
            return
        if new.ledger.path != self.settings.ledger.path:
            log.warning("config.reload_ledger_unchanged", reason="ledger.path needs a restart")
            new = _with_ledger(new, self.settings)
        old_watcher = self._watcher
        old = self.settings
        self.settings = new
        self._reload_hooks(old.hooks, new.hooks)
        self._reload_metrics(old.metrics, new.metrics)
        if old_watcher is not None:
            old_watcher.stop()
        self._start_generation()  # old workers finish their current file and leave
        self._wait_caught_up()
        log.info("config.reloaded", roots=[str(p) for p in new.watch.paths])
        self._write_status()
        self._notifier.ready(self._status_line())

    def _reload_hooks(self, old: HookSettings, new: HookSettings) -> None:
        """New hook commands apply to the next outcome; hooks already running may finish."""
        if new == old:
            return
        retired, self._hooks = self._hooks, _hook_runner(new)
        threading.Thread(
            target=retired.close, kwargs={"wait": 10}, name="hooks-retired", daemon=True
        ).start()
        log.info(
            "hooks.reloaded", on_uploaded=bool(new.on_uploaded), on_rejected=bool(new.on_rejected)
        )

    def _reload_metrics(self, old: MetricsSettings, new: MetricsSettings) -> None:
        """Serve /metrics where `[metrics]` now says (counters kept), or stop serving it."""
        if new == old:
            return
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        if not new.listen:
            self._metrics = NullMetrics()
            return
        if not isinstance(self._metrics, Metrics):
            self._metrics = Metrics()
            self._metrics.set_auth(not self._key_refused)
        self._serve_metrics()

    def _do_retry_failed(self) -> None:
        count = queue_failed_again(self._ledger)
        log.info("daemon.retry_failed", files=count)
        watcher = self._watcher
        if watcher is not None:
            threading.Thread(target=watcher.rescan, name="retry-rescan", daemon=True).start()

    def _shutdown(self) -> None:
        self._notifier.stopping()
        log.info("daemon.stopping", in_flight=self._busy, queued=self._queue.qsize())
        if self._watcher is not None:
            self._watcher.stop()
        deadline = time.monotonic() + float(os.environ.get("TRIPO_WATCHD_STOP_GRACE", "60"))
        for thread in self._workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._hooks.close(wait=10)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._write_status(running=False)
        self._ledger.close()
        log.info("daemon.stopped", **self._figures())

    # -- status ------------------------------------------------------------------------------

    def _figures(self) -> dict[str, Any]:
        with self._lock:
            stats = self._stats
            return {
                "queued": self._queue.qsize(),
                "in_flight": self._busy,
                "pending": self._watcher.pending_count() if self._watcher else 0,
                "uploaded": stats.uploaded,
                "duplicates": stats.duplicates,
                "rejected": stats.rejected,
                "failed": stats.failed,
                "bytes": stats.bytes_uploaded,
            }

    def _status_line(self) -> str:
        f = self._figures()
        state = "paused (API key refused)" if self._key_refused else "watching"
        return (
            f"{state}: {f['queued']} queued, {f['in_flight']} in flight, "
            f"{f['uploaded']} uploaded, {f['failed']} failed"
        )

    def _write_status(self, running: bool = True) -> None:
        path = status_path_for(self.settings)
        with self._lock:
            stats = self._stats
            document = {
                "running": running,
                "pid": os.getpid(),
                "started_at": stats.started_at,
                "updated_at": utc_now(),
                "auth": "refused" if self._key_refused else "ok",
                "roots": {
                    str(k): v for k, v in (self._watcher.modes() if self._watcher else {}).items()
                },
                "last_error": stats.last_error,
                "last_upload": stats.last_upload,
                "ledger": str(self.settings.ledger.path),
                "ledger_counts": self._ledger.counts(),
            }
        document.update(self._figures())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(document, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("status.write_failed", reason=str(exc))


def _hook_runner(hooks: HookSettings) -> HookRunner:
    return HookRunner(
        hooks.on_uploaded, hooks.on_rejected, hooks.timeout_seconds, hooks.max_workers
    )


def _with_ledger(new: Settings, old: Settings) -> Settings:
    from dataclasses import replace

    return replace(new, ledger=old.ledger)
