"""Bytes to S3 with boto3: one client per worker and route, signed per file."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import botocore.session
from boto3.s3.transfer import ProgressCallbackInvoker, TransferConfig
from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, Credentials
from botocore.exceptions import BotoCoreError, ClientError
from botocore.loaders import Loader, create_loader
from s3transfer.manager import TransferManager
from s3transfer.utils import signal_not_transferring, signal_transferring

from tripo_watchd.errors import (
    CredentialsExpired,
    NetworkError,
    StorageAccessDenied,
    StorageUnavailable,
    TlsError,
    TransferError,
)
from tripo_watchd.progress import Progress
from tripo_watchd.protocols import Body, ProgressFactory
from tripo_watchd.protocols.tripo_api import untrusted_certificate
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import S3Settings
from tripo_watchd.throttle import Bandwidth, ThrottledReader, parse_rate, shared_bandwidth

_AWS_ACCELERATE_HOSTS = {"s3-accelerate.amazonaws.com", "s3-accelerate.dualstack.amazonaws.com"}
_REGION_IN_HOST = re.compile(
    r"^s3[.-](?:dualstack\.)?([a-z]{2}(?:-gov)?-[a-z]+-\d)\.amazonaws\.com"
)
_EXPIRED_CODES = {"ExpiredToken", "InvalidAccessKeyId", "InvalidToken", "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "NoSuchBucket", "InvalidBucketName"}
_PROC_FD = Path("/proc/self/fd")  # Linux: a name for an open descriptor, reopenable per part


@dataclass(frozen=True)
class StsCredentials:
    """Temporary credentials for one file; every field hidden from repr."""

    access_key: Secret
    secret_key: Secret
    session_token: Secret


@dataclass(frozen=True)
class Route:
    """Which S3 endpoint and signing region one transfer goes through."""

    endpoint_url: str | None  # None: botocore's own (AWS accelerate)
    region: str
    accelerate: bool
    shown: str  # what the ledger calls this endpoint


def region_of(s3_host: str, default: str) -> str:
    """The region named in an S3 host (s3.us-west-2.amazonaws.com), else `default`."""
    if s3_host in ("s3.amazonaws.com", "s3-external-1.amazonaws.com"):
        return "us-east-1"
    match = _REGION_IN_HOST.match(s3_host)
    return match.group(1) if match else default


def choose_route(settings: S3Settings, s3_host: str, size: int) -> Route:
    """The endpoint for a file of `size` bytes, by `s3.accelerate` and `s3.endpoint_url`."""
    region = region_of(s3_host, settings.region)
    use_accelerate = settings.accelerate == "always" or (
        settings.accelerate == "auto" and size > settings.accelerate_threshold_bytes
    )
    if use_accelerate:
        url = settings.accelerate_endpoint_url.rstrip("/")
        if urlsplit(url).hostname in _AWS_ACCELERATE_HOSTS:
            return Route(None, region, True, url)
        return Route(url, region, True, url)
    url = settings.endpoint_url.rstrip("/") if settings.endpoint_url else f"https://{s3_host}"
    return Route(url, region, False, url)


class _SwappableCredentials(Credentials):  # type: ignore[misc]
    """Credentials a worker's long-lived client signs with; swapped before each file."""

    def __init__(self) -> None:
        super().__init__("unset", "unset", None)

    def swap(self, creds: StsCredentials) -> None:
        self.access_key = creds.access_key.reveal()
        self.secret_key = creds.secret_key.reveal()
        self.token = creds.session_token.reveal()


class _FixedProvider(CredentialProvider):  # type: ignore[misc]
    METHOD = "tripo-sts"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


_loader_lock = threading.Lock()
_loader: Loader | None = None


def _shared_loader() -> Loader:
    """One botocore data loader for every client in the process.

    Each botocore session otherwise parses S3's service model and endpoint rules again: about
    90 ms of CPU per client, paid by every worker on its first file (9 ms with this).
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
        return _loader


class _Channel:
    """One boto3 client (one connection pool) for one route, and its transfer manager."""

    def __init__(self, settings: S3Settings, route: Route) -> None:
        self.credentials = _SwappableCredentials()
        core = botocore.session.Session()
        core.register_component("data_loader", _shared_loader())
        core.register_component(
            "credential_provider", CredentialResolver([_FixedProvider(self.credentials)])
        )
        s3_options: Any = {}
        if route.endpoint_url is None:
            s3_options["use_accelerate_endpoint"] = True
        elif not route.endpoint_url.startswith("https://s3"):
            s3_options["addressing_style"] = "path"
        paced_http = bool(settings.max_bandwidth) and (route.endpoint_url or "").startswith(
            "http://"
        )
        if not paced_http:
            # Every body carries a CRC32 (below) that S3 checks. Over https botocore then skips
            # SHA-256-signing the body; over http (loopback only) it would sign anyway: a
            # second full pass over every byte that protects nothing the CRC32 does not.
            s3_options["payload_signing_enabled"] = False
        config = Config(
            region_name=route.region,
            signature_version="s3v4",
            s3=s3_options,
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            max_pool_connections=max(2, settings.max_concurrency + 1),
            tcp_keepalive=True,
            # Paced over http, the body is SHA-256-signed instead (one unpaced pass either way).
            request_checksum_calculation="when_required" if paced_http else "when_supported",
        )
        verify: str | bool = str(settings.ca_bundle) if settings.ca_bundle else True
        self.client = boto3.Session(botocore_session=core).client(
            "s3", endpoint_url=route.endpoint_url, config=config, verify=verify
        )
        # As s3transfer does: reads made to sign a body are not paced or counted as progress.
        events = self.client.meta.events
        events.register_first(
            "request-created.s3", signal_not_transferring, unique_id="s3upload-not-transferring"
        )
        events.register_last(
            "request-created.s3", signal_transferring, unique_id="s3upload-transferring"
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_threshold_bytes,
            multipart_chunksize=settings.multipart_chunk_bytes,
            max_concurrency=settings.max_concurrency,
            use_threads=True,
        )
        self._manager: TransferManager | None = None

    def manager(self) -> TransferManager:
        if self._manager is None:
            self._manager = TransferManager(self.client, self.transfer_config)
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
        self.client.close()


def map_s3_error(exc: Exception) -> TransferError | NetworkError | TlsError:
    """The errors.py meaning of a botocore/s3transfer failure (secrets never included)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _EXPIRED_CODES:
            return CredentialsExpired(f"S3 no longer accepts the upload credentials ({code})")
        if code in _DENIED_CODES or status == 403:
            return StorageAccessDenied(f"S3 denied the upload ({code or status})")
        return StorageUnavailable(f"S3 failed the upload ({code or status})")
    if isinstance(exc, botocore.exceptions.SSLError):
        where = str(exc.kwargs.get("endpoint_url", "S3"))
        return untrusted_certificate(where, "s3.ca_bundle", exc)
    if isinstance(exc, BotoCoreError):
        return NetworkError(f"could not reach S3: {type(exc).__name__}")
    return StorageUnavailable(f"the S3 transfer failed: {type(exc).__name__}")


class S3Sender:
    """One worker's S3 side: a client per route, reused for every file that worker sends."""

    def __init__(self, settings: S3Settings, progress_for: ProgressFactory | None = None) -> None:
        self._settings = settings
        self._channels: dict[Route, _Channel] = {}
        self._bandwidth = bandwidth_for(settings)
        self.progress_for: ProgressFactory = progress_for or self._log_progress

    def _log_progress(self, body: Body) -> Callable[[int], None] | None:
        seconds = self._settings.progress_log_seconds
        if not seconds or body.size < self._settings.multipart_threshold_bytes:
            return None
        return Progress(body.size, path=str(body.path), interval_seconds=seconds)

    def put(self, route: Route, bucket: str, key: str, creds: StsCredentials, body: Body) -> None:
        """Send `body` to bucket/key; multipart above the threshold; raise from errors.py."""
        channel = self._channels.get(route)
        if channel is None:
            channel = self._channels[route] = _Channel(self._settings, route)
        channel.credentials.swap(creds)
        progress = self.progress_for(body)
        paced = self._bandwidth is not None or progress is not None
        multipart = body.size >= self._settings.multipart_threshold_bytes
        try:
            if body.data is not None:
                data: Any = body.data
                if paced:
                    data = ThrottledReader(body.data, self._bandwidth, callback=progress)
                channel.client.put_object(Bucket=bucket, Key=key, Body=data)
            elif multipart and self._bandwidth is None and _PROC_FD.is_dir():
                self._put_parts_in_parallel(channel, bucket, key, body, progress)
            else:
                with open_for_upload(body) as stream:
                    source: Any = stream
                    if paced:
                        source = ThrottledReader(stream, self._bandwidth, callback=progress)
                    if multipart:
                        # Paced reads are the real pace: progress comes from them, not per part.
                        channel.manager().upload(source, bucket, key).result()
                    else:
                        channel.client.put_object(Bucket=bucket, Key=key, Body=source)
        except (ClientError, BotoCoreError) as exc:
            raise map_s3_error(exc) from exc
        except OSError as exc:
            raise map_s3_error(exc) from exc

    def _put_parts_in_parallel(
        self,
        channel: _Channel,
        bucket: str,
        key: str,
        body: Body,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Multipart upload in which every part is read by the thread that sends it.

        s3transfer reads a file object's parts one after another in one thread, but opens a
        file *name* once per part, in that part's thread. The name given is /proc/self/fd/N of
        the descriptor opened here (O_NOFOLLOW), so every part reads this very inode even if the
        path is swapped meanwhile; the digest hashes the file in a thread of its own alongside.
        """
        fd = open_nofollow(body.path)
        try:
            hashing = body.digest.alongside(fd) if body.digest is not None else nullcontext()
            subscribers = [ProgressCallbackInvoker(progress)] if progress else None
            with hashing:
                channel.manager().upload(
                    str(_PROC_FD / str(fd)), bucket, key, subscribers=subscribers
                ).result()
        finally:
            os.close(fd)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def bandwidth_for(settings: S3Settings) -> Bandwidth | None:
    """The process-wide bandwidth bucket `s3.max_bandwidth` asks for, if any."""
    rate = settings.max_bandwidth
    return shared_bandwidth(parse_rate(rate)) if rate else None


def open_nofollow(path: Path) -> int:
    """A read-only descriptor of `path`, refusing a symlink swapped in since it was checked."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)


def open_for_upload(body: Body) -> Any:
    """Open the file to stream it, refusing to follow a symlink swapped in since it was checked.

    If the body carries a digest, the stream feeds it (it goes innermost, under any pacing).
    """
    stream = os.fdopen(open_nofollow(body.path), "rb")
    return stream if body.digest is None else body.digest.reader(stream)
