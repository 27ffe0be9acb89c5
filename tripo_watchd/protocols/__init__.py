"""The upload seam: "a destination for this file" + "send the bytes there"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tripo_watchd.digest import StreamDigest
from tripo_watchd.formats import FileKind


@dataclass(frozen=True)
class Body:
    """The bytes of one file: in memory when small (read once), else the path to stream from.

    A streamed body may carry a `digest` that every stream opened to send it feeds.
    """

    path: Path
    size: int
    data: bytes | None = field(default=None, repr=False)
    digest: StreamDigest | None = field(default=None, repr=False, compare=False)


ProgressFactory = Callable[[Body], Callable[[int], None] | None]
"""Given a file about to be sent, a callback for bytes sent (or None for no progress)."""


class Destination(Protocol):
    """Where the API said one file goes; what of it the ledger keeps."""

    @property
    def trace_id(self) -> str | None: ...

    def ledger_fields(self) -> dict[str, Any]: ...


class UploadProtocol(Protocol):
    """One Tripo upload protocol, held by one worker (it keeps that worker's connections)."""

    name: str

    def destination(self, kind: FileKind, size: int) -> Destination: ...

    def send(self, destination: Destination, body: Body) -> None: ...

    def close(self) -> None: ...
