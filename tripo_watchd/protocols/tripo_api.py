"""HTTP to the Tripo API: one kept-alive session, answers checked and mapped onto errors.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
import structlog

from tripo_watchd import __version__
from tripo_watchd.errors import (
    ApiError,
    AuthError,
    InvalidRequest,
    MalformedResponse,
    NetworkError,
    PermissionDenied,
    RateLimited,
    ServerError,
    TlsError,
)
from tripo_watchd.ratelimit import shared_pacer
from tripo_watchd.secrets import Secret
from tripo_watchd.settings import ApiSettings

log = structlog.get_logger(__name__)

TRACE_HEADER = "X-Tripo-Trace-ID"

_CODE_ERRORS: Mapping[int, tuple[type[ApiError], str]] = {
    1000: (ServerError, "the Tripo API had an internal error"),
    1001: (ServerError, "the Tripo API had an internal error"),
    1002: (AuthError, "the API key was refused"),
    1003: (InvalidRequest, "the Tripo API found the request body malformed"),
    1004: (InvalidRequest, "the Tripo API refused a parameter as invalid"),
    1005: (PermissionDenied, "this API key is not allowed to do this"),
    1007: (RateLimited, "the Tripo API rate limit was reached"),
    2000: (RateLimited, "the Tripo API concurrency limit was reached"),
    2010: (PermissionDenied, "the Tripo account has not enough credits"),
}


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def error_for(status: int, body: Any, headers: Mapping[str, str]) -> ApiError | None:
    """The error an answer means, or None when it is a success (HTTP 200 and code 0)."""
    trace_id = headers.get(TRACE_HEADER)
    code = body.get("code") if isinstance(body, dict) else None
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    server_message = body.get("message") if isinstance(body, dict) else None
    if status == 200 and code == 0:
        return None
    kind: type[ApiError]
    if status == 401:
        kind, text = AuthError, "the API key was refused"
    elif code is not None and code in _CODE_ERRORS:
        kind, text = _CODE_ERRORS[code]
    elif status == 429:
        kind, text = RateLimited, "the Tripo API rate limit was reached"
    elif status == 403:
        kind, text = PermissionDenied, "this API key is not allowed to do this"
    elif status == 404:
        kind, text = InvalidRequest, "the Tripo API has no such endpoint (check api.base_url)"
    elif 400 <= status < 500:
        kind, text = InvalidRequest, "the Tripo API refused the request"
    elif status >= 500:
        kind, text = ServerError, "the Tripo API had an internal error"
    elif code is None:
        kind, text = MalformedResponse, "the Tripo API answered without a numeric `code`"
    else:
        kind, text = ServerError, "the Tripo API answered with an unknown error code"
    detail = f" (HTTP {status}, code {code}"
    if isinstance(server_message, str) and server_message:
        detail += f": {server_message[:200]}"
    message = text + detail + ")"
    if kind is RateLimited:
        return RateLimited(
            message,
            retry_after=retry_after_seconds(headers.get("Retry-After")),
            status=status,
            code=code,
            trace_id=trace_id,
        )
    return kind(message, status=status, code=code, trace_id=trace_id)


def untrusted_certificate(url: str, setting: str, exc: Exception) -> TlsError:
    """The error for a TLS handshake that failed verification, saying what to configure."""
    text = str(exc)
    detail = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in text else "TLS error"
    return TlsError(
        f"the TLS certificate of {url} is not trusted ({detail}); if the server uses a private "
        f"CA, set {setting} to its PEM file"
    )


def _env_ca_bundle() -> str | bool:
    """The CA bundle requests would take from the environment, else True (its default store)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(name)
        if value:
            return value
    return True


class TripoApi:
    """One worker's connection to the Tripo API; `post` returns `data` or raises from errors.py."""

    def __init__(
        self,
        base_url: str,
        api_key: Callable[[], Secret],
        *,
        timeout: float,
        ca_bundle: Path | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"tripo-watchd/{__version__}"
        # The environment (proxies, REQUESTS_CA_BUNDLE) is read once here, not on every request:
        # requests re-reads it per call, which costs more CPU than the rest of a token request.
        self._session.trust_env = False
        self._session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        self._verify: str | bool = str(ca_bundle) if ca_bundle is not None else _env_ca_bundle()

    @classmethod
    def from_settings(cls, api: ApiSettings, api_key: Callable[[], Secret]) -> TripoApi:
        """The client `[api]` describes."""
        return cls(api.base_url, api_key, timeout=api.timeout_seconds, ca_bundle=api.ca_bundle)

    def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """Send one request; return (data, trace id) of a success or raise the mapped error."""
        url = f"{self.base_url}{path}"
        headers = {"Authorization": f"Bearer {self._api_key().reveal()}"}
        try:
            response = self._session.request(
                method,
                url,
                json=payload,
                headers=headers,
                timeout=self._timeout,
                verify=self._verify,
            )
            raw = response.content
        except requests.exceptions.SSLError as exc:
            raise untrusted_certificate(self.base_url, "api.ca_bundle", exc) from exc
        except requests.Timeout as exc:
            raise NetworkError(f"the Tripo API did not answer within {self._timeout:g} s") from exc
        except requests.RequestException as exc:
            raise NetworkError(
                f"could not reach the Tripo API at {self.base_url}: {type(exc).__name__}"
            ) from exc
        trace_id = response.headers.get(TRACE_HEADER)
        try:
            body: Any = response.json() if raw else None
        except ValueError:
            body = None
        error = error_for(response.status_code, body, response.headers)
        if error is None and not isinstance(body.get("data"), dict):
            error = MalformedResponse(
                "the Tripo API answered code 0 without a `data` object",
                status=response.status_code,
                trace_id=trace_id,
            )
        if error is not None:
            if body is None and response.status_code == 200:
                error = MalformedResponse(
                    "the Tripo API answered with something that is not JSON",
                    status=200,
                    trace_id=trace_id,
                )
            log.debug("api.error", path=path, status=response.status_code, trace_id=trace_id)
            raise error
        return body["data"], trace_id

    def close(self) -> None:
        self._session.close()


class GrantClient:
    """Asks the Tripo API for upload grants (STS tokens, presigned URLs), paced process-wide."""

    def __init__(self, api: ApiSettings, api_key: Callable[[], Secret]) -> None:
        self._api = TripoApi.from_settings(api, api_key)
        self._pacer = shared_pacer(api.max_uploads_per_minute)

    def ask(self, path: str, file_format: str) -> tuple[dict[str, Any], str | None]:
        """POST `{"format": F}` to `path`; (data, trace id) of the grant."""
        self._pacer.acquire()
        return self._api.request("POST", path, {"format": file_format})

    def close(self) -> None:
        self._api.close()
