"""SHA-256 of a file taken from the bytes its upload reads: each byte once, in file order."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import IO

from tripo_watchd.streams import StreamWrapper


class StreamDigest:
    """One file's SHA-256, fed by the streams that upload it (one per attempt).

    Bytes are hashed only past a high-water mark, so re-reads after a seek back (botocore's
    retries and signing passes, a whole new attempt) are not hashed twice. A read that starts
    past the mark leaves a gap: the digest is then invalid and `hexdigest()` returns None.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._sha = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) of the file are in the digest
        self._gap = False
        self._lock = threading.Lock()

    def feed(self, position: int, data: bytes) -> None:
        """Take note that `data` was read from file offset `position`."""
        end = position + len(data)
        with self._lock:
            if self._gap or end <= self._hashed:
                return
            if position > self._hashed:
                self._gap = True
                return
            self._sha.update(memoryview(data)[self._hashed - position :])
            self._hashed = end

    def reader(self, stream: IO[bytes]) -> HashingReader:
        """`stream` (an open file at any position) wrapped so that its reads feed this digest."""
        return HashingReader(stream, self)

    def hexdigest(self) -> str | None:
        """The SHA-256 of the file if exactly its `size` bytes were read in order, else None."""
        with self._lock:
            if self._gap or self._hashed != self.size:
                return None
            return self._sha.hexdigest()


class HashingReader(StreamWrapper):
    """A read-only, seekable file-like that feeds every read to a StreamDigest.

    It composes with ThrottledReader (wrap this one in it) and is usable directly as boto3's
    `put_object(Body=...)` or s3transfer's `upload(fileobj)`.
    """

    def __init__(self, stream: IO[bytes], digest: StreamDigest) -> None:
        super().__init__(stream)
        self._digest = digest
        self._position = stream.tell()

    def read(self, size: int | None = -1) -> bytes:
        data = self._stream.read(-1 if size is None else size)
        self._digest.feed(self._position, data)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._stream.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position
