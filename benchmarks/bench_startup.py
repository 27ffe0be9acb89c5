"""Start-up at scale: 100k files already in the ledger, 100k files pending, a 1M-record ledger."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Daemon,
    Servers,
    glb_bytes,
    machine,
    mb,
    proc_cpu_seconds,
    proc_peak_rss_bytes,
    verdict,
    write_config,
)
from tripo_watchd.records import Record

PER_DIR = 1000
FILE_SIZE = 1024


def make_files(inbox: Path, count: int) -> list[Path]:
    paths = []
    for n in range(count):
        folder = inbox / f"d{n // PER_DIR:04d}"
        if n % PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{n:07d}.glb"
        path.write_bytes(glb_bytes(n, FILE_SIZE))
        paths.append(path)
    return paths


def uploaded_line(path: str, size: int, mtime_ns: int, n: int) -> str:
    """A ledger line exactly as the pipeline writes an upload."""
    sha = hashlib.sha256(path.encode()).hexdigest()
    key = f"tcli_bench/20250101/{n:08d}/input.glb"
    return Record(
        path=path,
        status="uploaded",
        size=size,
        mtime_ns=mtime_ns,
        sha256=sha,
        format="glb",
        protocol="v2-sts",
        bucket="tripo-data",
        key=key,
        uri=f"s3://tripo-data/{key}",
        task_file={"type": "glb", "object": {"bucket": "tripo-data", "key": key}},
        endpoint="https://s3.us-west-2.amazonaws.com",
        trace_id=f"{n:08d}-0000-4000-8000-000000000000",
        attempts=1,
        seconds=0.123,
    ).to_json()


def scan_done_at(daemon: Daemon, started: float, quiet: float = 1.0, timeout: float = 300) -> float:
    """When the catch-up scan ended: a `*scan*done*` event if the daemon logs one, else the start
    of the first `quiet` seconds in which the daemon used < 5 % of a core (sampled every 20 ms)."""
    deadline = time.monotonic() + timeout
    last_busy = started
    last_cpu = proc_cpu_seconds(daemon.pid)
    last_t = time.monotonic()
    samples: list[tuple[float, float]] = [(last_t, last_cpu)]
    while time.monotonic() < deadline:
        for event in daemon.new_events():
            name = str(event.get("event", ""))
            if "scan" in name and any(w in name for w in ("done", "finished", "complete")):
                return time.monotonic()
        time.sleep(0.02)
        now, cpu = time.monotonic(), proc_cpu_seconds(daemon.pid)
        samples.append((now, cpu))
        # CPU over the last `quiet` seconds
        window = [s for s in samples if s[0] >= now - quiet]
        if now - last_busy >= quiet and window[-1][1] - window[0][1] < 0.05 * quiet:
            return last_busy
        if cpu > last_cpu:
            last_busy = now
        last_cpu, last_t = cpu, now
    raise TimeoutError("the catch-up scan did not go quiet")


def part_known(root: Path, servers: Servers, count: int) -> None:
    inbox = root / "known"
    t0 = time.monotonic()
    paths = make_files(inbox, count)
    cfg = root / "cfg-known"
    config = write_config(cfg, servers, [inbox])
    ledger = cfg / "state" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "w") as f:
        for n, path in enumerate(paths):
            st = path.stat()
            f.write(uploaded_line(str(path), st.st_size, st.st_mtime_ns, n) + "\n")
    print(f"[known] {count:,} files + ledger written in {time.monotonic() - t0:.1f} s")
    tokens0 = servers.command("tokens")["tokens"]
    daemon = Daemon(config, root / "known.log", level="debug").start()
    try:
        started = daemon.wait_event("daemon.started", timeout=300)
        to_started = started - daemon.started_at
        done = scan_done_at(daemon, started)
        time.sleep(2.0)  # anything the scan queued would be asked for by now
        seen = len(daemon.events("file.seen"))
        uploads = len(daemon.events("file.uploaded")) + len(daemon.events("file.failed"))
        peak = proc_peak_rss_bytes(daemon.pid)
        cpu = proc_cpu_seconds(daemon.pid)
    finally:
        daemon.stop()
    tokens = servers.command("tokens")["tokens"] - tokens0
    print(f"[known] start → daemon.started: {to_started:.2f} s")
    print(
        f"[known] start → catch-up scan done (CPU went quiet): {done - daemon.started_at:.2f} s "
        f"(scan {done - started:.2f} s after daemon.started)"
    )
    print(
        f"[known] tokens requested: {tokens}, files seen as new: {seen}, outcomes logged: "
        f"{uploads}  ({verdict(tokens == 0 and seen == 0 and uploads == 0)})"
    )
    print(f"[known] daemon CPU so far {cpu:.2f} s, peak RSS {mb(peak)}")


def part_pending(root: Path, servers: Servers, count: int) -> None:
    inbox = root / "pending"
    t0 = time.monotonic()
    make_files(inbox, count)
    print(f"[pending] {count:,} new files written in {time.monotonic() - t0:.1f} s")
    cfg = root / "cfg-pending"
    config = write_config(cfg, servers, [inbox])
    # A key the emulator refuses: uploads pause, every file stays pending.
    (cfg / "api-key").write_text("tsk_refused_by_the_emulator\n")
    daemon = Daemon(config, root / "pending.log").start()
    try:
        started = daemon.wait_event("daemon.started", timeout=300)
        done = scan_done_at(daemon, started)
        time.sleep(2.0)
        peak = proc_peak_rss_bytes(daemon.pid)
        status = json.loads((cfg / "state" / "status.json").read_text())
    finally:
        daemon.stop()
    print(
        f"[pending] scan of {count:,} new files took {done - started:.2f} s after daemon.started;"
        f" status: pending={status.get('pending')} queued={status.get('queued')} "
        f"auth={status.get('auth')}"
    )
    print(f"[pending] peak RSS {mb(peak)}  (goal ≤ 200 MB: {verdict(peak <= 200e6)})")


_OPEN_LEDGER = """
import os, sys, time
from pathlib import Path
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from tripo_watchd.ledger import JsonlLedger
before = rss()
t0 = time.perf_counter()
ledger = JsonlLedger(Path(sys.argv[1]))
seconds = time.perf_counter() - t0
counts = ledger.counts()
after = rss()
peak = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")]
print(seconds, before, after, int(peak[0].split()[1]) * 1024, counts.get("uploaded", 0))
"""


def part_million(root: Path, records: int) -> None:
    ledger = root / "million" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    t0 = time.monotonic()
    template = uploaded_line("/srv/inbox/d{d}/f{n}.glb", 1048576, 1700000000000000000, 0)
    prefix, rest = template.split('"sha256":"', 1)
    tail = rest.split('"', 1)[1]
    with open(ledger, "w", buffering=1 << 20) as f:
        for n in range(records):
            path = f"/srv/inbox/d{n // PER_DIR:04d}/f{n:07d}.glb"
            sha = hashlib.sha256(path.encode()).hexdigest()
            line = prefix.replace("/srv/inbox/d{d}/f{n}.glb", path) + f'"sha256":"{sha}"' + tail
            f.write(line + "\n")
    size = ledger.stat().st_size
    took = time.monotonic() - t0
    print(f"[1M] {records:,} records ({size / 1e6:.0f} MB) written in {took:.1f} s")
    # First open: no index sidecar yet (a full parse, which also writes `<ledger>.idx` if this
    # version of the ledger keeps one); second open: a restart, which may use that sidecar.
    for label in ("first open (full parse)", "reopen (restart)"):
        out = subprocess.run(
            [sys.executable, "-c", _OPEN_LEDGER, str(ledger)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        seconds, before, after, peak, uploaded = float(out[0]), *map(int, out[1:])
        print(
            f"[1M] {label}: open + index {seconds:.2f} s  (goal ≤ 5 s: {verdict(seconds <= 5)}); "
            f"{uploaded:,} uploaded indexed"
        )
        print(
            f"[1M] {label}: RSS {mb(after)} after open (interpreter + imports {mb(before)}), "
            f"peak {mb(peak)}  (goal ≤ 300 MB: {verdict(peak <= 300e6)})"
        )
    sidecars = [q.name for q in ledger.parent.iterdir() if q != ledger]
    print(f"[1M] files beside the ledger: {', '.join(sidecars) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("known", "pending", "million"), action="append")
    args = parser.parse_args(argv)
    parts = args.only or ["known", "pending", "million"]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tripo-bench-startup-") as tmp:
        root = Path(tmp)
        if "known" in parts or "pending" in parts:
            with Servers(root / "servers") as servers:
                if "known" in parts:
                    part_known(root, servers, args.files)
                if "pending" in parts:
                    part_pending(root, servers, args.files)
        if "million" in parts:
            part_million(root, args.records)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
