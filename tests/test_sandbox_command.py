"""`tripo-watchd sandbox`, the README's first command: the real daemon with no API key needed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from support import cli_env, png_bytes, wait_for


def test_sandbox_uploads_a_dropped_file_and_stops_cleanly(tmp_path: Path) -> None:
    """The sandbox starts the emulator and S3, uploads a dropped file, and exits 0 on Ctrl-C."""
    inbox = tmp_path / "tripo-inbox"
    log = tmp_path / "sandbox.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tripo_watchd.cli",
                "--log-format",
                "json",
                "sandbox",
                str(inbox),
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=cli_env(),
        )
    try:
        wait_for(lambda: "daemon.started" in log.read_text() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()
        assert f"drop files into:  {inbox}" in log.read_text()
        (inbox / "hello.png").write_bytes(png_bytes(256, 256))
        ledger = tmp_path / "tripo-inbox-state" / "ledger.jsonl"
        wait_for(lambda: ledger.exists() and '"uploaded"' in ledger.read_text(), 30)
        record = json.loads(ledger.read_text().splitlines()[0])
        assert record["path"] == str(inbox / "hello.png") and record["bucket"] == "tripo-data"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
