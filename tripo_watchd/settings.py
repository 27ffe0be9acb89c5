"""The configuration as frozen dataclasses, with every default in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_IGNORE = (".*", "*.tmp", "*.part", "*.crdownload", "*~")
DEFAULT_INBOX = Path("~/Tripo/inbox")


def default_state_dir() -> Path:
    """systemd's StateDirectory= when it set one, else ~/.local/state/tripo-watchd."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given) if given else Path("~/.local/state/tripo-watchd").expanduser()


@dataclass(frozen=True)
class ApiSettings:
    """[api]: where the Tripo API is and how to talk to it."""

    base_url: str = "https://api.tripo3d.ai/v2/openapi"
    api_key_file: Path | None = None
    timeout_seconds: float = 30.0
    protocol: str = "v2-sts"  # v2-sts | v3
    allow_insecure_http: bool = False
    ca_bundle: Path | None = None
    max_uploads_per_minute: float = 0.0  # 0 = no client-side pacing
    max_retry_after_seconds: float = 60.0


@dataclass(frozen=True)
class S3Settings:
    """[s3]: how bytes reach the bucket the token names."""

    region: str = "us-west-2"
    endpoint_url: str = ""
    accelerate: str = "auto"  # auto | always | never
    accelerate_endpoint_url: str = "https://s3-accelerate.amazonaws.com"
    accelerate_threshold_bytes: int = 100 * 1024
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    max_concurrency: int = 4
    allow_insecure_http: bool = False
    ca_bundle: Path | None = None
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 60.0
    max_bandwidth: str = ""  # "" = no cap; e.g. "20MB/s", shared by all workers
    progress_log_seconds: float = 5.0  # 0 = no upload.progress events


@dataclass(frozen=True)
class WatchSettings:
    """[watch]: which folders, how to notice files and when a file is ready."""

    paths: tuple[Path, ...] = (DEFAULT_INBOX.expanduser(),)
    recursive: bool = True
    settle_seconds: float = 1.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    mode: str = "auto"  # auto | native | poll
    poll_seconds: float = 2.0
    rescan_seconds: float = 600.0
    follow_symlinks_outside: bool = False


@dataclass(frozen=True)
class WorkerSettings:
    """[workers]: how many files are sent at once."""

    count: int = 4


@dataclass(frozen=True)
class LedgerSettings:
    """[ledger]: where outcomes are recorded."""

    path: Path = field(default_factory=lambda: default_state_dir() / "ledger.jsonl")


@dataclass(frozen=True)
class LimitsSettings:
    """[limits]: what Tripo accepts, as its documentation states it."""

    image_min_px: int = 20
    image_max_px: int = 6000
    image_max_bytes: int = 20 * 1024 * 1024
    model_max_bytes: int = 150 * 1024 * 1024


@dataclass(frozen=True)
class PipelineSettings:
    """[pipeline]: dedupe and what happens to a file after its outcome is recorded."""

    dedupe: str = "content"  # content | path | off
    after_upload: str = "keep"  # keep | move | delete
    done_dir: Path | None = None
    rejected_dir: Path | None = None
    max_attempts: int = 5


@dataclass(frozen=True)
class HookSettings:
    """[hooks]: commands run after each outcome, with the ledger record as JSON on stdin."""

    on_uploaded: tuple[str, ...] = ()  # argv list, no shell; () = none
    on_rejected: tuple[str, ...] = ()
    timeout_seconds: float = 30.0
    max_workers: int = 2


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: the Prometheus endpoint."""

    listen: str = ""  # "" = off; e.g. "127.0.0.1:9464"
    allow_remote: bool = False  # the endpoint has no auth: loopback only unless true


@dataclass(frozen=True)
class Settings:
    """The whole configuration; `source` is the file it came from, if any."""

    api: ApiSettings = field(default_factory=ApiSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None
