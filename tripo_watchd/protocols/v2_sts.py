"""API v2: a one-time STS token per file (`/upload/sts/token`), then boto3 to the key it names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tripo_watchd.errors import MalformedResponse
from tripo_watchd.formats import FileKind
from tripo_watchd.protocols import Body, Destination, ProgressFactory
from tripo_watchd.protocols.s3_sender import Route, S3Sender, StsCredentials, choose_route
from tripo_watchd.protocols.tripo_api import GrantClient
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import Settings

_REQUIRED = ("s3_host", "resource_bucket", "resource_uri", "session_token", "sts_ak", "sts_sk")


@dataclass(frozen=True)
class StsDestination:
    """What one STS token names: the bucket, the key, the route, and its credentials (hidden)."""

    bucket: str
    key: str
    route: Route
    task_type: str
    trace_id: str | None
    credentials: StsCredentials = field(repr=False)

    def ledger_fields(self) -> dict[str, Any]:
        return {
            "protocol": V2Sts.name,
            "bucket": self.bucket,
            "key": self.key,
            "uri": f"s3://{self.bucket}/{self.key}",
            "task_file": {
                "type": self.task_type,
                "object": {"bucket": self.bucket, "key": self.key},
            },
            "endpoint": self.route.shown,
            "trace_id": self.trace_id,
        }


def parse_token(data: dict[str, Any], trace_id: str | None) -> tuple[str, str, str, StsCredentials]:
    """(s3_host, bucket, key, credentials) from a token answer's `data`, or MalformedResponse."""
    missing = [name for name in _REQUIRED if not isinstance(data.get(name), str) or not data[name]]
    if missing:
        raise MalformedResponse(
            f"the STS token answer lacks {', '.join(missing)}", status=200, trace_id=trace_id
        )
    host = data["s3_host"].removeprefix("https://").removeprefix("http://").rstrip("/")
    creds = StsCredentials(
        Secret(data["sts_ak"]), Secret(data["sts_sk"]), Secret(data["session_token"])
    )
    return host, data["resource_bucket"], data["resource_uri"], creds


class V2Sts:
    """The documented v2 STS flow: one worker's API session and S3 clients."""

    name = "v2-sts"

    def __init__(
        self,
        settings: Settings,
        api_key: Callable[[], Secret],
        on_secret: Callable[[str], None] = lambda value: None,
        progress_for: ProgressFactory | None = None,
    ) -> None:
        self._settings = settings
        self._grants = GrantClient(settings.api, api_key)
        self._s3 = S3Sender(settings.s3, progress_for)
        self._on_secret = on_secret

    def destination(self, kind: FileKind, size: int) -> StsDestination:
        data, trace_id = self._grants.ask("/upload/sts/token", kind.format)
        host, bucket, key, creds = parse_token(data, trace_id)
        for secret in (creds.secret_key, creds.session_token):
            self._on_secret(secret.reveal())
        return StsDestination(
            bucket=bucket,
            key=key,
            route=choose_route(self._settings.s3, host, size),
            task_type=kind.task_type,
            trace_id=trace_id,
            credentials=creds,
        )

    def send(self, destination: Destination, body: Body) -> None:
        assert isinstance(destination, StsDestination)
        self._s3.put(
            destination.route, destination.bucket, destination.key, destination.credentials, body
        )

    def close(self) -> None:
        self._grants.close()
        self._s3.close()
