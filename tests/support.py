"""Helpers shared by the end-to-end tests: config files, the CLI as a subprocess, sample files."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path,
    *,
    api_base_url: str,
    s3_endpoint_url: str,
    ledger: Path,
    key_file: Path | None = None,
    watch: list[Path] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A TOML config pointing at the emulator and the local S3 server."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": api_base_url, "timeout_seconds": 5},
        "s3": {"endpoint_url": s3_endpoint_url, "accelerate": "never"},
        "ledger": {"path": ledger},
        "watch": {"paths": watch or [path.parent / "inbox"], "settle_seconds": 0.2},
    }
    if key_file is not None:
        data["api"]["api_key_file"] = key_file
    for section, values in (sections or {}).items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_key(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIPO_", "AWS_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TRIPO_WATCHD_AUTH_RETRY_SECONDS": "1",
            # Hermetic: no personal config or key file of the machine's user is picked up.
            "XDG_CONFIG_HOME": "/nonexistent/tripo-watchd-tests",
        }
    )
    env.update(extra)
    return env


def run_cli(
    *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `tripo-watchd ARGS` as a real process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tripo_watchd.cli", "--log-format", "json", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(env or cli_env()),
        timeout=timeout,
    )


def records_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def png_bytes(
    width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def glb_bytes(payload: int = 1024) -> bytes:
    """A minimal GLB 2.0 container with a JSON chunk padded to `payload` bytes."""
    chunk = b'{"asset":{"version":"2.0"}}'
    chunk += b" " * ((-len(chunk)) % 4 + payload - payload % 4)
    body = struct.pack("<II", len(chunk), 0x4E4F534A) + chunk
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def unique_png(seed: int, width: int = 32, height: int = 32) -> bytes:
    return png_bytes(width, height, (seed % 256, (seed // 256) % 256, (seed // 65536) % 256))


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class DaemonProcess:
    """`tripo-watchd run` as a real subprocess; stderr (JSON logs) goes to a file we can read."""

    def __init__(self, config: Path, log: Path, *args: str, env: Mapping[str, str] | None = None):
        self.config = config
        self.log = log
        self.args = args
        self.env = dict(env or cli_env())
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tripo_watchd.cli",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "run",
            "--config",
            str(self.config),
            *self.args,
        ]

    def spawn(self, stderr: Any) -> subprocess.Popen[bytes]:
        """Start the process; subclasses change how (privileges, where stdout goes)."""
        return subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=stderr, env=self.env
        )

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as sink:
            self.proc = self.spawn(sink)
        if wait_ready:
            wait_for(lambda: self.events("daemon.started") or self._died(), timeout=30)
            assert self.proc.poll() is None, self.log.read_text()
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        if not self.log.exists():
            return out
        with open(self.log, "rb") as source:
            source.seek(self._offset)
            text = source.read().decode(errors="replace")
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
