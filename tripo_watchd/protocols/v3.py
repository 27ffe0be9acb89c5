"""API v3: `POST /files/presign` names a URL and a file token; the bytes go in one HTTP PUT."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from tripo_watchd.errors import (
    CredentialsExpired,
    MalformedResponse,
    NetworkError,
    StorageAccessDenied,
    StorageUnavailable,
)
from tripo_watchd.formats import FileKind
from tripo_watchd.protocols import Body, Destination, ProgressFactory
from tripo_watchd.protocols.s3_sender import bandwidth_for, open_for_upload
from tripo_watchd.protocols.tripo_api import GrantClient, untrusted_certificate
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import Settings
from tripo_watchd.throttle import ThrottledReader


@dataclass(frozen=True)
class PresignedDestination:
    """A presigned PUT URL (hidden: it is a credential) and the file token a task will take."""

    file_token: str
    task_type: str
    endpoint: str
    expires_at: float
    trace_id: str | None
    upload_url: Secret = field(repr=False)

    def ledger_fields(self) -> dict[str, Any]:
        return {
            "protocol": V3Presign.name,
            "file_token": self.file_token,
            "task_file": {"type": self.task_type, "file_token": self.file_token},
            "endpoint": self.endpoint,
            "trace_id": self.trace_id,
        }


def parse_presign(
    data: dict[str, Any], trace_id: str | None, task_type: str
) -> PresignedDestination:
    """A destination from a presign answer's `data`, or MalformedResponse."""
    url, token = data.get("upload_url"), data.get("file_token")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise MalformedResponse("the presign answer lacks an upload_url", trace_id=trace_id)
    if not isinstance(token, str) or not token:
        raise MalformedResponse("the presign answer lacks a file_token", trace_id=trace_id)
    expires_in = data.get("expires_in")
    seconds = float(expires_in) if isinstance(expires_in, int | float) else 1800.0
    parts = urlsplit(url)
    return PresignedDestination(
        file_token=token,
        task_type=task_type,
        endpoint=f"{parts.scheme}://{parts.netloc}",
        expires_at=time.monotonic() + seconds,
        trace_id=trace_id,
        upload_url=Secret(url),
    )


class V3Presign:
    """The v3 flow: one worker's API session, and a plain HTTP session for the PUTs."""

    name = "v3"

    def __init__(
        self,
        settings: Settings,
        api_key: Callable[[], Secret],
        on_secret: Callable[[str], None] = lambda value: None,
        progress_for: ProgressFactory | None = None,
    ) -> None:
        self._settings = settings
        self._grants = GrantClient(settings.api, api_key)
        self._storage = requests.Session()
        ca_bundle = settings.s3.ca_bundle
        self._verify: str | bool = str(ca_bundle) if ca_bundle is not None else True
        self._on_secret = on_secret
        self._bandwidth = bandwidth_for(settings.s3)
        self._progress_for = progress_for or (lambda body: None)

    def destination(self, kind: FileKind, size: int) -> PresignedDestination:
        data, trace_id = self._grants.ask("/files/presign", kind.format)
        destination = parse_presign(data, trace_id, kind.task_type)
        self._on_secret(destination.upload_url.reveal().partition("?")[2])
        return destination

    def send(self, destination: Destination, body: Body) -> None:
        assert isinstance(destination, PresignedDestination)
        if time.monotonic() >= destination.expires_at:
            raise CredentialsExpired("the presigned upload URL expired before it was used")
        url = destination.upload_url.reveal()
        timeout = (10.0, max(60.0, self._settings.api.timeout_seconds))
        headers = {"Content-Length": str(body.size)}
        progress = self._progress_for(body)
        try:
            with contextlib.ExitStack() as stack:
                source: Any = body.data
                if source is None:
                    source = stack.enter_context(open_for_upload(body))
                if self._bandwidth is not None or progress is not None:
                    source = ThrottledReader(source, self._bandwidth, callback=progress)
                response = self._storage.put(
                    url, data=source, headers=headers, timeout=timeout, verify=self._verify
                )
        except requests.exceptions.SSLError as exc:
            raise untrusted_certificate(destination.endpoint, "s3.ca_bundle", exc) from exc
        except requests.RequestException as exc:
            raise NetworkError(f"could not reach the upload URL: {type(exc).__name__}") from exc
        if response.status_code in (200, 201, 204):
            return
        text = response.text[:2000]
        if response.status_code == 403 and ("expired" in text.lower() or "Expired" in text):
            raise CredentialsExpired("the presigned upload URL expired")
        if response.status_code in (400, 403) and (
            "SignatureDoesNotMatch" in text or "InvalidAccessKeyId" in text
        ):
            raise CredentialsExpired("the storage refused the presigned URL's signature")
        if response.status_code in (401, 403):
            raise StorageAccessDenied(
                f"the storage denied the upload (HTTP {response.status_code})"
            )
        raise StorageUnavailable(f"the storage failed the upload (HTTP {response.status_code})")

    def close(self) -> None:
        self._grants.close()
        self._storage.close()
