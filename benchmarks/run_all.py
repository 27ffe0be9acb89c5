"""Run every benchmark in turn with its default (full) size: python -m benchmarks.run_all."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench_upload", "bench_latency", "bench_idle", "bench_startup")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n===== {name} =====", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
