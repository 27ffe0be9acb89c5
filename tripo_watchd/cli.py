"""The command line: parse arguments, wire the pieces, map outcomes to exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tripo_watchd import __version__
from tripo_watchd.errors import AuthError, ConfigError, TripoWatchdError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tripo-watchd",
        description="Watch folders and upload every new file to Tripo 3D's storage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="JSON lines when stderr is not a terminal (auto), or force one",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if config:
            sub.add_argument(
                "--config",
                "-c",
                type=Path,
                help="TOML configuration file (default: $TRIPO_WATCHD_CONFIG, "
                "~/.config/tripo-watchd/config.toml, /etc/tripo-watchd/config.toml, "
                "else built-in defaults)",
            )
        return sub

    run = command("run", "watch the configured folders and upload until stopped")
    run.add_argument("--dry-run", action="store_true", help="detect and validate only")
    upload = command("upload", "upload the given files once, print each record as a JSON line")
    upload.add_argument("files", nargs="+", type=Path)
    upload.add_argument("--dry-run", action="store_true", help="validate only; no token, no upload")
    check = command("check", "validate the configuration (and with --online, the API key)")
    check.add_argument("--online", action="store_true", help="ask the API which protocol works")
    ledger = command("ledger", "print ledger records as JSON lines")
    ledger.add_argument("--status", choices=["uploaded", "rejected", "failed"])
    status = command("status", "show what a running daemon is doing")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command("retry-failed", "queue every failed file again")
    sandbox = command(
        "sandbox", "run the daemon on DIR against a local Tripo emulator and S3 (no API key)", False
    )
    sandbox.add_argument("dir", nargs="?", type=Path, default=Path("tripo-inbox"))
    sandbox.add_argument("--workers", type=int, default=4)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tripo_watchd.logs import configure_logging

    json_output = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(json_output=json_output, level=args.log_level)
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except AuthError as exc:
        _say(f"error: {exc.message}. Check the key (see `tripo-watchd check --online`).")
        return EXIT_USAGE
    except ConfigError as exc:
        _say(f"error: {exc.message}")
        return EXIT_USAGE
    except TripoWatchdError as exc:
        _say(f"error: {exc.message}")
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        return 130


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _settings(args: argparse.Namespace) -> Any:
    from tripo_watchd.config import default_config_path, load_settings

    if args.config is None:
        args.config = default_config_path()
    return load_settings(args.config)


def _cmd_check(args: argparse.Namespace) -> int:
    from tripo_watchd.config import api_key_help, load_api_key

    settings = _settings(args)
    key = load_api_key(settings.api)
    where = settings.source or "built-in defaults"
    _say(f"configuration OK ({where})")
    if key is None:
        _say(f"warning: no API key found; {api_key_help()}")
    if args.online:
        if key is None:
            return EXIT_USAGE
        from tripo_watchd.probe import probe_protocols

        results = probe_protocols(settings, key)
        for name, verdict in results.items():
            _say(f"  {name}: {verdict}")
        working = [name for name, verdict in results.items() if verdict == "works"]
        if not working:
            return EXIT_SOME_FAILED
        if settings.api.protocol not in working:
            _say(f'set api.protocol = "{working[0]}" in the configuration')
            return EXIT_SOME_FAILED
    return EXIT_OK


def _cmd_upload(args: argparse.Namespace) -> int:
    import threading

    from tripo_watchd.apikey import ApiKeySource
    from tripo_watchd.ledger import JsonlLedger
    from tripo_watchd.logs import register_secret
    from tripo_watchd.pipeline import Pipeline
    from tripo_watchd.protocols.registry import make_protocol

    settings = _settings(args)
    key = _NoKey() if args.dry_run else ApiKeySource(settings.api)
    if not args.dry_run:
        register_secret(key().reveal(), pinned=True)
    ledger = JsonlLedger(settings.ledger.path)
    bars: list[Any] = []

    def progress_bar(body: Any) -> Any:
        from tripo_watchd.progress import TerminalBar

        bar = TerminalBar(sys.stderr, body.size, label=body.path.name)
        bars.append(bar)
        return bar

    progress = progress_bar if sys.stderr.isatty() else None
    protocol = make_protocol(settings, key, register_secret, progress)
    pipeline = Pipeline(settings, ledger, protocol, dry_run=args.dry_run, stop=threading.Event())
    worst = EXIT_OK
    try:
        for path in args.files:
            record = pipeline.process(path)
            for bar in bars:
                bar.finish()
            bars.clear()
            print(record.to_json(), flush=True)
            if record.status in ("rejected", "failed"):
                worst = EXIT_SOME_FAILED
    finally:
        protocol.close()
        ledger.close()
    return worst


class _NoKey:
    def __call__(self) -> Any:
        raise ConfigError("no API key is needed in a dry run")


def _cmd_ledger(args: argparse.Namespace) -> int:
    from tripo_watchd.ledger import read_records

    settings = _settings(args)
    if not settings.ledger.path.exists():
        _say(f"no ledger yet at {settings.ledger.path}")
        return EXIT_OK
    for record in read_records(settings.ledger.path, args.status):
        print(record.to_json())
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from tripo_watchd.config import load_settings
    from tripo_watchd.settings import DEFAULT_INBOX

    settings = _settings(args)
    default_inbox = DEFAULT_INBOX.expanduser()
    if settings.watch.paths == (default_inbox,) and default_inbox.parent.is_dir():
        default_inbox.mkdir(exist_ok=True)  # the workstation default: make it on first run
    return _run_daemon(settings, dry_run=args.dry_run, reload=lambda: load_settings(args.config))


def _run_daemon(settings: Any, *, dry_run: bool, reload: Any = None, api_key: Any = None) -> int:
    from tripo_watchd.apikey import ApiKeySource
    from tripo_watchd.daemon import Daemon
    from tripo_watchd.logs import register_secret

    if api_key is None:
        api_key = _NoKey() if dry_run else ApiKeySource(settings.api)
    if not dry_run:
        register_secret(api_key().reveal(), pinned=True)
    daemon = Daemon(settings, api_key, dry_run=dry_run, load_settings=reload)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    signal.signal(signal.SIGUSR1, lambda *_: daemon.request_retry_failed())
    return daemon.run()


def _cmd_status(args: argparse.Namespace) -> int:
    from tripo_watchd.daemon import status_path_for
    from tripo_watchd.status import describe, read_status

    settings = _settings(args)
    document = read_status(status_path_for(settings))
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(describe(document))
    return EXIT_OK if document.get("running") else EXIT_SOME_FAILED


def _cmd_retry_failed(args: argparse.Namespace) -> int:
    from tripo_watchd.daemon import status_path_for
    from tripo_watchd.ledger import JsonlLedger
    from tripo_watchd.retry import queue_failed_again
    from tripo_watchd.status import read_status

    settings = _settings(args)
    document = read_status(status_path_for(settings))
    if document.get("running"):
        os.kill(int(document["pid"]), signal.SIGUSR1)
        _say(f"asked the running daemon (pid {document['pid']}) to retry its failed files")
        return EXIT_OK
    ledger = JsonlLedger(settings.ledger.path)
    try:
        count = queue_failed_again(ledger)
    finally:
        ledger.close()
    _say(f"{count} failed file(s) will be uploaded again at the next start")
    return EXIT_OK


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from tripo_watchd.sandbox.run import run_sandbox

    return run_sandbox(args.dir, workers=args.workers, run_daemon=_run_daemon, say=_say)


_COMMANDS = {
    "run": _cmd_run,
    "upload": _cmd_upload,
    "check": _cmd_check,
    "ledger": _cmd_ledger,
    "status": _cmd_status,
    "retry-failed": _cmd_retry_failed,
    "sandbox": _cmd_sandbox,
}

if __name__ == "__main__":
    sys.exit(main())
