"""Idle cost: the daemon watching 10,000 directories, nothing to do — CPU % of a core, RSS."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Daemon,
    machine,
    mb,
    proc_cpu_seconds,
    proc_peak_rss_bytes,
    proc_rss_bytes,
    verdict,
    write_config,
)


def make_tree(root: Path, dirs: int) -> None:
    """`dirs` directories below `root`, 100 to a parent."""
    for n in range(dirs):
        (root / f"p{n // 100:03d}" / f"d{n % 100:02d}").mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dirs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds after daemon.started before measuring"
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tripo-bench-idle-") as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        make_tree(inbox, args.dirs)
        config = write_config(root / "cfg", None, [inbox])  # no uploads: no servers needed
        with Daemon(config, root / "daemon.log") as daemon:
            t0 = time.monotonic()
            daemon.wait_event("daemon.started", timeout=120)
            started = time.monotonic() - t0
            time.sleep(args.settle)
            cpu0, w0 = proc_cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, w1 = proc_cpu_seconds(daemon.pid), time.monotonic()
            rss, peak = proc_rss_bytes(daemon.pid), proc_peak_rss_bytes(daemon.pid)
            modes = daemon.events("daemon.started")[0].get("modes")
    pct = 100 * (cpu1 - cpu0) / (w1 - w0)
    print(f"\nwatching {args.dirs:,} directories ({modes}); daemon.started after {started:.2f} s")
    ok = verdict(pct <= 0.5)
    print(f"idle CPU over {w1 - w0:.0f} s: {pct:.3f} % of one core  (goal ≤ 0.5 %: {ok})")
    print(f"RSS: {mb(rss)} now, {mb(peak)} peak  (goal ≤ 80 MB: {verdict(rss <= 80e6)})")
    print("(CPU resolution is one clock tick, 10 ms: use --seconds ≥ 30 for a meaningful figure)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
