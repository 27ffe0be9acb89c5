"""Tests for upload progress: log events at a bounded rate and the terminal bar."""

from __future__ import annotations

import io
from typing import Any

from tripo_watchd.progress import Progress, TerminalBar, fan_out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLogger:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_logs_percent_and_rate_at_most_every_interval() -> None:
    """Progress logs upload.progress with percent and MB/s no more often than every 5 s."""
    clock, logger = FakeClock(), FakeLogger()
    progress = Progress(100_000_000, path="/in/big.glb", clock=clock, logger=logger)
    for _ in range(4):
        clock.now += 1
        progress(5_000_000)
    assert logger.events == []
    clock.now += 1
    progress(5_000_000)
    clock.now += 1
    progress(5_000_000)
    (event,) = logger.events
    assert event["event"] == "upload.progress" and event["path"] == "/in/big.glb"
    assert event["percent"] == 25.0 and event["mb_per_s"] == 5.0
    clock.now += 5
    progress(10_000_000)
    assert logger.events[-1]["percent"] == 40.0 and logger.events[-1]["mb_per_s"] == 2.5


def test_progress_takes_back_retried_bytes() -> None:
    """Negative counts (a retried part) lower the total sent rather than double it."""
    progress = Progress(10, clock=FakeClock(), logger=FakeLogger())
    progress(8)
    progress(-8)
    progress(10)
    assert progress.sent == 10


def test_terminal_bar_redraws_one_line() -> None:
    """On a TTY the bar redraws a single line with \\r, throttled, and ends it on finish."""
    clock, out = FakeClock(), Tty()
    bar = TerminalBar(out, 4_000_000, label="big.glb", width=10, clock=clock)
    clock.now += 1
    bar(1_000_000)
    bar(1_000_000)  # same instant: not redrawn
    clock.now += 1
    bar(2_000_000)
    bar.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    first = text.split("\r")[1]
    assert first.startswith("big.glb [##........]") and " 25.0%" in first
    assert "2.0 MB/s" in text.split("\r")[3] and "100.0%" in text


def test_terminal_bar_is_silent_off_a_tty() -> None:
    """When the stream is not a terminal nothing is written."""
    out = io.StringIO()
    bar = TerminalBar(out, 100)
    bar(50)
    bar.finish()
    assert out.getvalue() == ""


def test_fan_out_feeds_every_callback() -> None:
    """One boto3 callback can drive both the log progress and the bar."""
    a: list[int] = []
    b: list[int] = []
    fan_out(a.append, b.append)(7)
    assert a == b == [7]
