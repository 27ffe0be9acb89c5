"""Running it for real: sd_notify, reload, status, retry-failed, metrics, hooks, cap, progress.

Every test here drives a real `tripo-watchd` subprocess against the Tripo emulator and moto S3.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import (
    DaemonProcess,
    cli_env,
    glb_bytes,
    read_ledger,
    records_of,
    run_cli,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator
from tripo_watchd.sandbox.s3server import free_port

WATCHDOG_USEC = 400_000
MIB = 1024 * 1024


class Site:
    """A watched inbox with its config, key, ledger and daemon log, against the test servers."""

    def __init__(self, tmp_path: Path, emulator: TripoEmulator, s3: S3Server, api_key: str):
        self.tmp = tmp_path
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        self.ledger = tmp_path / "state" / "ledger.jsonl"
        self.key_file = write_key(tmp_path / "api-key", api_key)
        self.config = tmp_path / "cfg.toml"
        self.log = tmp_path / "daemon.log"
        self.emulator = emulator
        self.s3 = s3
        self.configure()

    def configure(self, watch: list[Path] | None = None, **sections: dict[str, Any]) -> Path:
        merged: dict[str, dict[str, Any]] = {
            "watch": {"settle_seconds": 0.2, "rescan_seconds": 0},
            "workers": {"count": 2},
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        return write_config(
            self.config,
            api_base_url=self.emulator.base_url,
            s3_endpoint_url=self.s3.endpoint_url,
            ledger=self.ledger,
            key_file=self.key_file,
            watch=watch or [self.inbox],
            sections=merged,
        )

    def daemon(self, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        return DaemonProcess(self.config, self.log, *args, env=env)

    def cli(self, command: str, *args: str | Path) -> Any:
        return run_cli(command, "--config", self.config, *args)

    def records(self, status: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_ledger(self.ledger) if status is None or r["status"] == status]

    def ledger_lines(self) -> list[str]:
        return [line for line in self.ledger.read_text().splitlines() if line.strip()]

    def wait_uploaded(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.records("uploaded")) >= count, timeout=timeout)
        return self.records("uploaded")

    def latest(self, name: str) -> dict[str, Any] | None:
        mine = [r for r in self.records() if Path(r["path"]).name == name]
        return mine[-1] if mine else None


@pytest.fixture
def site(tmp_path: Path, emulator: TripoEmulator, s3_server: S3Server, api_key: str) -> Site:
    return Site(tmp_path, emulator, s3_server, api_key)


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path, on_first_ready: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.at_first_ready: Any = None  # what `on_first_ready` returned when READY=1 came
        self._on_first_ready = on_first_ready
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            first_ready = fields.get("READY") == "1" and self.at_first_ready is None
            if first_ready and self._on_first_ready is not None:
                self.at_first_ready = self._on_first_ready()
            with self._lock:
                self.messages.append((now, fields))

    def all(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def index_of(self, key: str, value: str | None = None, after: int = -1) -> int | None:
        for n, (_, fields) in enumerate(self.all()):
            if n > after and key in fields and (value is None or fields[key] == value):
                return n
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def notify_env(socket_path: Path) -> dict[str, str]:
    env = cli_env(NOTIFY_SOCKET=str(socket_path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.pop("WATCHDOG_PID", None)
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(url, timeout=5)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


# -- 1. sd_notify ---------------------------------------------------------------------------


def test_sd_notify_ready_status_watchdog_reload_and_stop(site: Site) -> None:
    """Under systemd the daemon says READY, keeps STATUS and the watchdog fed, reloads and stops."""
    (site.inbox / "before.png").write_bytes(unique_png(1))
    listener = NotifyListener(site.tmp / "notify.sock")
    try:
        daemon = site.daemon(env=notify_env(listener.path)).start()
        wait_for(lambda: listener.index_of("READY", "1") is not None)
        (record,) = site.wait_uploaded(1)
        assert Path(record["path"]).name == "before.png"
        # STATUS lines carry the queue figures and catch up with the upload.
        status = wait_for(
            lambda: [f["STATUS"] for _, f in listener.all() if "1 uploaded" in f.get("STATUS", "")]
        )
        assert "queued" in status[0] and "in flight" in status[0] and "failed" in status[0]
        # Watchdog pings at about half of WATCHDOG_USEC.
        first_ready = listener.index_of("READY", "1")
        assert first_ready is not None
        wait_for(lambda: len([f for _, f in listener.all() if f.get("WATCHDOG") == "1"]) >= 8)
        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        mark = len(listener.all()) - 1
        daemon.signal(signal.SIGHUP)
        reloading = wait_for(lambda: listener.index_of("RELOADING", "1", after=mark))
        assert "MONOTONIC_USEC" in listener.all()[reloading][1]
        ready_again = wait_for(lambda: listener.index_of("READY", "1", after=reloading))
        wait_for(lambda: sum(1 for _, f in listener.all()[ready_again:] if f.get("WATCHDOG")) >= 3)
        # SIGTERM: STOPPING=1 and exit code 0.
        daemon.signal(signal.SIGTERM)
        assert daemon.stop() == 0
    finally:
        listener.close()
    messages = listener.all()
    stopping = listener.index_of("STOPPING", "1")
    assert stopping is not None and stopping > ready_again
    assert not [f for _, f in messages[stopping:] if f.get("READY")]
    gaps = []
    for start, end in ((first_ready, reloading), (ready_again, stopping)):
        pings = [t for t, f in messages[start:end] if f.get("WATCHDOG") == "1"]
        gaps += [b - a for a, b in itertools.pairwise(pings)]
    half = WATCHDOG_USEC / 2e6
    assert 0.5 * half <= statistics.median(gaps) <= 1.5 * half, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a watchdog gap exceeded WATCHDOG_USEC: {gaps}"


def test_ready_is_sent_after_the_catch_up_scan(site: Site) -> None:
    """READY=1 means the folders are watched and every file already in them has been found."""
    count = 1500
    for d in range(30):
        folder = site.inbox / f"d{d:02d}"
        folder.mkdir()
        for n in range(count // 30):
            (folder / f"f{n:03d}.glb").write_bytes(b"glTF")
    site.log.touch()
    listener = NotifyListener(site.tmp / "notify.sock", lambda: site.log.stat().st_size)
    try:
        daemon = site.daemon("--dry-run", env=notify_env(listener.path)).start()
        wait_for(lambda: listener.at_first_ready is not None)
        daemon.stop()
    finally:
        listener.close()
    size = listener.at_first_ready
    assert size is not None
    seen = set()
    for line in site.log.read_bytes()[:size].decode(errors="replace").splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "file.seen":
            seen.add(event["path"])
    assert len(seen) == count, f"only {len(seen)} of {count} files were found before READY=1"


# -- 2. SIGHUP reload ---------------------------------------------------------------------------


def test_sighup_reload_adds_a_path_changes_workers_and_loses_nothing(site: Site) -> None:
    """SIGHUP re-reads the config: a new watch path and worker count apply, queued files survive."""
    site.configure(workers={"count": 1})
    staging = site.tmp / "staging"
    staging.mkdir()
    batch = 40
    for n in range(batch):
        (staging / f"b{n:03d}.png").write_bytes(unique_png(100 + n))
    second = site.tmp / "second"
    second.mkdir()
    with site.daemon() as daemon:
        for n in range(batch):
            os.rename(staging / f"b{n:03d}.png", site.inbox / f"b{n:03d}.png")
        site.wait_uploaded(3)
        site.configure(watch=[site.inbox, second], workers={"count": 4})
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.events("config.reloaded"))
        assert len(site.records("uploaded")) < batch, "the reload did not happen mid-batch"
        site.wait_uploaded(batch)
        # Four token requests that each take 0.6 s overlap only with more than one worker.
        site.emulator.inject(Fault("delay", seconds=0.6, count=4))
        before = len(site.emulator.records())
        for n in range(4):
            (second / f"new{n}.png").write_bytes(unique_png(900 + n))
        site.wait_uploaded(batch + 4)
    paths = [r["path"] for r in site.records("uploaded")]
    assert len(paths) == len(set(paths)) == batch + 4
    assert len(site.records()) == batch + 4 and site.emulator.token_count() == batch + 4
    assert {str(second / f"new{n}.png") for n in range(4)} <= set(paths)
    answered = [r.monotonic_time for r in site.emulator.records()[before:]]
    assert max(answered) - min(answered) < 1.0, "the 4 new files were not sent concurrently"


# -- 3. status ----------------------------------------------------------------------------------


def test_status_reports_a_running_daemon_and_a_stopped_one(site: Site) -> None:
    """`status` shows running, pid, roots and mode, counts and last upload; stopped exits 1."""
    with site.daemon() as daemon:
        assert daemon.proc is not None
        for n in range(3):
            (site.inbox / f"s{n}.png").write_bytes(unique_png(200 + n))
        site.wait_uploaded(3)

        def document() -> dict[str, Any] | None:
            result = site.cli("status", "--json")
            doc = json.loads(result.stdout)
            return doc if result.returncode == 0 and doc.get("uploaded") == 3 else None

        doc = wait_for(document, timeout=10)
        assert doc["running"] is True and doc["pid"] == daemon.proc.pid
        assert doc["roots"] == {str(site.inbox): "native"}
        assert doc["failed"] == 0 and doc["ledger_counts"] == {"uploaded": 3}
        assert doc["last_upload"]["path"] in {r["path"] for r in site.records()}
        text = site.cli("status")
        assert text.returncode == 0
        assert "running" in text.stdout and f"pid {daemon.proc.pid}" in text.stdout
        assert f"watching {site.inbox} (native)" in text.stdout
        assert "uploaded 3" in text.stdout and "last upload:" in text.stdout
    stopped = site.cli("status", "--json")
    assert stopped.returncode == 1 and json.loads(stopped.stdout)["running"] is False
    text = site.cli("status")
    assert text.returncode == 1 and "stopped" in text.stdout


def test_status_and_retry_failed_see_the_daemon_as_soon_as_it_is_ready(site: Site) -> None:
    """Right after READY=1, `status` says running and `retry-failed` signals the daemon."""
    status_file = site.ledger.with_name("status.json")
    listener = NotifyListener(site.tmp / "notify.sock", lambda: [status_file.exists()])
    try:
        with site.daemon(env=cli_env(NOTIFY_SOCKET=str(listener.path))):
            wait_for(lambda: listener.at_first_ready is not None)
            status = site.cli("status", "--json")
            retry = site.cli("retry-failed")
    finally:
        listener.close()
    assert listener.at_first_ready == [True], "no status file yet when READY=1 was sent"
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
    assert retry.returncode == 0 and "asked the running daemon" in retry.stderr, retry.stderr


# -- 4. retry-failed ----------------------------------------------------------------------------


def test_retry_failed_on_a_running_and_on_a_stopped_daemon(site: Site) -> None:
    """A permanently failed file is uploaded after `retry-failed`, at once or at the next start."""
    with site.daemon():
        wait_for(lambda: site.cli("status").returncode == 0)  # see the test below
        site.emulator.inject(Fault("status", status=403, code=1005))
        (site.inbox / "a.png").write_bytes(unique_png(300))
        wait_for(lambda: (site.latest("a.png") or {}).get("status") == "failed")
        assert site.latest("a.png")["retryable"] is False  # type: ignore[index]
        result = site.cli("retry-failed")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: (site.latest("a.png") or {}).get("status") == "uploaded")

        site.emulator.inject(Fault("status", status=403, code=1005))
        (site.inbox / "b.png").write_bytes(unique_png(301))
        wait_for(lambda: (site.latest("b.png") or {}).get("status") == "failed")
    result = site.cli("retry-failed")
    assert result.returncode == 0 and "1 failed file" in result.stderr, result.stderr
    with site.daemon():
        wait_for(lambda: (site.latest("b.png") or {}).get("status") == "uploaded")
    uploaded = [Path(r["path"]).name for r in site.records("uploaded")]
    assert sorted(uploaded) == ["a.png", "b.png"]


# -- 5. Prometheus ------------------------------------------------------------------------------


def test_metrics_endpoint_counts_uploads_and_shows_a_refused_key(site: Site) -> None:
    """/metrics counts uploads, bytes and timings; auth_ok drops to 0 when the key is refused."""
    port = free_port()
    site.configure(metrics={"listen": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    with site.daemon() as daemon:
        wait_for(lambda: daemon.events("metrics.listening"))
        for n in range(3):
            (site.inbox / f"m{n}.png").write_bytes(unique_png(400 + n))
        records = site.wait_uploaded(3)
        values = wait_for(
            lambda: (
                (v := scrape(url)).get(("tripo_watchd_files_total", (("outcome", "uploaded"),)))
                == 3
                and v
            )
        )
        assert values[("tripo_watchd_uploaded_bytes_total", ())] == sum(r["size"] for r in records)
        assert values[("tripo_watchd_upload_seconds_count", ())] == 3
        assert values[("tripo_watchd_token_request_seconds_count", ())] >= 3
        assert values[("tripo_watchd_files_total", (("outcome", "failed"),))] == 0
        assert values[("tripo_watchd_auth_ok", ())] == 1
        site.emulator.api_keys.clear()
        (site.inbox / "refused.png").write_bytes(unique_png(499))
        wait_for(lambda: daemon.events("auth.failed"))
        wait_for(lambda: scrape(url)[("tripo_watchd_auth_ok", ())] == 0)


def test_auth_ok_stays_0_while_a_refused_key_is_retried(site: Site) -> None:
    """auth_ok stays 0 through the periodic retry of an unchanged, still refused key."""
    port = free_port()
    site.configure(metrics={"listen": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    with site.daemon() as daemon:
        wait_for(lambda: daemon.events("metrics.listening"))
        site.emulator.api_keys.clear()
        (site.inbox / "refused.png").write_bytes(unique_png(498))
        wait_for(lambda: daemon.events("auth.failed"))
        # The retry (after TRIPO_WATCHD_AUTH_RETRY_SECONDS=1) is held for 1 s by the emulator.
        site.emulator.inject(Fault("delay", seconds=1.0))
        refusals = sum(1 for r in site.emulator.records() if r.status == 401)
        seen = set()
        while sum(1 for r in site.emulator.records() if r.status == 401) == refusals:
            seen.add(scrape(url)[("tripo_watchd_auth_ok", ())])
            time.sleep(0.05)  # sampling rate of the gauge, not synchronisation
    assert seen == {0}, "auth_ok reported 1 while the refused key was being retried"


# -- 6. hooks -----------------------------------------------------------------------------------

HOOK = r"""
import os, sys, time
out = sys.argv[1]
name = os.path.basename(os.environ["TRIPO_WATCHD_PATH"])
data = sys.stdin.read()
if name.startswith("sleep"):
    open(os.path.join(out, name + ".pid"), "w").write(str(os.getpid()))
    time.sleep(60)
if name.startswith("fail"):
    sys.stderr.write("hook says no")
    sys.exit(3)
tmp = os.path.join(out, "." + name)
with open(tmp, "w") as sink:
    sink.write(os.environ["TRIPO_WATCHD_STATUS"] + "\n" + data)
os.rename(tmp, os.path.join(out, name + ".json"))
"""


def test_hooks_get_the_exact_record_and_never_block_or_lose_uploads(site: Site) -> None:
    """on_uploaded gets the ledger line on stdin; slow hooks are killed, failures only logged."""
    out = site.tmp / "hook-out"
    out.mkdir()
    site.configure(
        hooks={
            "on_uploaded": [sys.executable, "-c", HOOK, str(out)],
            "timeout_seconds": 2,
            "max_workers": 2,
        }
    )
    with site.daemon() as daemon:
        (site.inbox / "first.png").write_bytes(unique_png(600))
        received = wait_for(lambda: (out / "first.png.json").exists() and out / "first.png.json")
        status, stdin = received.read_text().split("\n", 1)
        (line,) = site.ledger_lines()
        assert status == "uploaded" and stdin == line

        # Two hooks that hang occupy both hook workers; uploads go on regardless.
        for n in range(2):
            (site.inbox / f"sleep{n}.png").write_bytes(unique_png(610 + n))
        wait_for(lambda: len(list(out.glob("sleep*.pid"))) == 2)
        started = time.monotonic()
        for n in range(3):
            (site.inbox / f"later{n}.png").write_bytes(unique_png(620 + n))
        (site.inbox / "fail.png").write_bytes(unique_png(630))
        site.wait_uploaded(7)
        assert time.monotonic() - started < 2, "uploads waited for the hanging hooks"
        assert not daemon.events("hook.failed")

        timed_out = wait_for(lambda: len(daemon.events("hook.failed")) >= 3 and daemon.events())
        failed = [e for e in timed_out if e.get("event") == "hook.failed"]
        by_name = {Path(e["path"]).name: e for e in failed}
        assert "timed out" in by_name["sleep0.png"]["reason"]
        assert "timed out" in by_name["sleep1.png"]["reason"]
        assert by_name["fail.png"]["exit_code"] == 3
        assert "hook says no" in by_name["fail.png"]["stderr"]
        for pid_file in out.glob("sleep*.pid"):
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid_file.read_text()), 0)
        wait_for(lambda: all((out / f"later{n}.png.json").exists() for n in range(3)))
    names = sorted(Path(r["path"]).name for r in site.records("uploaded"))
    assert names == sorted(
        ["first.png", "sleep0.png", "sleep1.png", "fail.png"] + [f"later{n}.png" for n in range(3)]
    )


def test_sighup_applies_new_hooks_and_moves_the_metrics_endpoint(site: Site) -> None:
    """After SIGHUP a new on_uploaded hook runs for the next file, and /metrics moves to the
    new address with its counts kept; the old address is closed."""
    out = site.tmp / "hook-out"
    out.mkdir()
    first_port, second_port = free_port(), free_port()
    site.configure(metrics={"listen": f"127.0.0.1:{first_port}"})
    with site.daemon() as daemon:
        wait_for(lambda: daemon.events("metrics.listening"))
        (site.inbox / "before.png").write_bytes(unique_png(700))
        site.wait_uploaded(1)
        site.configure(
            metrics={"listen": f"127.0.0.1:{second_port}"},
            hooks={"on_uploaded": [sys.executable, "-c", HOOK, str(out)]},
        )
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.events("config.reloaded"))
        (site.inbox / "after.png").write_bytes(unique_png(701))
        wait_for(lambda: (out / "after.png.json").exists())
        url = f"http://127.0.0.1:{second_port}/metrics"
        wait_for(lambda: scrape(url)[("tripo_watchd_files_total", (("outcome", "uploaded"),))] == 2)
        with pytest.raises(OSError):
            scrape(f"http://127.0.0.1:{first_port}/metrics")
    assert not (out / "before.png.json").exists()


# -- 7. bandwidth cap ---------------------------------------------------------------------------


def test_bandwidth_cap_paces_an_upload(site: Site) -> None:
    """With s3.max_bandwidth = "2MB/s" a 4 MB upload takes about 2 s; without a cap far less."""
    capped = site.inbox / "capped.glb"
    capped.write_bytes(glb_bytes(4_000_000))
    free = site.inbox / "free.glb"
    free.write_bytes(glb_bytes(4_000_004))
    site.configure(s3={"max_bandwidth": "2MB/s"})
    result = site.cli("upload", capped)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert record["status"] == "uploaded"
    assert site.s3.object_bytes(record["key"]) == capped.read_bytes()
    site.configure()
    result = site.cli("upload", free)
    assert result.returncode == 0, result.stderr
    (unlimited,) = records_of(result.stdout)
    assert 1.7 <= record["seconds"] <= 2.3, record["seconds"]
    assert unlimited["seconds"] < record["seconds"] / 3, (unlimited["seconds"], record["seconds"])


# -- 8. progress lines --------------------------------------------------------------------------


def test_multipart_upload_logs_progress(site: Site) -> None:
    """A long multipart upload logs upload.progress with rising percent and a transfer rate."""
    site.configure(
        s3={
            "multipart_threshold_bytes": 5 * MIB,
            "multipart_chunk_bytes": 5 * MIB,
            "progress_log_seconds": 0.2,
            "max_bandwidth": "6MB/s",
        }
    )
    data = glb_bytes(12 * MIB)
    with site.daemon() as daemon:
        (site.inbox / "big.glb").write_bytes(data)
        (record,) = site.wait_uploaded(1)
        progress = daemon.events("upload.progress")
    assert site.s3.object_bytes(record["key"]) == data
    assert len(progress) >= 2, progress
    percents = [e["percent"] for e in progress]
    assert percents == sorted(percents) and percents[-1] >= 80, percents
    assert all(e["path"] == str(site.inbox / "big.glb") for e in progress)
    assert all(e["total_bytes"] == len(data) for e in progress)
    rates = [e["mb_per_s"] for e in progress]
    assert all(rate > 0 for rate in rates), rates


def test_capped_multipart_progress_comes_every_interval(site: Site) -> None:
    """A capped multipart upload logs a progress line about every progress_log_seconds."""
    site.configure(
        s3={
            "multipart_threshold_bytes": 5 * MIB,
            "multipart_chunk_bytes": 5 * MIB,
            "progress_log_seconds": 0.2,
            "max_bandwidth": "6MB/s",
        }
    )
    big = site.inbox / "big.glb"
    big.write_bytes(glb_bytes(12 * MIB))
    result = site.cli("upload", big)
    assert result.returncode == 0, result.stderr
    assert records_of(result.stdout)[0]["status"] == "uploaded"
    progress = [e for e in json_lines(result.stderr) if e.get("event") == "upload.progress"]
    # ~2.1 s at 6 MB/s: a line every 0.2 s gives about 10; ask for half of that.
    assert len(progress) >= 5, [e["percent"] for e in progress]
    assert 4 <= statistics.median(e["mb_per_s"] for e in progress) <= 8, progress
