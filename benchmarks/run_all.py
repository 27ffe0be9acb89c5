"""Run every benchmark in turn with its default (full) size: python -m benchmarks.run_all."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS: tuple[tuple[str, ...], ...] = (
    ("bench_upload",),
    ("bench_upload", "--s3", "seaweedfs"),  # a faster server: the client's own cost shows
    ("bench_upload", "--rtt-ms", "20"),  # what connection + client reuse buy on a WAN
    ("bench_big",),
    ("bench_big", "--s3", "seaweedfs"),
    ("bench_mixed",),
    ("bench_mixed", "--s3", "seaweedfs"),  # one AssumeRole per token instead of 3 moto calls
    ("bench_latency",),
    ("bench_idle",),
    ("bench_startup",),
)


def main() -> int:
    failed = []
    for name, *options in BENCHMARKS:
        label = " ".join([name, *options])
        print(f"\n===== {label} =====", flush=True)
        argv = [sys.executable, "-m", f"benchmarks.{name}", *options]
        if subprocess.run(argv).returncode != 0:
            failed.append(label)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
