"""A local S3 (moto server in a subprocess) that enforces SigV4 and IAM like the real one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

from tripo_watchd.sandbox.service import Service

REGION = "us-west-2"
BUCKET = "tripo-data"
ADMIN_USER = "admin"
# CreateUser, CreateAccessKey, PutUserPolicy: the only calls moto lets through unsigned.
_BOOTSTRAP_CALLS = 3
UPLOAD_ACTIONS = ("s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")
_ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
_TRUST_ANYONE = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def upload_policy(bucket: str, key: str) -> str:
    """The IAM policy document that allows writing exactly one key, and nothing else."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": list(UPLOAD_ACTIONS),
                    "Resource": f"arn:aws:s3:::{bucket}/{key}",
                }
            ],
        }
    )


class LocalS3(Service):
    """A local S3 on 127.0.0.1 with an admin identity and a bucket: what the emulator, the tests
    and the benchmarks use. Subclasses start the server and mint the per-key credentials."""

    region: str = REGION
    bucket: str = BUCKET
    port: int = 0
    admin_access_key: str = ""
    admin_secret_key: str = ""
    ca_bundle: Path | None = None
    log_path: Path | None = None
    _s3: Any = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def mint_credentials(
        self, bucket: str, key: str, duration_seconds: int = 900
    ) -> dict[str, str]:
        """Temporary credentials that may write exactly `bucket/key` (a trailing `*`: a prefix)."""
        raise NotImplementedError

    @staticmethod
    def _credentials(answer: dict[str, Any]) -> dict[str, str]:
        """The three fields of an AssumeRole answer's `Credentials` that a client signs with."""
        creds = answer["Credentials"]
        return {key: creds[key] for key in ("AccessKeyId", "SecretAccessKey", "SessionToken")}

    def _client(
        self,
        service: str,
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
    ) -> Any:
        session: Any = boto3.session.Session()
        return session.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            verify=str(self.ca_bundle) if self.ca_bundle else None,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=32,
            ),
        )

    def admin_client(self, service: str = "s3") -> Any:
        """A fresh boto3 client for `service`, signed as the all-powerful `admin` user."""
        return self._client(service, self.admin_access_key, self.admin_secret_key)

    def client_for(self, credentials: dict[str, str], service: str = "s3") -> Any:
        """A boto3 client signed with credentials as `mint_credentials` returns them."""
        return self._client(
            service,
            credentials["AccessKeyId"],
            credentials["SecretAccessKey"],
            credentials.get("SessionToken"),
        )

    def put_bytes(
        self, key: str, body: bytes, bucket: str | None = None, content_type: str | None = None
    ) -> str:
        """Store `body` at `key` as admin; returns the ETag."""
        extra = {"ContentType": content_type} if content_type else {}
        answer = self._s3.put_object(Bucket=bucket or self.bucket, Key=key, Body=body, **extra)
        etag: str = answer["ETag"]
        return etag

    def object_bytes(self, key: str, bucket: str | None = None) -> bytes:
        """The stored bytes of `key` (read as admin)."""
        body: bytes = self._s3.get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()
        return body

    def list_keys(self, bucket: str | None = None) -> list[str]:
        """Every key in the bucket, sorted."""
        keys: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket or self.bucket):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)


class S3Server(LocalS3):
    """moto's server as a subprocess on 127.0.0.1, with an `admin` user and bucket `tripo-data`."""

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
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self.region = REGION
        self.bucket = BUCKET
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.ca_bundle = ca_bundle
        self.port = port
        self.startup_timeout = startup_timeout
        self._log_dir = log_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.log_path: Path | None = None
        self.admin_access_key = ""
        self.admin_secret_key = ""
        self._lock = threading.Lock()
        self._iam: Any = None
        self._sts: Any = None
        self._s3: Any = None

    @property
    def endpoint_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        """Start moto, wait until it listens, then create the admin user and the bucket."""
        if self._proc is not None:
            return self
        if self._log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tripo-s3-")
            self._log_dir = Path(self._tmp.name)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        self.log_path = self._log_dir / f"moto-{self.port}.log"
        self._log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls_cert and self.tls_key:
            cmd += ["-c", str(self.tls_cert), "-k", str(self.tls_key)]
        env = dict(os.environ)
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_BOOTSTRAP_CALLS)
        env.pop("MOTO_CALL_RESET_API", None)
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        try:
            self._wait_listening()
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the subprocess and drop the temporary log directory, if any."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._log_dir = None

    def _wait_listening(self) -> None:
        # A bare TCP connect: an HTTP probe would spend one of the unauthenticated calls.
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited early; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not listen; see {self.log_path}") from None
                time.sleep(0.02)

    def _bootstrap(self) -> None:
        anon = self._client("iam", "bootstrap", "bootstrap")
        anon.create_user(UserName=ADMIN_USER)
        key = anon.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        anon.put_user_policy(UserName=ADMIN_USER, PolicyName="allow-all", PolicyDocument=_ALLOW_ALL)
        self.admin_access_key = key["AccessKeyId"]
        self.admin_secret_key = key["SecretAccessKey"]
        self._iam = self.admin_client("iam")
        self._sts = self.admin_client("sts")
        self._s3 = self.admin_client("s3")
        self._s3.create_bucket(
            Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": self.region}
        )

    def mint_credentials(
        self, bucket: str, key: str, duration_seconds: int = 900
    ) -> dict[str, str]:
        """Temporary credentials that may write exactly `bucket/key`, as Tripo's STS token does.

        moto ignores AssumeRole session policies but enforces the role's own inline policy,
        so every token gets its own role scoped to the key; the session policy is passed
        too, which is what makes the same call correct against real AWS.
        """
        policy = upload_policy(bucket, key)
        role_name = f"tripo-upload-{uuid.uuid4().hex}"
        with self._lock:
            role = self._iam.create_role(
                RoleName=role_name, AssumeRolePolicyDocument=_TRUST_ANYONE
            )["Role"]
            self._iam.put_role_policy(
                RoleName=role_name, PolicyName="upload-one-key", PolicyDocument=policy
            )
            answer = self._sts.assume_role(
                RoleArn=role["Arn"],
                RoleSessionName="tripo-upload",
                Policy=policy,
                DurationSeconds=duration_seconds,
            )
        return self._credentials(answer)
