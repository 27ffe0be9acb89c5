"""2,000 files of mixed sizes: the daemon (drop into the inbox, wait for the ledger) vs
`aws s3 cp --recursive` of the same folder with one set of bucket-prefix credentials."""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Daemon,
    Servers,
    aws_env,
    glb_bytes,
    machine,
    proc_cpu_seconds,
    run_child,
    s5cmd_binary,
    verdict,
    write_big_glb,
    write_config,
)

KIB, MIB = 1024, 1024 * 1024


def sizes(count: int, seed: int) -> list[int]:
    """A seeded mix, 1 KiB … 64 MiB: ~97 % small (1–256 KiB, log-uniform), ~2.5 % 1–8 MiB,
    and a handful of 16–64 MiB files (one is exactly 64 MiB); every size 4-byte aligned."""
    rng = random.Random(seed)
    out = []
    big = max(1, count // 400)  # 5 for 2,000
    medium = max(1, count // 40)  # 50 for 2,000
    for _ in range(count - big - medium):
        out.append(int(2 ** rng.uniform(10, 18)))
    for _ in range(medium):
        out.append(int(2 ** rng.uniform(20, 23)))
    for n in range(big):
        out.append(64 * MIB if n == 0 else int(2 ** rng.uniform(24, 26)))
    rng.shuffle(out)
    return [max(KIB, s - s % 4) for s in out]


def make_folder(folder: Path, plan: list[int]) -> None:
    for n, size in enumerate(plan):
        sub = folder / f"d{n % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"m{n:05d}.glb"
        if size > 4 * MIB:
            write_big_glb(path, size, seed=n)
        else:
            path.write_bytes(glb_bytes(n, size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=8, help="daemon workers = aws requests")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--s3", choices=("moto", "seaweedfs"), default="moto", help="local S3")
    args = parser.parse_args(argv)
    plan = sizes(args.files, args.seed)
    total = sum(plan)
    print(f"machine: {machine()}; S3: {args.s3}")
    print(
        f"{len(plan)} files, {total / MIB:.0f} MiB in all (seed {args.seed}): "
        f"{sum(s < MIB for s in plan)} < 1 MiB, {sum(MIB <= s < 16 * MIB for s in plan)} "
        f"1–16 MiB, {sum(s >= 16 * MIB for s in plan)} ≥ 16 MiB "
        f"(largest {max(plan) / MIB:.0f} MiB)",
        flush=True,
    )
    results: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tripo-bench-mixed-") as tmp:
        root = Path(tmp)
        data = root / "data"
        make_folder(data, plan)
        inbox = root / "inbox"
        inbox.mkdir()
        with Servers(root / "servers", args.s3) as servers:
            endpoint = servers.s3_proxy
            # -- the baseline: one credential set for the prefix, aws s3 cp --recursive ------
            creds = servers.command("creds bench-aws/*")
            env = aws_env(
                servers,
                root / "aws",
                {
                    "access_key": creds["AccessKeyId"],
                    "secret_key": creds["SecretAccessKey"],
                    "session_token": creds["SessionToken"],
                },
                args.chunk_mib,
                args.workers,
            )
            srv0 = servers.cpu_seconds()
            wall, cpu, _ = run_child(
                [
                    sys.executable,
                    "-m",
                    "awscli",
                    "s3",
                    "cp",
                    "--recursive",
                    "--only-show-errors",
                    "--endpoint-url",
                    endpoint,
                    str(data),
                    f"s3://{servers.bucket}/bench-aws/",
                ],
                env,
            )
            results["aws s3 cp --recursive"] = (wall, cpu, servers.cpu_seconds() - srv0)
            print(f"  aws s3 cp --recursive: {wall:.1f} s", flush=True)
            s5cmd = s5cmd_binary()
            if s5cmd:
                creds = servers.command("creds bench-s5/*")
                env5 = dict(env)
                env5.update(
                    AWS_ACCESS_KEY_ID=creds["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=creds["SecretAccessKey"],
                    AWS_SESSION_TOKEN=creds["SessionToken"],
                )
                srv0 = servers.cpu_seconds()
                wall, cpu, _ = run_child(
                    [
                        s5cmd,
                        "--endpoint-url",
                        endpoint,
                        "--numworkers",
                        str(args.workers),
                        "cp",
                        "--concurrency",
                        "4",
                        "--part-size",
                        str(args.chunk_mib),
                        f"{data}/",
                        f"s3://{servers.bucket}/bench-s5/",
                    ],
                    env5,
                )
                results["s5cmd cp"] = (wall, cpu, servers.cpu_seconds() - srv0)
                print(f"  s5cmd cp: {wall:.1f} s", flush=True)

            # -- the fastest client that asks a token per file, as the daemon must ------------
            wall, cpu, srv = tight_loop(servers, data, args.workers, args.chunk_mib)
            results["tight loop (token per file)"] = (wall, cpu, srv)
            print(f"  tight loop, a token per file: {wall:.1f} s", flush=True)
            tokens_before = servers.command("tokens")["tokens"]

            # -- the daemon: one token per file ------------------------------------------------
            config = write_config(
                root / "cfg",
                servers,
                [inbox],
                {
                    "s3": {
                        "endpoint_url": endpoint,
                        "multipart_threshold_bytes": args.chunk_mib * MIB,
                        "multipart_chunk_bytes": args.chunk_mib * MIB,
                        "progress_log_seconds": 0,
                    },
                    "workers": {"count": args.workers},
                },
            )
            with Daemon(config, root / "daemon.log") as daemon:
                daemon.wait_event("daemon.started", timeout=120)
                time.sleep(0.5)
                srv0 = servers.cpu_seconds()
                cpu0 = proc_cpu_seconds(daemon.pid)
                t0 = time.perf_counter()
                data.rename(inbox / "data")  # the whole folder lands at once
                done = outcomes(daemon, args.files, args.timeout)
                wall = time.perf_counter() - t0
                cpu = proc_cpu_seconds(daemon.pid) - cpu0
                srv = servers.cpu_seconds() - srv0
            results["tripo-watchd (daemon)"] = (wall, cpu, srv)
            print(f"  tripo-watchd: {wall:.1f} s, outcomes {json.dumps(done)}", flush=True)
            tokens = servers.command("tokens")["tokens"] - tokens_before
    report(results, len(plan), total, tokens, done, args.s3)
    return 0


def tight_loop(
    servers: Servers, folder: Path, workers: int, chunk_mib: int
) -> tuple[float, float, float]:
    """`workers` threads, each with one kept requests.Session and one boto3 client (the daemon's
    S3 options: CRC32, unsigned body) whose credentials are swapped per file: token POST, then
    put_object, or s3transfer's multipart upload from the file name at `chunk_mib` and above.
    No watching, checking, hashing, ledger or logs: the floor for a token-per-file client."""
    import queue
    import resource
    import threading

    import requests
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from benchmarks.bench_upload import TOKEN_PATH, swappable_client
    from benchmarks.common import API_KEY

    paths: queue.Queue[Path] = queue.Queue()
    for path in sorted(folder.rglob("*.glb")):
        paths.put(path)
    chunk = chunk_mib * MIB
    url = servers.api_base_url + TOKEN_PATH
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def worker() -> None:
        session = requests.Session()
        client, creds = swappable_client(
            servers,
            Config(
                region_name=servers.region,
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                max_pool_connections=5,
            ),
        )
        config = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=4
        )
        try:
            while True:
                try:
                    path = paths.get_nowait()
                except queue.Empty:
                    return
                size = path.stat().st_size
                data = path.read_bytes() if size < chunk else None
                token = session.post(url, json={"format": "glb"}, headers=headers, timeout=60)
                grant = token.json()["data"]
                creds.access_key = grant["sts_ak"]
                creds.secret_key = grant["sts_sk"]
                creds.token = grant["session_token"]
                bucket, key = grant["resource_bucket"], grant["resource_uri"]
                if data is not None:
                    client.put_object(Bucket=bucket, Key=key, Body=data)
                else:
                    client.upload_file(str(path), bucket, key, Config=config)
        finally:
            session.close()
            client.close()

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    srv0, cpu0, t0 = servers.cpu_seconds(), cpu(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, cpu() - cpu0, servers.cpu_seconds() - srv0


def outcomes(daemon: Daemon, want: int, timeout: float) -> dict[str, int]:
    names = ("file.uploaded", "file.rejected", "file.failed")
    counts = dict.fromkeys(names, 0)
    deadline = time.monotonic() + timeout
    while sum(counts.values()) < want:
        for event in daemon.new_events():
            if event.get("event") in counts:
                counts[event["event"]] += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counts} after {timeout} s; see {daemon.log}")
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited; see {daemon.log}")
        time.sleep(0.05)
    return counts


def report(
    results: dict[str, tuple[float, float, float]],
    files: int,
    total: int,
    tokens: int,
    done: dict[str, int],
    server: str = "moto",
) -> None:
    print(
        f"\n{'tool':<30}{'wall s':>8}{'files/s':>9}{'MiB/s':>8}{'client CPU s':>14}"
        f"{'CPU ms/file':>13}{'server CPU s':>14}"
    )
    for name, (wall, cpu, srv) in results.items():
        print(
            f"{name:<30}{wall:>8.1f}{files / wall:>9.1f}{total / MIB / wall:>8.1f}{cpu:>14.2f}"
            f"{1000 * cpu / files:>13.2f}{srv:>14.1f}"
        )
    ours = results["tripo-watchd (daemon)"]
    base = results["aws s3 cp --recursive"]
    ratio = ours[0] / base[0]
    print(
        f"\ntripo-watchd / aws s3 cp --recursive wall time: {ratio:.2f}×  "
        f"(goal ≤ 1.0×: {verdict(ratio <= 1.0)})"
    )
    print(f"tripo-watchd / aws s3 cp --recursive client CPU: {ours[1] / base[1]:.2f}×")
    tight = results.get("tight loop (token per file)")
    if tight:
        print(
            f"tripo-watchd / tight loop (a token per file, nothing else) wall time: "
            f"{ours[0] / tight[0]:.2f}×, client CPU: {ours[1] / tight[1]:.2f}×"
        )
    print(f"daemon outcomes: {done}; STS tokens minted: {tokens} (aws: 1 credential set)")
    mint = "3 IAM/STS calls" if server == "moto" else "one AssumeRole with a session policy"
    print(
        f"server CPU per file — daemon {1000 * ours[2] / files:.1f} ms (each token: {mint}, "
        f"plus the emulator), aws {1000 * base[2] / files:.1f} ms; the servers share the "
        f"client's 2 cores"
    )


if __name__ == "__main__":
    raise SystemExit(main())
