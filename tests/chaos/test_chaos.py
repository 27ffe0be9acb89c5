"""The chaos proof: under API faults, S3 faults and SIGKILLs, every file still lands exactly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import DaemonProcess, cli_env, wait_for, write_config, write_key

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator
from tripo_watchd.sandbox.emulator import TOKEN_PATH
from tripo_watchd.sandbox.faultproxy import FaultProxy

SEED = int(os.environ.get("CHAOS_SEED", "20260501"))
FILES = int(os.environ.get("CHAOS_FILES", "500"))
KILLS = 5
TOKEN_FAULT_RATE = 0.30
S3_FAULT_RATE = 0.20
TOKEN_FAULTS = (
    Fault("status", status=500, code=1000),
    Fault("status", status=429, code=1007, retry_after="0"),
    Fault("malformed"),
    Fault("code_in_200", code=1000),
    Fault("reset"),
    Fault("expired_credentials"),
)


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + n % 9, 24), (n % 256, (n // 256) % 256, 77)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(n: int) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (32, 32), (10, 120, 200))
    image.putpixel((n % 32, (n // 32) % 32), (n % 256, 0, 0))
    image.save(buffer, "JPEG", comment=f"chaos {n}".encode())
    return buffer.getvalue()


def _glb(n: int) -> bytes:
    chunk = json.dumps({"asset": {"version": "2.0"}, "extras": {"n": n}}).encode()
    chunk += b" " * ((-len(chunk)) % 4 + 4 * (n % 50))
    body = struct.pack("<II", len(chunk), 0x4E4F534A) + chunk
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def _obj(n: int) -> bytes:
    return f"# chaos {n}\nv 0 0 0\nv 1 0 0\nv 0 {n} 1\nf 1 2 3\n".encode()


def _stl(n: int) -> bytes:
    return (
        f"solid chaos{n}\nfacet normal 0 0 1\nouter loop\nvertex 0 0 0\nvertex 1 0 0\n"
        f"vertex 0 {n} 0\nendloop\nendfacet\nendsolid chaos{n}\n"
    ).encode()


MAKERS: tuple[tuple[str, Callable[[int], bytes]], ...] = (
    ("png", _png),
    ("jpg", _jpeg),
    ("glb", _glb),
    ("obj", _obj),
    ("stl", _stl),
)


def _ledger_lines(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """Ledger records; while the daemon writes, a torn last line is skipped unless `strict`."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if strict:
                raise
    return out


def _latest_uploaded(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("status") == "uploaded":
            latest[record["path"]] = record
    return latest


class Writer(threading.Thread):
    """Writes the files into the inbox in seeded batches, at a seeded pace."""

    def __init__(self, inbox: Path, rng: random.Random, total: int) -> None:
        super().__init__(daemon=True)
        self.inbox, self.rng, self.total = inbox, rng, total
        self.files: dict[Path, bytes] = {}
        self.error: BaseException | None = None
        self.plan = [(n, *rng.choice(MAKERS)) for n in range(total)]
        self.pauses: list[float] = []
        n = 0
        self.batches: list[list[tuple[int, str, Callable[[int], bytes]]]] = []
        while n < total:
            size = rng.randint(20, 60)
            self.batches.append(self.plan[n : n + size])
            self.pauses.append(rng.uniform(0.1, 0.5))
            n += size

    def run(self) -> None:
        try:
            for index, (batch, pause) in enumerate(zip(self.batches, self.pauses, strict=True)):
                folder = self.inbox / f"batch{index:02d}" if index % 3 else self.inbox
                folder.mkdir(exist_ok=True)
                for n, ext, make in batch:
                    path = folder / f"f{n:04d}.{ext}"
                    data = make(n)
                    path.write_bytes(data)
                    self.files[path] = data
                time.sleep(pause)  # the producer's pace, not synchronisation
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3_server.port) as fault_proxy:
        yield fault_proxy


@pytest.mark.timeout(300)
def test_chaos_every_file_lands_exactly_once_no_secret_leaks(
    tmp_path: Path,
    emulator: TripoEmulator,
    s3_server: S3Server,
    proxy: FaultProxy,
    api_key: str,
) -> None:
    """Under 30 % API faults, 20 % S3 faults and 5 SIGKILLs every file lands byte-identical."""
    print(f"\nchaos: seed {SEED} (CHAOS_SEED overrides), {FILES} files (CHAOS_FILES)", flush=True)
    started = time.monotonic()
    rng = random.Random(SEED)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ledger = tmp_path / "state" / "ledger.jsonl"
    config = write_config(
        tmp_path / "cfg.toml",
        api_base_url=emulator.base_url,
        s3_endpoint_url=proxy.url,
        ledger=ledger,
        key_file=write_key(tmp_path / "api-key", api_key),
        watch=[inbox],
        sections={
            "api": {"timeout_seconds": 5, "max_retry_after_seconds": 0.5},
            "watch": {"settle_seconds": 0, "rescan_seconds": 0},
            "workers": {"count": 8},
            "pipeline": {"max_attempts": 50},
        },
    )
    env = cli_env(TRIPO_WATCHD_STOP_GRACE="10")
    logs: list[Path] = []

    def start_daemon() -> DaemonProcess:
        """A fresh daemon with its own log file (readiness is read from that log)."""
        logs.append(tmp_path / f"daemon-{len(logs)}.log")
        return DaemonProcess(config, logs[-1], env=env).start()

    def uploaded_count() -> int:
        return len(_latest_uploaded(_ledger_lines(ledger)))

    emulator.set_random_faults(TOKEN_FAULT_RATE, SEED, TOKEN_FAULTS)
    proxy.set_random_faults(S3_FAULT_RATE, SEED + 1, ("reset", "reset_mid", "slowdown"))
    kill_points = sorted(rng.sample(range(FILES // 10, FILES * 17 // 20), KILLS))
    writer = Writer(inbox, rng, FILES)
    daemon = start_daemon()
    writer.start()
    kills = 0
    try:
        for point in kill_points:
            wait_for(lambda p=point: uploaded_count() >= p, timeout=90, interval=0.02)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(timeout=10)
            kills += 1
            daemon = start_daemon()
        writer.join(timeout=60)
        assert writer.error is None and not writer.is_alive()
        # Faults off; stop cleanly, then one final run drains everything still pending.
        emulator.clear_faults()
        proxy.clear()
        assert daemon.stop() == 0
        daemon = start_daemon()
        wanted = {str(p) for p in writer.files}
        wait_for(lambda: wanted <= set(_latest_uploaded(_ledger_lines(ledger))), timeout=90)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    seconds = time.monotonic() - started

    records = _ledger_lines(ledger, strict=True)  # the ledger parses, every line
    latest = _latest_uploaded(records)
    lost = [
        str(path)
        for path, data in writer.files.items()
        if str(path) not in latest or s3_server.object_bytes(latest[str(path)]["key"]) != data
    ]
    keys_by_content: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.get("status") == "uploaded":
            keys_by_content[record["sha256"]].add(record["key"])
    duplicates = sum(len(keys) - 1 for keys in keys_by_content.values())
    recorded_keys = {k for keys in keys_by_content.values() for k in keys}
    token_faults = sum(
        1
        for r in emulator.records()
        if r.path == TOKEN_PATH and not (r.status == 200 and r.code == 0)
    ) + sum(1 for t in emulator.tokens if not t.valid)
    s3_faults = proxy.stats().faults_total
    orphans = len({t.key for t in emulator.tokens if t.valid} & set(s3_server.list_keys()))
    orphans -= len(recorded_keys)
    summary = (
        f"chaos: seed={SEED} files={FILES} token_faults={token_faults} s3_faults={s3_faults} "
        f"kills={kills} lost={len(lost)} duplicates={duplicates} "
        f"unrecorded_objects={orphans} seconds={seconds:.1f}"
    )
    print(summary, flush=True)

    secrets = (
        {api_key} | {t.sts_sk for t in emulator.tokens} | {t.session_token for t in emulator.tokens}
    )
    secrets.discard("")
    assert len(secrets) > FILES, "IssuedToken must carry sts_sk and session_token"
    exposed = [*logs, ledger, ledger.with_name("status.json")]
    blobs = {p.name: p.read_bytes() for p in exposed if p.exists()}
    leaks = [
        (name, secret[:6] + "...")
        for name, blob in blobs.items()
        for secret in secrets
        if secret.encode() in blob
    ]

    assert not lost, f"{summary}; lost: {lost[:10]}"
    assert not leaks, f"{summary}; secrets in {leaks[:10]}"
    assert duplicates <= kills, summary
    assert token_faults > 0 and s3_faults > 0, summary
    assert all(hashlib.sha256(d).hexdigest() in keys_by_content for d in writer.files.values())
