"""Shared fixtures: one local S3 per session, a fresh Tripo emulator per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tripo_watchd.sandbox import S3Server, TripoEmulator


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3/IAM/STS with SigV4 enforced, started once for the whole session."""
    log_dir: Path = tmp_path_factory.mktemp("s3server")
    with S3Server(log_dir) as server:
        yield server


@pytest.fixture
def api_key() -> str:
    """A fresh API key, accepted by the `emulator` fixture."""
    return "tsk_test_" + secrets.token_hex(8)


@pytest.fixture
def emulator(s3_server: S3Server, api_key: str) -> Iterator[TripoEmulator]:
    """A Tripo API emulator on 127.0.0.1 that accepts `api_key`, stopped after the test."""
    with TripoEmulator(s3_server, api_keys=[api_key]) as emu:
        yield emu
