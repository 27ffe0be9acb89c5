"""The one error hierarchy of tripo-watchd; retry decisions read `transient`.

TripoWatchdError                 transient?
├── ConfigError                  no   bad configuration: names file, key, what is allowed
├── RejectedFile                 no   the file itself is unacceptable (reason for a person)
├── FileChanged                  yes  the file changed while it was read or sent: wait again
├── ApiError                          the Tripo API said no, or said nonsense
│   ├── AuthError                no*  401 / 1002: bad or revoked key (*pause, never "failed")
│   ├── PermissionDenied         no   403 / 1005, 2010 (credits)
│   ├── InvalidRequest           no   400 / 1003, 1004
│   ├── RateLimited              yes  429 / 1007, 2000; carries retry_after
│   ├── ServerError              yes  5xx / 1000, 1001
│   └── MalformedResponse        yes  not JSON, or JSON without the promised fields
├── NetworkError                 yes  connection refused/reset, timeout (API or S3)
├── TlsError                     no   a server's certificate is not trusted: set ca_bundle
├── TransferError                     S3 said no
│   ├── CredentialsExpired       yes  ExpiredToken / InvalidAccessKeyId: new token, start again
│   ├── StorageAccessDenied      no   AccessDenied at the key the token named
│   └── StorageUnavailable       yes  5xx / SlowDown after botocore's own retries
└── LedgerError                  yes  the ledger could not be written (disk full, read-only)
"""

from __future__ import annotations


class TripoWatchdError(Exception):
    """Base of every error tripo-watchd raises on purpose."""

    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(TripoWatchdError):
    """The configuration is unusable; the message names file, key and what is allowed."""


class RejectedFile(TripoWatchdError):
    """The file cannot be sent to Tripo; `message` says why, for a person."""


class FileChanged(TripoWatchdError):
    """The file changed while it was being read or sent; it goes back to waiting."""

    transient = True


class ApiError(TripoWatchdError):
    """The Tripo API answered with an error (HTTP status and body `code` kept)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.trace_id = trace_id


class AuthError(ApiError):
    """The API key was refused (401 / 1002): pause, tell the operator, never mark files failed."""


class PermissionDenied(ApiError):
    """The key may not do this (403 / 1005) or has no credits left (2010)."""


class InvalidRequest(ApiError):
    """The request was refused as malformed or invalid (400 / 1003, 1004)."""


class RateLimited(ApiError):
    """Too many requests (429 / 1007, 2000); `retry_after` seconds if the server said."""

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(ApiError):
    """The API failed on its side (5xx / 1000, 1001)."""

    transient = True


class MalformedResponse(ApiError):
    """The API answered something that is not the documented JSON."""

    transient = True


class NetworkError(TripoWatchdError):
    """The network failed: refused, reset, timed out (Tripo API or S3)."""

    transient = True


class TlsError(TripoWatchdError):
    """A server's TLS certificate was not trusted; configuration will help, retrying will not."""


class TransferError(TripoWatchdError):
    """S3 refused or failed the transfer."""


class CredentialsExpired(TransferError):
    """S3 no longer accepts the token's credentials: fetch a new token and start the file again."""

    transient = True


class StorageAccessDenied(TransferError):
    """S3 denied access to the key the token named: retrying will not help."""


class StorageUnavailable(TransferError):
    """S3 kept failing (5xx, SlowDown) beyond botocore's own retries."""

    transient = True


class LedgerError(TripoWatchdError):
    """The ledger could not be written; an upload never counts as done without its record."""

    transient = True
