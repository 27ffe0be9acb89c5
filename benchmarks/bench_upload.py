"""Throughput: Pipeline × 8 workers vs a tight token+put_object loop vs the SDK pattern."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import queue
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import requests
from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, Credentials

from benchmarks.common import API_KEY, Servers, machine, verdict, write_files
from tripo_watchd.ledger import JsonlLedger
from tripo_watchd.logs import configure_logging
from tripo_watchd.pipeline import Pipeline
from tripo_watchd.protocols.registry import make_protocol
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import (
    ApiSettings,
    LedgerSettings,
    S3Settings,
    Settings,
    WatchSettings,
    WorkerSettings,
)

TOKEN_PATH = "/upload/sts/token"


@dataclass
class Result:
    name: str
    files: int
    wall: float
    cpu: float
    conns: int
    failures: int

    @property
    def rate(self) -> float:
        return self.files / self.wall

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.files


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_phase(
    name: str,
    servers: Servers,
    paths: list[Path],
    threads: int,
    make_worker: Callable[[], tuple[Callable[[Path], bool], Callable[[], None]]],
    warm: list[Path],
) -> Result:
    """Run `paths` through `threads` workers, each built by `make_worker` (do, close).

    Each worker first sends one file of `warm` (clients built, connections open) before the
    clock starts: the figures are the steady state of a long-running daemon.
    """
    work: queue.Queue[Path] = queue.Queue()
    warm_queue: queue.Queue[Path] = queue.Queue()
    for path in paths:
        work.put(path)
    for path in warm:
        warm_queue.put(path)
    failures = [0]
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)

    def loop() -> None:
        do, close = make_worker()
        do(warm_queue.get_nowait())
        ready.wait()
        try:
            while True:
                try:
                    path = work.get_nowait()
                except queue.Empty:
                    return
                if not do(path):
                    with lock:
                        failures[0] += 1
        finally:
            close()

    workers = [threading.Thread(target=loop, name=f"{name}-{n}") for n in range(threads)]
    servers.command("reset")
    for t in workers:
        t.start()
    ready.wait()  # every worker has sent its warm-up file
    cpu0, t0 = cpu_now(), time.perf_counter()
    for t in workers:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_now() - cpu0
    conns = servers.command("conns")["opened"]  # warm-up included
    return Result(name, len(paths), wall, cpu, conns, failures[0])


# -- the tight loop: token POST on a kept session + put_object on one reused client ----------


class _Swappable(Credentials):
    def __init__(self) -> None:
        super().__init__("unset", "unset", None)


class _Provider(CredentialProvider):  # type: ignore[misc]
    METHOD = "bench"

    def __init__(self, creds: Credentials) -> None:
        super().__init__()
        self._creds = creds

    def load(self) -> Credentials:
        return self._creds


def swappable_client(servers: Servers, config: Config) -> tuple[Any, Credentials]:
    """One boto3 S3 client on the proxy and the credentials it signs with, to swap per file."""
    creds = _Swappable()
    core = botocore.session.Session()
    core.register_component("credential_provider", CredentialResolver([_Provider(creds)]))
    client = boto3.Session(botocore_session=core).client(
        "s3", endpoint_url=servers.s3_proxy, config=config
    )
    return client, creds


def tight_worker(servers: Servers) -> tuple[Callable[[Path], bool], Callable[[], None]]:
    session = requests.Session()
    client, creds = swappable_client(
        servers,
        Config(
            region_name=servers.region,
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = servers.api_base_url + TOKEN_PATH

    def do(path: Path) -> bool:
        data = path.read_bytes()
        answer = session.post(url, json={"format": "glb"}, headers=headers, timeout=30).json()
        token = answer["data"]
        creds.access_key = token["sts_ak"]
        creds.secret_key = token["sts_sk"]
        creds.token = token["session_token"]
        client.put_object(Bucket=token["resource_bucket"], Key=token["resource_uri"], Body=data)
        return True

    def close() -> None:
        session.close()
        client.close()

    return do, close


# -- the official SDK pattern: a new HTTP call per token, a new boto3 client per file -------------


def sdk_worker(servers: Servers) -> tuple[Callable[[Path], bool], Callable[[], None]]:
    url = servers.api_base_url + TOKEN_PATH

    def do(path: Path) -> bool:
        data = path.read_bytes()
        answer = requests.post(
            url, json={"format": "glb"}, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        ).json()
        token = answer["data"]
        client = boto3.client(
            "s3",
            endpoint_url=servers.s3_proxy,
            region_name=servers.region,
            aws_access_key_id=token["sts_ak"],
            aws_secret_access_key=token["sts_sk"],
            aws_session_token=token["session_token"],
            config=Config(s3={"addressing_style": "path"}),
        )
        client.put_object(Bucket=token["resource_bucket"], Key=token["resource_uri"], Body=data)
        client.close()
        return True

    return do, lambda: None


# -- the pipeline: what daemon.py's _work does per worker ---------------------------------------


def pipeline_settings(servers: Servers, root: Path, workers: int) -> Settings:
    return replace(
        Settings(),
        api=ApiSettings(base_url=servers.api_base_url, timeout_seconds=30),
        s3=S3Settings(endpoint_url=servers.s3_proxy, accelerate="never"),
        watch=WatchSettings(paths=(root,)),
        workers=WorkerSettings(count=workers),
        ledger=LedgerSettings(path=root.parent / "state" / "ledger.jsonl"),
    )


def pipeline_factory(
    settings: Settings, ledger: JsonlLedger
) -> Callable[[], tuple[Callable[[Path], bool], Callable[[], None]]]:
    def key() -> Secret:
        return Secret(API_KEY)

    def make() -> tuple[Callable[[Path], bool], Callable[[], None]]:
        protocol = make_protocol(settings, key)
        pipeline = Pipeline(settings, ledger, protocol, roots=settings.watch.paths)

        def do(path: Path) -> bool:
            return pipeline.process(path).status == "uploaded"

        return do, protocol.close

    return make


def profile_pipeline(
    servers: Servers, settings: Settings, ledger: JsonlLedger, paths: list[Path]
) -> str:
    """cProfile of one worker running `paths` sequentially (cProfile sees one thread), timed in
    that thread's CPU time, so waits on the servers do not count."""
    do, close = pipeline_factory(settings, ledger)()
    do(paths[0])  # build clients, open connections
    profiler = cProfile.Profile(timer=time.thread_time)
    profiler.enable()
    for path in paths[1:]:
        do(path)
    profiler.disable()
    close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(25)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000, help="files per concurrent phase")
    parser.add_argument("--sdk-files", type=int, default=200, help="files for the SDK pattern")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="delay the S3 proxy adds per new connection and per request",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="split the tight and pipeline phases into this many alternating rounds (a shared "
        "machine's drift then hits both alike)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also cProfile N files through one pipeline worker",
    )
    parser.add_argument("--s3", choices=("moto", "seaweedfs"), default="moto", help="local S3")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tripo-bench-upload-") as tmp:
        root = Path(tmp)
        log_file = open(root / "pipeline.log", "w")  # noqa: SIM115
        configure_logging(json_output=True, level="info", stream=log_file)
        print(f"machine: {machine()}; S3: {args.s3}, proxy RTT {args.rtt_ms:g} ms")
        print(f"writing {2 * args.files + args.sdk_files + args.profile} × {args.size} B GLB files")
        w = args.workers
        rounds = max(1, args.rounds)
        warm = [
            write_files(root / "inbox", w, args.size, start=50_000_000 + n * 1000)
            for n in range(2 * rounds + 1)
        ]
        tight_files = write_files(root / "tight", args.files, args.size, start=10_000_000)
        pipe_files = write_files(root / "inbox", args.files, args.size, start=20_000_000)
        sdk_files = write_files(root / "sdk", args.sdk_files, args.size, start=30_000_000)
        prof_files = write_files(root / "prof", args.profile, args.size, start=40_000_000)
        with Servers(root / "servers", args.s3) as servers:
            servers.command(f"rtt {args.rtt_ms}")
            settings = pipeline_settings(servers, root / "inbox", args.workers)
            ledger = JsonlLedger(settings.ledger.path)
            results: dict[str, Result] = {}
            srv0 = servers.cpu_seconds()
            make_pipe = pipeline_factory(settings, ledger)
            for n in range(rounds):  # tight, pipeline, tight, pipeline, …
                part = slice(n * len(tight_files) // rounds, (n + 1) * len(tight_files) // rounds)
                add(
                    results,
                    run_phase(
                        "tight",
                        servers,
                        tight_files[part],
                        w,
                        lambda: tight_worker(servers),
                        warm[2 * n],
                    ),
                )
                add(
                    results,
                    run_phase("pipeline", servers, pipe_files[part], w, make_pipe, warm[2 * n + 1]),
                )
            results["sdk"] = run_phase(
                "sdk", servers, sdk_files, 1, lambda: sdk_worker(servers), warm[-1]
            )
            srv_cpu = servers.cpu_seconds() - srv0
            profile = (
                profile_pipeline(servers, settings, ledger, prof_files) if args.profile else ""
            )
            uploaded = ledger.counts().get("uploaded", 0)
            ledger.close()
        log_file.close()

    report(results, args.workers, srv_cpu, uploaded, args.files)
    if profile:
        print("\ncProfile, one pipeline worker, sorted by own time:\n" + profile)
    return 0


def add(results: dict[str, Result], r: Result) -> None:
    """Sum the rounds of one phase."""
    if r.name in results:
        old = results[r.name]
        r = Result(
            r.name,
            old.files + r.files,
            old.wall + r.wall,
            old.cpu + r.cpu,
            max(old.conns, r.conns),
            old.failures + r.failures,
        )
    results[r.name] = r


def report(
    results: dict[str, Result], workers: int, srv_cpu: float, uploaded: int, want: int
) -> None:
    print(
        f"\n{'phase':<34}{'files':>7}{'wall s':>9}{'files/s':>9}{'CPU ms/file':>13}"
        f"{'S3 conns*':>14}{'failed':>8}"
    )
    labels = {
        "tight": f"tight loop ({workers} threads, reused)",
        "pipeline": f"Pipeline ({workers} workers)",
        "sdk": "SDK pattern (sequential, new client)",
    }
    for key, r in results.items():
        print(
            f"{labels[key]:<34}{r.files:>7}{r.wall:>9.2f}{r.rate:>9.1f}{r.cpu_ms:>13.2f}"
            f"{r.conns:>14}{r.failures:>8}"
        )
    print(
        "* TCP connections the client opened to S3 in one round of the phase (each round "
        "builds its workers anew), warm-up file included; the most of any round"
    )
    tight, pipe, sdk = results["tight"], results["pipeline"], results["sdk"]
    ratio = pipe.wall / tight.wall * tight.files / pipe.files
    speedup = pipe.rate / sdk.rate
    cpu_ratio = pipe.cpu_ms / tight.cpu_ms
    print()
    ok = verdict(ratio <= 1.15)
    print(f"pipeline/tight-loop wall time per file: {ratio:.3f}  (goal ≤ 1.15: {ok})")
    print(f"pipeline/tight-loop client CPU per file: {cpu_ratio:.3f}")
    print(f"speedup vs SDK pattern: {speedup:.1f}×  (goal ≥ 5×: {verdict(speedup >= 5)})")
    print(f"client CPU per file, SDK pattern / pipeline: {sdk.cpu_ms / pipe.cpu_ms:.1f}×")
    print(
        f"S3 TCP connections in the pipeline phase: {pipe.conns}  "
        f"(goal ≤ workers + 2 = {workers + 2}: {verdict(pipe.conns <= workers + 2)})"
    )
    print(f"ledger: {uploaded} uploaded of {want} (plus profile files, if any)")
    total = sum(r.files for r in results.values())
    print(
        f"server CPU (S3 + emulator, separate process): {1000 * srv_cpu / total:.1f} ms/file "
        f"— the ceiling on {os.cpu_count()} cores; client figures above exclude it"
    )


if __name__ == "__main__":
    raise SystemExit(main())
