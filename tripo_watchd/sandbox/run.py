"""`tripo-watchd sandbox`: the real daemon on a folder, against the emulator and a local S3."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tripo_watchd.errors import ConfigError
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import (
    ApiSettings,
    LedgerSettings,
    S3Settings,
    Settings,
    WatchSettings,
    WorkerSettings,
)

SANDBOX_KEY = "tsk_sandbox"


def sandbox_settings(
    inbox: Path, state: Path, api_base_url: str, s3_endpoint_url: str, workers: int = 4
) -> Settings:
    """Settings that point the daemon at the local emulator and S3 server."""
    return replace(
        Settings(),
        api=ApiSettings(base_url=api_base_url),
        s3=S3Settings(endpoint_url=s3_endpoint_url, accelerate_endpoint_url=s3_endpoint_url),
        watch=WatchSettings(paths=(inbox,), settle_seconds=0.5, rescan_seconds=60.0),
        workers=WorkerSettings(count=workers),
        ledger=LedgerSettings(path=state / "ledger.jsonl"),
    )


def run_sandbox(
    inbox: Path,
    *,
    workers: int,
    run_daemon: Callable[..., int],
    say: Callable[[str], None],
) -> int:
    """Start the local S3 server and the emulator, then run the daemon on `inbox` until stopped."""
    try:
        from tripo_watchd.sandbox.emulator import TripoEmulator
        from tripo_watchd.sandbox.s3server import S3Server
    except ImportError as exc:
        raise ConfigError(
            "the sandbox needs its extra: pip install 'tripo-watchd[sandbox]'"
        ) from exc
    inbox = inbox.expanduser().resolve()
    state = inbox.with_name(inbox.name + "-state")
    inbox.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    with S3Server(state) as s3, TripoEmulator(s3, api_keys={SANDBOX_KEY}) as emulator:
        settings = sandbox_settings(
            inbox, state, emulator.base_url, s3.endpoint_url, workers=workers
        )
        say(_banner(inbox, state, emulator, s3))
        key: Any = lambda: Secret(SANDBOX_KEY)  # noqa: E731
        key.reload = lambda: False
        return int(run_daemon(settings, dry_run=False, api_key=key))


def _banner(inbox: Path, state: Path, emulator: Any, s3: Any) -> str:
    return "\n".join(
        [
            "tripo-watchd sandbox: a local Tripo API emulator and S3 server, no API key needed.",
            f"  drop files into:  {inbox}",
            f"  ledger:           {state / 'ledger.jsonl'}",
            f"  Tripo emulator:   {emulator.base_url}",
            f"  S3 (moto):        {s3.endpoint_url} bucket {s3.bucket}",
            "  try: cp some.png " + str(inbox) + "/   then: tail -f " + str(state / "ledger.jsonl"),
            "  stop with Ctrl-C.",
        ]
    )
