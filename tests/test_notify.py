"""Tests for the sd_notify client against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tripo_watchd.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, with its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def receive(sock: socket.socket) -> str:
    """One datagram as text."""
    return sock.recv(4096).decode()


def test_disabled_without_notify_socket() -> None:
    """Run outside systemd, every notification is a silent no-op."""
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("x")
    notifier.stopping()
    notifier.reloading()
    notifier.watchdog_ping()
    assert notifier.send(READY="1") is False
    assert notifier.watchdog_interval() is None


def test_messages_arrive_exactly(listener: tuple[socket.socket, str]) -> None:
    """systemd receives each lifecycle message in the documented KEY=value form."""
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    notifier.ready()
    assert receive(sock) == "READY=1"
    notifier.ready("watching 2 folders")
    assert receive(sock) == "READY=1\nSTATUS=watching 2 folders"
    notifier.status("3 queued")
    assert receive(sock) == "STATUS=3 queued"
    notifier.stopping()
    assert receive(sock) == "STOPPING=1"
    notifier.watchdog_ping()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.send(EXTEND_TIMEOUT_USEC="5000000") is True
    assert receive(sock) == "EXTEND_TIMEOUT_USEC=5000000"


def test_reloading_carries_monotonic_timestamp(listener: tuple[socket.socket, str]) -> None:
    """A reload announces RELOADING=1 with a CLOCK_MONOTONIC timestamp, as notify-reload needs."""
    sock, path = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = receive(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_abstract_namespace_socket() -> None:
    """A NOTIFY_SOCKET starting with '@' reaches a socket in the abstract namespace."""
    name = f"tripo-watchd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("ok")
        assert receive(sock) == "READY=1\nSTATUS=ok"


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    """A vanished notify socket never crashes the daemon; send reports False, again and again."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.send(READY="1") is False
    assert notifier.send(STATUS="still fine") is False
    notifier.watchdog_ping()


def test_unusable_socket_value_is_disabled() -> None:
    """A NOTIFY_SOCKET we cannot speak to (relative path, bare '@') disables notification."""
    assert not Notifier({"NOTIFY_SOCKET": "relative.sock"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "@"}).enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """The daemon pings at half the watchdog timeout, and only when the watchdog is its own."""
    assert Notifier(env).watchdog_interval() == expected
