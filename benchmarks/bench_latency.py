"""Latency: file closed in the inbox → its STS token request at the emulator (daemon process)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Daemon,
    Servers,
    glb_bytes,
    machine,
    percentile,
    verdict,
    wait_until,
    write_config,
)

TOKEN = "/upload/sts/token"
SYNCTHING_DEFAULT_S = 10.0  # fsWatcherDelayS default
LSYNCD_DEFAULT_S = 15.0  # settings.delay default for default.rsync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between files")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tripo-bench-latency-") as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        inbox.mkdir()
        with Servers(root / "servers") as servers:
            config = write_config(root, servers, [inbox], {"watch": {"settle_seconds": 0}})
            with Daemon(config, root / "daemon.log") as daemon:
                daemon.wait_event("daemon.started", timeout=60)
                latencies = []
                for n in range(args.files):
                    data = glb_bytes(n, args.size)
                    path = inbox / f"f{n:05d}.glb"
                    f = open(path, "wb")  # noqa: SIM115
                    f.write(data)
                    closed = time.monotonic()  # taken just before close(): the close is included
                    f.close()
                    token = wait_until(lambda n=n: _token(servers, n), timeout=30, interval=0.002)
                    latencies.append(token["monotonic_time"] - closed)
                    time.sleep(args.gap)  # let the upload finish before the next file
                uploaded = len(daemon.events("file.uploaded"))
    ms = sorted(1000 * x for x in latencies)
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    print(f"\nfiles: {len(ms)}, uploaded (logged): {uploaded}")
    print(
        f"close → token request: min {ms[0]:.1f} ms, p50 {p50:.1f} ms, p90 "
        f"{percentile(ms, 90):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )
    print(f"goal p50 ≤ 100 ms: {verdict(p50 <= 100)};  goal p99 ≤ 250 ms: {verdict(p99 <= 250)}")
    print(
        f"vs Syncthing's default fsWatcherDelayS = {SYNCTHING_DEFAULT_S:g} s: "
        f"{1000 * SYNCTHING_DEFAULT_S / p50:.0f}× sooner at p50"
    )
    print(
        f"vs lsyncd's default delay = {LSYNCD_DEFAULT_S:g} s: "
        f"{1000 * LSYNCD_DEFAULT_S / p50:.0f}× sooner at p50"
    )
    return 0


_seen: list[dict[str, object]] = []


def _token(servers: Servers, n: int) -> dict[str, object] | None:
    """The (n+1)-th token request, once the emulator has logged it."""
    if len(_seen) <= n:
        _seen[:] = [r for r in servers.requests() if r["path"].endswith(TOKEN)]
    return _seen[n] if len(_seen) > n else None


if __name__ == "__main__":
    raise SystemExit(main())
