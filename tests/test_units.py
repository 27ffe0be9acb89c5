"""Checks of the systemd units with `systemd-analyze verify` and `security --offline`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNITS = ("tripo-watchd.service", "tripo-watchd@.service")
USER_UNIT = UNITS / "user" / "tripo-watchd.service"
SYSTEM_BINARY = "/usr/bin/tripo-watchd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze without colours or pager, capturing both streams."""
    assert ANALYZE is not None
    full_env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", **(env or {})}
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )


def stub_binary(path: Path) -> Path:
    """An executable stand-in for tripo-watchd, so verify checks everything but the install path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, in order, comments and sections dropped."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@needs_analyze
@pytest.mark.parametrize("name", SYSTEM_UNITS)
def test_system_unit_verifies_cleanly(name: str, tmp_path: Path) -> None:
    """The system units load in systemd without a single warning."""
    text = (UNITS / name).read_text()
    assert text.count(SYSTEM_BINARY) == 1, "ExecStart should be the only use of the binary path"
    # The real binary is only installed on the target host; everything else is checked as is.
    binary = stub_binary(tmp_path / "bin" / "tripo-watchd")
    copy = tmp_path / "units" / name
    copy.parent.mkdir()
    copy.write_text(text.replace(SYSTEM_BINARY, str(binary)))

    result = analyze("verify", str(copy))

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_user_unit_verifies_cleanly(tmp_path: Path) -> None:
    """The user unit loads in a user manager without a single warning."""
    home = tmp_path / "home"
    stub_binary(home / ".local" / "bin" / "tripo-watchd")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)

    result = analyze(
        "--user", "verify", str(USER_UNIT), env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
@pytest.mark.parametrize("name", SYSTEM_UNITS)
def test_system_unit_exposure_is_low(name: str) -> None:
    """The system units keep systemd's exposure score at or below 2.0."""
    # --threshold is in tenths of the printed score: 20 means 2.0.
    result = analyze(
        "security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNITS / name)
    )

    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stdout + result.stderr


def test_instance_unit_has_the_same_hardening() -> None:
    """Every instance is sandboxed exactly like the single system service."""
    single = directives(UNITS / "tripo-watchd.service")
    instance = directives(UNITS / "tripo-watchd@.service")
    per_instance = {"Description", "ExecStart", "StateDirectory", "LogsDirectory", "LoadCredential"}

    assert single.keys() == instance.keys()
    for key in single.keys() - per_instance:
        assert single[key] == instance[key], key
    assert instance["ExecStart"] == [f"{SYSTEM_BINARY} run --config /etc/tripo-watchd/%i.toml"]
    assert instance["StateDirectory"] == ["tripo-watchd/%i"]


def test_units_agree_on_lifecycle() -> None:
    """All units start the daemon in the foreground with readiness, watchdog and reload."""
    for unit in (UNITS / "tripo-watchd.service", UNITS / "tripo-watchd@.service", USER_UNIT):
        found = directives(unit)
        assert found["Type"] == ["notify"], unit
        assert found["NotifyAccess"] == ["main"], unit
        assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"], unit
        assert found["Restart"] == ["on-failure"], unit
        assert found["WatchdogSec"] == ["60"], unit
        assert found["ExecStart"][0].split()[1] == "run", unit
        assert found["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"], unit
