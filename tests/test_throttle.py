"""Tests for the bandwidth cap: rate parsing, the shared bucket and the pacing reader."""

from __future__ import annotations

import io
import threading
import time

import pytest

from tripo_watchd.throttle import Bandwidth, ThrottledReader, parse_rate, shared_bandwidth


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20MB/s", 20_000_000),
        ("512 KiB/s", 524_288),
        ("1.5GB", 1_500_000_000),
        ("2 MiB", 2_097_152),
        ("10kB/s", 10_000),
        ("800000", 800_000),
        ("64B/s", 64),
    ],
)
def test_parse_rate(text: str, expected: int) -> None:
    """Rates are written with decimal or binary units and an optional /s."""
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "20 MB/min", "-1MB/s", "", "MB/s"])
def test_parse_rate_rejects_with_help(text: str) -> None:
    """A malformed rate names the accepted units."""
    with pytest.raises(ValueError, match=r"KiB, MiB, GiB"):
        parse_rate(text)


def test_parse_rate_refuses_bits_and_zero() -> None:
    """Bits are refused with a hint to convert, and a zero rate is refused."""
    with pytest.raises(ValueError, match="divide by 8"):
        parse_rate("100Mb/s")
    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_rate("0MB/s")


def test_reading_two_megabytes_at_four_per_second_takes_half_a_second() -> None:
    """Reading 2 MB through a 4 MB/s cap takes about 0.5 s."""
    data = b"x" * 2_000_000
    reader = ThrottledReader(data, Bandwidth(parse_rate("4MB/s")))
    started = time.monotonic()
    out = bytearray()
    while chunk := reader.read(64 * 1024):
        out += chunk
    elapsed = time.monotonic() - started
    assert bytes(out) == data
    assert 0.425 <= elapsed <= 0.575


def test_workers_share_the_cap() -> None:
    """Two readers on one Bandwidth together stay under the cap."""
    bandwidth = Bandwidth(4_000_000)
    readers = [ThrottledReader(b"y" * 1_000_000, bandwidth) for _ in range(2)]
    threads = [threading.Thread(target=r.read) for r in readers]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert 0.425 <= time.monotonic() - started <= 0.575


def test_bucket_books_time_in_order() -> None:
    """The bucket makes each caller wait for the bytes booked before it (fake clock)."""
    now = [100.0]
    bandwidth = Bandwidth(1000, burst_bytes=0, clock=lambda: now[0])
    assert bandwidth.reserve(500) == pytest.approx(0.5)
    assert bandwidth.reserve(500) == pytest.approx(1.0)
    now[0] += 5  # idle time does not build up beyond the burst
    assert bandwidth.reserve(1000) == pytest.approx(1.0)


def test_stop_cuts_the_wait_short() -> None:
    """A set stop event ends a throttled wait at once, so shutdown is not delayed."""
    stop = threading.Event()
    stop.set()
    reader = ThrottledReader(b"z" * 1_000_000, Bandwidth(1000), stop=stop)
    started = time.monotonic()
    assert len(reader.read()) == 1_000_000
    assert time.monotonic() - started < 1


def test_reader_is_a_file_for_boto3() -> None:
    """The reader seeks, tells and has a length like the file it wraps; re-reads count once."""
    seen: list[int] = []
    reader = ThrottledReader(io.BytesIO(b"0123456789"), None, callback=seen.append)
    assert len(reader) == 10 and reader.readable() and reader.seekable()
    assert reader.read(4) == b"0123" and reader.tell() == 4
    reader.seek(0)
    assert reader.read() == b"0123456789"
    assert reader.seek(-2, io.SEEK_END) == 8 and reader.read() == b"89"
    assert sum(seen) == 10
    with reader:
        pass
    assert reader.closed


def test_shared_bandwidth_is_one_per_rate() -> None:
    """Every worker asking for the same cap gets the same bucket."""
    assert shared_bandwidth(1234) is shared_bandwidth(1234)
    assert shared_bandwidth(1234) is not shared_bandwidth(4321)
