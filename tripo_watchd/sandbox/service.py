"""What the sandbox's servers share: `start()`/`stop()`, and `with` doing both."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """A server the tests and the sandbox start and stop; a context manager around that."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
