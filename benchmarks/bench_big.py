"""One big file: `tripo-watchd upload` vs `aws s3 cp` (and s5cmd) with the same credentials."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Servers,
    aws_env,
    daemon_env,
    machine,
    mint_token,
    run_child,
    s5cmd_binary,
    verdict,
    write_big_glb,
    write_config,
)

MIB = 1024 * 1024
GIB = 1024 * MIB
AWS_DEFAULT = "aws s3 cp (CRC32, its default)"
AWS_UNSIGNED = "aws s3 cp (CRC32, body unsigned)"


def _creds(token: dict[str, Any]) -> dict[str, str]:
    return {
        "access_key": token["sts_ak"],
        "secret_key": token["sts_sk"],
        "session_token": token["session_token"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    parser.add_argument("--chunk-mib", type=int, default=16, help="multipart chunk size, both")
    parser.add_argument("--concurrency", type=int, default=4, help="parts in flight, both")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool (median kept)")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument(
        "--direct", action="store_true", help="talk to moto directly instead of the proxy"
    )
    parser.add_argument("--s3", choices=("moto", "seaweedfs"), default="moto", help="local S3")
    args = parser.parse_args(argv)
    size = args.mib * MIB
    print(f"machine: {machine()}; S3: {args.s3}")
    with tempfile.TemporaryDirectory(prefix="tripo-bench-big-") as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        with Servers(root / "servers", args.s3) as servers:
            servers.command(f"rtt {args.rtt_ms}")
            endpoint = servers.s3_direct if args.direct else servers.s3_proxy
            config = write_config(
                root / "cfg",
                servers,
                [inbox],
                {
                    "s3": {
                        "endpoint_url": endpoint,
                        "multipart_threshold_bytes": args.chunk_mib * MIB,
                        "multipart_chunk_bytes": args.chunk_mib * MIB,
                        "max_concurrency": args.concurrency,
                        "progress_log_seconds": 0,
                    },
                    "limits": {"model_max_bytes": size + MIB},
                    "pipeline": {"dedupe": "path"},
                },
            )
            runs: dict[str, list[tuple[float, float, float]]] = {}
            extras: dict[str, float] = {}

            def measure(name: str, argv: list[str], env: dict[str, str]) -> None:
                srv0 = servers.cpu_seconds()
                wall, cpu, out = run_child(argv, env)
                srv = servers.cpu_seconds() - srv0
                runs.setdefault(name, []).append((wall, cpu, srv))
                print(
                    f"  {name:<34} {wall:7.2f} s wall  {cpu:6.2f} s client CPU  "
                    f"{srv:6.2f} s server CPU",
                    flush=True,
                )
                if name == "tripo-watchd upload":
                    status = json.loads(out.strip().splitlines()[-1])["status"]
                    if status != "uploaded":
                        raise RuntimeError(f"tripo-watchd upload: {status}: {out[-2000:]}")

            s5cmd = s5cmd_binary()

            def ours(path: Path) -> None:
                measure("tripo-watchd upload", upload_argv(config, path), daemon_env())

            def aws(label: str, checksums: str, signed: bool = True) -> Callable[[Path], None]:
                def run(path: Path) -> None:
                    token = mint_token(servers)
                    env = aws_env(
                        servers,
                        root / f"aws-{checksums}-{signed}",
                        _creds(token),
                        args.chunk_mib,
                        args.concurrency,
                        checksums,
                        sign_payload=signed,
                    )
                    target = f"s3://{token['resource_bucket']}/{token['resource_uri']}"
                    measure(
                        label,
                        [
                            sys.executable,
                            "-m",
                            "awscli",
                            "s3",
                            "cp",
                            "--only-show-errors",
                            "--endpoint-url",
                            endpoint,
                            str(path),
                            target,
                        ],
                        env,
                    )

                return run

            def s5(path: Path) -> None:
                assert s5cmd is not None
                token = mint_token(servers)
                env = aws_env(servers, root / "s5", _creds(token), args.chunk_mib, args.concurrency)
                target = f"s3://{token['resource_bucket']}/{token['resource_uri']}"
                measure(
                    "s5cmd cp",
                    [
                        s5cmd,
                        "--endpoint-url",
                        endpoint,
                        "cp",
                        "--concurrency",
                        str(args.concurrency),
                        "--part-size",
                        str(args.chunk_mib),
                        str(path),
                        target,
                    ],
                    env,
                )

            tools = [
                ours,
                aws("aws s3 cp", "when_required"),
                aws(AWS_DEFAULT, "default"),
                aws(AWS_UNSIGNED, "default", signed=False),
            ]
            if s5cmd:
                tools.append(s5)
            for n in range(args.repeat):
                # A new file per run (new content, new path): no dedupe. Written and synced
                # first, so no tool pays for writing it back; every round starts with the next
                # tool, so none always goes first.
                path = write_big_glb(inbox / f"big{n}.glb", size, seed=n)
                os.sync()
                for tool in tools[n % len(tools) :] + tools[: n % len(tools)]:
                    tool(path)
                if n == 0:
                    extras["sha256"] = sha256_seconds(path)
                path.unlink()
            tiny = write_big_glb(root / "tiny" / "tiny.glb", 4096)
            for name, argv in (
                ("tripo-watchd", upload_argv(config, tiny, "--dry-run")),
                ("aws", [sys.executable, "-m", "awscli", "--version"]),
            ):
                extras[f"start {name}"] = statistics.median(
                    run_child(argv, daemon_env())[0] for _ in range(3)
                )
    report(runs, size, args, extras)
    return 0


def upload_argv(config: Path, path: Path, *flags: str) -> list[str]:
    """`tripo-watchd upload` of one file, JSON logs, as a subprocess command line."""
    cli = [sys.executable, "-m", "tripo_watchd.cli", "--log-format", "json", "upload"]
    return [*cli, *flags, "--config", str(config), str(path)]


def sha256_seconds(path: Path) -> float:
    """One SHA-256 pass over `path` in 1 MiB reads, as the pipeline hashes a big file."""
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return time.perf_counter() - t0


def report(
    runs: dict[str, list[tuple[float, float, float]]],
    size: int,
    args: argparse.Namespace,
    extras: dict[str, float],
) -> None:
    gib = size / GIB
    print(
        f"\n{args.mib} MiB, chunk {args.chunk_mib} MiB, {args.concurrency} parts in flight, "
        f"S3 RTT {args.rtt_ms:g} ms, median of {args.repeat}"
    )
    print(f"{'tool':<36}{'wall s':>8}{'MiB/s':>8}{'client CPU s/GiB':>18}{'server CPU s':>14}")
    med: dict[str, tuple[float, float, float]] = {}
    for name, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        srv = statistics.median(v[2] for v in values)
        med[name] = (wall, cpu, srv)
        print(f"{name:<36}{wall:>8.2f}{args.mib / wall:>8.1f}{cpu / gib:>18.2f}{srv:>14.2f}")
    ours = med["tripo-watchd upload"]
    # Like for like: the daemon sends CRC32 checksums (botocore's default), as aws does by default.
    base = med[AWS_DEFAULT]
    ratio = ours[0] / base[0]
    print(
        f"\ntripo-watchd / aws s3 cp (both CRC32) wall time: {ratio:.2f}×  "
        f"(goal ≤ 1.0×: {verdict(ratio <= 1.0)})"
    )
    print(f"tripo-watchd / aws s3 cp (both CRC32) client CPU: {ours[1] / base[1]:.2f}×")
    unsigned = med[AWS_UNSIGNED]
    print(
        f"tripo-watchd / aws s3 cp (both CRC32, both bodies unsigned) wall time: "
        f"{ours[0] / unsigned[0]:.2f}×, client CPU: {ours[1] / unsigned[1]:.2f}×"
    )
    plain = med["aws s3 cp"]
    print(f"tripo-watchd / aws s3 cp without checksums, wall time: {ours[0] / plain[0]:.2f}×")
    if "s5cmd cp" in med:
        print(f"tripo-watchd / s5cmd wall time: {ours[0] / med['s5cmd cp'][0]:.2f}×")
    print(
        f"serial steps before the first byte: tripo-watchd start-up "
        f"{extras['start tripo-watchd']:.2f} s (`upload --dry-run` of 4 KiB), aws start-up "
        f"{extras['start aws']:.2f} s (`--version`); the pipeline's SHA-256 pass over the file "
        f"{extras['sha256']:.2f} s (page cache warm)"
    )
    print(
        "tripo-watchd's figure includes the token request and its SHA-256 of the file (taken "
        "in a thread alongside the upload unless a same-size upload is ledgered); all include "
        "interpreter start-up. The daemon sends a CRC32 with every body and, over plain http, "
        "no SHA-256 of the body (over https botocore skips it whenever a checksum goes along). "
        "moto (server CPU column) is the ceiling: every tool waits on it."
    )


if __name__ == "__main__":
    raise SystemExit(main())
