"""JsonlLedger open time on a 1M-record ledger and 8-thread append rate, against a git baseline."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.bench_startup import PER_DIR, uploaded_line
from benchmarks.common import machine, mb, verdict

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter per measurement so that RSS and caches start cold for Python.
_OPEN = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from benchmarks.ledger_bench import load_impl
mod = load_impl(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
led = mod.JsonlLedger(Path(sys.argv[1]))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM")]
counts = led.counts()
led.close()
print(json.dumps({"wall": wall, "cpu": cpu, "peak": int(peak[0].split()[1]) * 1024,
                  "uploaded": counts.get("uploaded", 0)}))
"""


def load_impl(which: str) -> ModuleType:
    """`current` is the working tree's ledger; anything else is a git ref's ledger.py."""
    if which == "current":
        import tripo_watchd.ledger

        return tripo_watchd.ledger
    source = subprocess.run(
        ["git", "show", f"{which}:tripo_watchd/ledger.py"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp(prefix="ledger-baseline-")) / "ledger.py"
    tmp.write_bytes(source)
    # Loaded inside the package so its relative imports (.errors, .records) resolve.
    name = "tripo_watchd._ledger_baseline"
    spec = importlib.util.spec_from_file_location(name, tmp)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def write_ledger(path: Path, records: int) -> None:
    import hashlib

    template = uploaded_line("/srv/inbox/d{d}/f{n}.glb", 1048576, 1700000000000000000, 0)
    prefix, rest = template.split('"sha256":"', 1)
    tail = rest.split('"', 1)[1]
    with open(path, "w", buffering=1 << 20) as f:
        for n in range(records):
            p = f"/srv/inbox/d{n // PER_DIR:04d}/f{n:07d}.glb"
            sha = hashlib.sha256(p.encode()).hexdigest()
            line = prefix.replace("/srv/inbox/d{d}/f{n}.glb", p) + f'"sha256":"{sha}"' + tail
            f.write(line + "\n")


def open_once(path: Path, which: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _OPEN, str(path), which, str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def append_rate(directory: Path, which: str, threads: int, per_thread: int) -> tuple[float, int]:
    """Appends per second with `threads` writers, and how many fsyncs the ledger called."""
    from tripo_watchd.records import Record

    mod = load_impl(which)
    path = directory / f"append-{which.replace('/', '_')}.jsonl"
    led = mod.JsonlLedger(path)
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: Any) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting_fsync  # both implementations reach os.fsync at call time

    def work(t: int) -> None:
        for i in range(per_thread):
            led.append(Record(path=f"/in/{t}/{i}.glb", status="uploaded", sha256=f"{i:064x}"))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    led.close()
    os.fsync = real_fsync
    return threads * per_thread / seconds, fsyncs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="HEAD", help="git ref to compare with")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--appends", type=int, default=300, help="per thread")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    impls = [args.baseline, "current"]
    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        ledger = root / "ledger.jsonl"
        t0 = time.monotonic()
        write_ledger(ledger, args.records)
        size = ledger.stat().st_size
        took = time.monotonic() - t0
        print(f"{args.records:,} records ({size / 1e6:.0f} MB) written in {took:.1f} s")
        sidecar = ledger.with_name(ledger.name + ".idx")
        # current/scan: no sidecar, so the whole ledger is parsed (first start, or a sidecar
        # that failed validation); current/idx: a restart after a clean close.
        modes = {args.baseline: args.baseline, "current/scan": "current", "current/idx": "current"}
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.rounds):  # interleaved, so load changes hit all alike
            for mode, which in modes.items():
                if mode != "current/idx":
                    sidecar.unlink(missing_ok=True)
                runs[mode].append(open_once(ledger, which))
        for which in modes:
            r = runs[which]
            wall = [x["wall"] for x in r]
            cpu = [x["cpu"] for x in r]
            peak = max(x["peak"] for x in r)
            assert all(x["uploaded"] == args.records for x in r)
            median = statistics.median(wall)
            print(
                f"open {which:>12}: wall min {min(wall):.2f} s / median {median:.2f} s, "
                f"CPU min {min(cpu):.2f} s, peak RSS {mb(peak)}"
                f"  (≤ 5 s: {verdict(min(wall) <= 5)}, ≤ 300 MB: {verdict(peak <= 300e6)})"
            )
        for which in impls:
            rate, fsyncs = append_rate(root, which, args.threads, args.appends)
            total = args.threads * args.appends
            print(
                f"append {which:>12}: {args.threads} threads, {rate:,.0f} appends/s, "
                f"{fsyncs:,} fsyncs for {total:,} appends"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
