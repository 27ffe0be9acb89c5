"""SHA-256 of a file taken from the bytes its upload reads: each byte once, in file order."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from tripo_watchd.streams import StreamWrapper

_HASHER_NICENESS = 10  # relative to the process; Linux gives every thread its own niceness


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

    def hash_file(self, fd: int, stop: threading.Event, chunk: int = 1 << 20) -> None:
        """Hash the file open at `fd` from the high-water mark to `size` (pread: offset kept)."""
        with self._lock:
            position = self._hashed
        while position < self.size and not stop.is_set():
            try:
                data = os.pread(fd, min(chunk, self.size - position), position)
            except OSError:
                return  # an I/O error: incomplete, so None (the pipeline hashes it again)
            if not data:
                return  # shorter than signed: the digest stays incomplete, so None
            self.feed(position, data)
            position += len(data)

    def _hash_file_politely(self, fd: int, stop: threading.Event) -> None:
        # Bookkeeping, not the transfer: on a busy machine the bytes on the wire go first.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _HASHER_NICENESS)
        self.hash_file(fd, stop)

    @contextmanager
    def alongside(self, fd: int) -> Iterator[None]:
        """Hash the file at `fd` in a thread of its own while the body runs (parallel readers).

        hashlib releases the GIL on large buffers, so this costs the sender no throughput.
        A failed body stops the thread early: the next attempt resumes from the mark.
        """
        stop = threading.Event()
        thread = threading.Thread(
            target=self._hash_file_politely, args=(fd, stop), name="tripo-sha256", daemon=True
        )
        thread.start()
        try:
            yield
        except BaseException:
            stop.set()
            raise
        finally:
            thread.join()

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
