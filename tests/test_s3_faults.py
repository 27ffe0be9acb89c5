"""S3 misbehaving under the running daemon: each file lands whole or is failed with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    DaemonProcess,
    glb_bytes,
    read_ledger,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator
from tripo_watchd.sandbox.faultproxy import FaultProxy

MiB = 1024 * 1024
MULTIPART = {"multipart_threshold_bytes": 5 * MiB, "multipart_chunk_bytes": 5 * MiB}


class Rig:
    """An inbox watched by the daemon, whose S3 traffic goes through a fault proxy."""

    def __init__(
        self, tmp: Path, emulator: TripoEmulator, s3: S3Server, proxy: FaultProxy, api_key: str
    ) -> None:
        self.tmp, self.emulator, self.s3, self.proxy = tmp, emulator, s3, proxy
        self.inbox = tmp / "inbox"
        self.inbox.mkdir()
        self.ledger = tmp / "state" / "ledger.jsonl"
        self.key_file = write_key(tmp / "api-key", api_key)
        self.configure()

    def configure(self, **sections: dict[str, Any]) -> None:
        merged: dict[str, dict[str, Any]] = {
            "watch": {"settle_seconds": 0, "rescan_seconds": 0},
            "workers": {"count": 2},
            "pipeline": {"max_attempts": 6},
            "s3": dict(MULTIPART),
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        write_config(
            self.tmp / "cfg.toml",
            api_base_url=self.emulator.base_url,
            s3_endpoint_url=self.proxy.url,
            ledger=self.ledger,
            key_file=self.key_file,
            watch=[self.inbox],
            sections=merged,
        )

    def daemon(self) -> DaemonProcess:
        return DaemonProcess(self.tmp / "cfg.toml", self.tmp / "daemon.log")

    def drop(self, name: str, data: bytes) -> Path:
        path = self.inbox / name
        path.write_bytes(data)
        return path

    def outcome(self, path: Path, timeout: float = 30) -> dict[str, Any]:
        """The first uploaded or failed record for `path`, waiting for it."""

        def find() -> dict[str, Any] | None:
            for record in read_ledger(self.ledger):
                if record["path"] == str(path) and record["status"] in ("uploaded", "failed"):
                    return record
            return None

        found: dict[str, Any] = wait_for(find, timeout=timeout)
        return found

    def assert_landed(self, path: Path, daemon: DaemonProcess) -> dict[str, Any]:
        record = self.outcome(path)
        assert record["status"] == "uploaded", record
        assert self.s3.object_bytes(record["key"]) == path.read_bytes()
        assert daemon.proc is not None and daemon.proc.poll() is None
        return record


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def rig(
    tmp_path: Path, emulator: TripoEmulator, s3_server: S3Server, proxy: FaultProxy, api_key: str
) -> Rig:
    return Rig(tmp_path, emulator, s3_server, proxy, api_key)


def test_s3_503_slowdown_and_500_are_retried_until_the_file_lands(rig):
    """S3 SlowDown/InternalError answers are retried (by botocore, then with a new token)."""
    with rig.daemon() as daemon:
        rig.proxy.slowdown_next(2)
        first = rig.assert_landed(rig.drop("a.png", unique_png(1)), daemon)
        assert first["attempts"] == 1 and rig.emulator.token_count() == 1
        rig.proxy.slowdown_next(3)  # botocore's 3 tries all fail: the pipeline takes a new token
        rig.proxy.respond_next(1, 500, "InternalError", "We encountered an internal error.")
        second = rig.assert_landed(rig.drop("b.png", unique_png(2)), daemon)
        assert second["attempts"] == 2 and rig.emulator.token_count() == 3
    assert rig.proxy.stats().faults == {"http_503": 5, "http_500": 1}


def test_connection_reset_mid_upload_is_retried_byte_identical(rig):
    """A connection reset part-way through a PUT or a multipart part still ends byte-identical."""
    with rig.daemon() as daemon:
        rig.proxy.reset_after_bytes(200_000)
        single = rig.drop("single.glb", glb_bytes(3 * MiB))
        rig.assert_landed(single, daemon)
        rig.proxy.reset_after_bytes(1 * MiB, n=2)
        multi = rig.drop("multi.glb", glb_bytes(11 * MiB + 123))
        rig.assert_landed(multi, daemon)
    assert rig.proxy.stats().faults == {"reset_mid": 3}


def test_stall_shorter_than_the_read_timeout_just_delays_the_upload(rig):
    """S3 going quiet for 2 s delays the upload but it completes, once, byte-identical."""
    with rig.daemon() as daemon:
        rig.proxy.stall(2.0, n=1)
        record = rig.assert_landed(rig.drop("slow.png", unique_png(3)), daemon)
        assert record["attempts"] == 1 and record["seconds"] >= 1.9


def test_stall_longer_than_the_read_timeout_is_retried(rig):
    """An S3 connection that hangs past the read timeout is abandoned and the file retried."""
    rig.configure(s3={"read_timeout_seconds": 1, "connect_timeout_seconds": 1})
    with rig.daemon() as daemon:
        rig.proxy.stall(5.0, n=1)
        record = rig.assert_landed(rig.drop("hung.png", unique_png(4)), daemon)
        assert record["seconds"] < 4.5


def test_credentials_expiring_during_multipart_restart_the_file_with_a_new_token(rig):
    """ExpiredToken on part 2 of a multipart upload fetches a new token and re-sends the file."""
    with rig.daemon() as daemon:
        rig.proxy.respond_next(
            1, 400, "ExpiredToken", "The provided token has expired.", match="partNumber=2"
        )
        path = rig.drop("big.glb", glb_bytes(12 * MiB))
        record = rig.assert_landed(path, daemon)
    first, second = rig.emulator.tokens
    assert record["key"] == second.key and record["attempts"] == 2
    assert first.key not in rig.s3.list_keys()
    assert rig.proxy.stats().faults == {"http_400": 1}


def test_token_with_already_expired_credentials_restarts_a_multipart_file(rig):
    """A token whose credentials S3 refuses (InvalidAccessKeyId) is replaced and the file lands."""
    rig.emulator.inject(Fault("expired_credentials"))
    with rig.daemon() as daemon:
        record = rig.assert_landed(rig.drop("big.glb", glb_bytes(6 * MiB)), daemon)
    bad, good = rig.emulator.tokens
    assert not bad.valid and record["key"] == good.key and record["attempts"] == 2


def test_access_denied_is_recorded_failed_once_and_the_daemon_carries_on(rig):
    """AccessDenied is recorded failed with the reason after one try; later files still upload."""
    with rig.daemon() as daemon:
        rig.proxy.respond_next(50, 403, "AccessDenied", "Access Denied")
        denied = rig.outcome(rig.drop("denied.png", unique_png(5)))
        assert denied["status"] == "failed" and "AccessDenied" in denied["reason"]
        assert denied["attempts"] == 1 and denied["retryable"] is False
        rig.proxy.clear()
        rig.assert_landed(rig.drop("fine.png", unique_png(6)), daemon)
        assert daemon.events("file.failed")
    assert rig.proxy.stats().faults == {"http_403": 1}
    assert rig.emulator.token_count() == 2
    assert [r["status"] for r in read_ledger(rig.ledger)] == ["failed", "uploaded"]
