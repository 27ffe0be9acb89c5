"""One file, start to end: validate → hash → dedupe → protocol → record → after-upload."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from tripo_watchd.digest import StreamDigest
from tripo_watchd.errors import (
    AuthError,
    CredentialsExpired,
    FileChanged,
    LedgerError,
    RateLimited,
    RejectedFile,
    TripoWatchdError,
)
from tripo_watchd.formats import Accepted, inspect, precheck
from tripo_watchd.ledger import LedgerBackend
from tripo_watchd.metrics import MetricsSink, NullMetrics
from tripo_watchd.placement import Placement
from tripo_watchd.protocols import Body, Destination, UploadProtocol
from tripo_watchd.records import Record, utc_now
from tripo_watchd.settings import Settings

log = structlog.get_logger(__name__)

_READ_CHUNK = 1024 * 1024
_IN_MEMORY_MAX = 16 * 1024 * 1024


@dataclass(frozen=True)
class Signature:
    """What says a file is unchanged without reading it: size and mtime."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TripoWatchdError) and exc.transient and not isinstance(exc, FileChanged)


def describe_file_type(mode: int) -> str:
    """A person's word for a non-regular file type."""
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "not a regular file"


class _StopWhenSet(stop_base):  # type: ignore[misc]
    """Tenacity stop condition: the daemon is shutting down."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._event.is_set()


class Pipeline:
    """Takes one path to its outcome; one instance per worker (it holds that worker's protocol)."""

    def __init__(
        self,
        settings: Settings,
        ledger: LedgerBackend,
        protocol: UploadProtocol,
        *,
        roots: tuple[Path, ...] = (),
        dry_run: bool = False,
        stop: threading.Event | None = None,
        sleep: Callable[[float], object] | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._protocol = protocol
        self._roots = tuple(root.resolve() for root in roots)
        self._placement = Placement(settings.pipeline, self._roots)
        self._dry_run = dry_run
        self._stop = stop or threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._stop.wait
        self._metrics: MetricsSink = metrics or NullMetrics()

    def process(self, path: Path) -> Record:
        """Upload, dedupe or reject `path` and return the record written to the ledger.

        Raises FileChanged (wait and try again), AuthError (pause the whole daemon), or a transient
        error when asked to stop mid-way (the file stays pending for the next start).
        """
        path = Path(os.path.abspath(path))
        logger = log.bind(path=str(path))
        started = time.monotonic()
        try:
            accepted, signature, sha256, body = self._read(path)
        except RejectedFile as exc:
            return self._reject(path, exc.message, logger)
        except FileNotFoundError:
            return self._reject(
                path, "the file was deleted or moved away before it was read", logger
            )
        except PermissionError:
            return self._reject(path, "the file cannot be read (permission denied)", logger)
        base = Record(
            path=str(path),
            status="uploaded",
            size=signature.size,
            mtime_ns=signature.mtime_ns,
            sha256=sha256,
            format=accepted.kind.format,
        )
        earlier = self._earlier_upload(base) if sha256 is not None else None
        if earlier is not None:
            shared = {k: v for k, v in earlier.to_dict().items() if k in _DESTINATION_FIELDS}
            record = replace(base, **shared, duplicate_of=earlier.path)
            return self._finish(path, self._record(record, logger))
        if self._dry_run:
            logger.info("file.would_upload", format=accepted.kind.format, size=signature.size)
            return replace(base, status="would-upload")
        try:
            destination, attempts = self._send(accepted, body, logger)
        except TripoWatchdError as exc:
            if isinstance(exc, AuthError) or (exc.transient and self._stop.is_set()):
                raise
            failed = replace(
                base,
                status="failed",
                reason=exc.message,
                attempts=getattr(exc, "attempts", None),
                trace_id=getattr(exc, "trace_id", None),
                retryable=exc.transient,
            )
            return self._record(failed, logger)
        self._check_unchanged(path, signature)
        if sha256 is None:
            sha256 = self._sha256_after_upload(path, body, signature, logger)
        shared = {k: v for k, v in destination.ledger_fields().items() if v is not None}
        seconds = round(time.monotonic() - started, 3)
        record = replace(base, **shared, sha256=sha256, attempts=attempts, seconds=seconds)
        return self._finish(path, self._record(record, logger))

    def _reject(self, path: Path, reason: str, logger: Any) -> Record:
        try:
            st = os.lstat(path)
            size, mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime_ns = None, None
        record = Record(
            path=str(path), status="rejected", size=size, mtime_ns=mtime_ns, reason=reason
        )
        record = self._record(record, logger)
        self._place_rejected(path)
        return record

    # -- reading ---------------------------------------------------------------------------

    def _read(self, path: Path) -> tuple[Accepted, Signature, str | None, Body]:
        """Check and sign the file; hash it now unless its upload can hash it (sha256 None)."""
        st = os.lstat(path)
        real = path
        if stat.S_ISLNK(st.st_mode):
            real = path.resolve()
            outside = not any(real.is_relative_to(root) for root in self._roots)
            if self._roots and outside and not self._settings.watch.follow_symlinks_outside:
                raise RejectedFile("the file is a symlink that points outside the watched folders")
            st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise RejectedFile(f"the path is {describe_file_type(st.st_mode)}, not a regular file")
        precheck(path.name, st.st_size, self._settings.limits)  # before a byte is read
        fd = os.open(
            real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        )
        with os.fdopen(fd, "rb") as stream:
            st = os.fstat(stream.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RejectedFile(
                    f"the path is {describe_file_type(st.st_mode)}, not a regular file"
                )
            signature = Signature.of(st)
            if signature.size <= min(_IN_MEMORY_MAX, self._settings.s3.multipart_threshold_bytes):
                data = stream.read()
                if len(data) != signature.size:
                    raise FileChanged("the file changed size while it was read")
                accepted = inspect(path.name, io.BytesIO(data), len(data), self._settings.limits)
                sha256 = hashlib.sha256(data).hexdigest()
                body = Body(real, len(data), data)
            else:
                accepted = inspect(path.name, stream, signature.size, self._settings.limits)
                if self._hash_first(path, signature.size):
                    stream.seek(0)
                    sha256 = _sha256_of(stream)
                    body = Body(real, signature.size)
                else:
                    sha256 = None
                    body = Body(real, signature.size, digest=StreamDigest(signature.size))
            if Signature.of(os.fstat(stream.fileno())) != signature:
                raise FileChanged("the file changed while it was read")
        return accepted, signature, sha256, body

    def _hash_first(self, path: Path, size: int) -> bool:
        """Whether a big file must be hashed before its upload, or its upload can hash it.

        Only an earlier upload of the same size can be a duplicate (content dedupe) or the
        same file again (path dedupe); without one the file is read once, while it is sent.
        """
        mode = self._settings.pipeline.dedupe
        if self._dry_run:
            return True  # nothing is sent, so nothing could hash it
        if mode == "content":
            return self._ledger.may_hold_upload_of_size(size)
        if mode == "path":
            last = self._ledger.last_for_path(str(path))
            return last is not None and last.status == "uploaded" and last.size in (None, size)
        return False

    def _sha256_after_upload(
        self, path: Path, body: Body, signature: Signature, logger: Any
    ) -> str | None:
        """The sha256 the upload took on the way, or (if it skipped bytes) one of a new pass.

        None if the file is gone before that pass: it was sent whole, but its content is unknown.
        """
        sha256 = body.digest.hexdigest() if body.digest is not None else None
        if sha256 is not None:
            return sha256
        logger.info("file.hash_pass_after_upload", size=signature.size)
        try:
            with open(body.path, "rb") as stream:
                sha256 = _sha256_of(stream)
        except OSError as exc:
            logger.warning("file.unhashed", reason=str(exc))
            return None
        self._check_unchanged(path, signature)
        return sha256

    def _check_unchanged(self, path: Path, signature: Signature) -> None:
        try:
            now = Signature.of(os.stat(path))
        except FileNotFoundError:
            return  # sent complete; the user removed it since
        if now != signature:
            raise FileChanged("the file changed while it was being uploaded")

    # -- deciding ---------------------------------------------------------------------------

    def _earlier_upload(self, base: Record) -> Record | None:
        mode = self._settings.pipeline.dedupe
        if mode == "content" and base.sha256:
            return self._ledger.uploaded_with_sha256(base.sha256)
        if mode == "path":
            last = self._ledger.last_for_path(base.path)
            if last and last.status == "uploaded" and last.sha256 == base.sha256:
                return last
        return None

    # -- sending ----------------------------------------------------------------------------

    def _send(self, accepted: Accepted, body: Body, logger: Any) -> tuple[Destination, int]:
        cap = self._settings.api.max_retry_after_seconds

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, CredentialsExpired) and state.attempt_number == 1:
                return 0.0
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                return min(exc.retry_after, cap)
            return float(min(30.0, 0.5 * 2 ** (state.attempt_number - 1)))

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self._metrics.retry(type(exc).__name__)
            logger.warning(
                "upload.retry",
                attempt=state.attempt_number,
                error=type(exc).__name__,
                reason=getattr(exc, "message", str(exc)),
                wait=round(state.upcoming_sleep, 2),
            )

        retrying = Retrying(
            stop=stop_any(
                stop_after_attempt(self._settings.pipeline.max_attempts), _StopWhenSet(self._stop)
            ),
            wait=wait,
            retry=retry_if_exception(_is_retryable),
            sleep=self._sleep_for,
            before_sleep=log_retry,
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    asked = time.monotonic()
                    destination = self._protocol.destination(accepted.kind, body.size)
                    self._metrics.token_request(time.monotonic() - asked)
                    self._protocol.send(destination, body)
        except TripoWatchdError as exc:
            exc.attempts = attempts  # type: ignore[attr-defined]
            raise
        return destination, attempts

    def _sleep_for(self, seconds: float) -> None:
        self._sleep(seconds)

    # -- recording --------------------------------------------------------------------------

    def _record(self, record: Record, logger: Any) -> Record:
        record = replace(record, at=utc_now())
        delay = 0.5
        while not self._dry_run:
            try:
                self._ledger.append(record)
                break
            except LedgerError as exc:
                if self._stop.is_set():
                    raise
                logger.error("ledger.write_failed", reason=exc.message, retry_in=delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        fields = {k: v for k, v in record.to_dict().items() if k in _LOGGED_FIELDS}
        if record.status == "uploaded":
            logger.info("file.uploaded", **fields)
        elif record.status == "rejected":
            logger.warning("file.rejected", **fields)
        else:
            logger.error("file.failed", **fields)
        return record

    def _finish(self, path: Path, record: Record) -> Record:
        if not self._dry_run:
            self._placement.uploaded(path)
        return record

    def _place_rejected(self, path: Path) -> None:
        if not self._dry_run:
            self._placement.rejected(path)


def _sha256_of(stream: Any) -> str:
    """The SHA-256 of the rest of `stream`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    while chunk := stream.read(_READ_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


_DESTINATION_FIELDS = {"protocol", "bucket", "key", "uri", "file_token", "task_file", "endpoint"}
_LOGGED_FIELDS = {
    "duplicate_of",
    "key",
    "size",
    "seconds",
    "attempts",
    "reason",
    "format",
    "trace_id",
    "uri",
}
