"""API v3 (`/v3/files/presign` + one PUT) end to end, through the same pipeline and daemon."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from support import (
    DaemonProcess,
    jpeg_bytes,
    png_bytes,
    read_ledger,
    records_of,
    run_cli,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator

PRESIGN = "/v3/files/presign"


@pytest.fixture
def v3(tmp_path: Path, emulator: TripoEmulator, s3_server: S3Server, api_key: str):
    """A v3 config for the emulator; returns (tmp_path, reconfigure)."""
    key_file = write_key(tmp_path / "api-key", api_key)

    def config(**sections: dict) -> Path:
        merged: dict[str, dict] = {"api": {"protocol": "v3"}}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        return write_config(
            tmp_path / "cfg.toml",
            api_base_url=emulator.v3_base_url,
            s3_endpoint_url=s3_server.endpoint_url,
            ledger=tmp_path / "state" / "ledger.jsonl",
            key_file=key_file,
            watch=[tmp_path / "inbox"],
            sections=merged,
        )

    config()
    (tmp_path / "inbox").mkdir()
    return tmp_path, config


def stored(emulator: TripoEmulator, s3: S3Server, file_token: str) -> bytes:
    bucket, key = emulator.file_tokens[file_token]
    return s3.object_bytes(key, bucket)


def test_v3_upload_records_the_file_token_task_file(v3, emulator, s3_server):
    """Under v3 a file is PUT to the presigned URL and recorded with its file_token task object."""
    tmp_path, _ = v3
    data = jpeg_bytes()
    (tmp_path / "a.jpg").write_bytes(data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", tmp_path / "a.jpg")
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert record["protocol"] == "v3" and record["file_token"].startswith("file_")
    assert record["task_file"] == {"type": "jpg", "file_token": record["file_token"]}
    assert "bucket" not in record and "key" not in record
    assert stored(emulator, s3_server, record["file_token"]) == data


def test_v3_expired_url_gets_a_fresh_presign(v3, emulator, s3_server):
    """A presigned URL that has expired leads to a new presign and a successful PUT."""
    tmp_path, _ = v3
    emulator.inject(Fault("expired_credentials", endpoint=PRESIGN))
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert record["attempts"] == 2
    assert stored(emulator, s3_server, record["file_token"]) == data


def test_v3_rate_limit_1007_is_retried(v3, emulator):
    """429 with code 1007 (the v3 upload rate limit) is retried after Retry-After."""
    tmp_path, _ = v3
    emulator.inject(Fault("status", endpoint=PRESIGN, status=429, code=1007, retry_after="1"))
    (tmp_path / "a.png").write_bytes(png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr
    assert records_of(result.stdout)[0]["attempts"] == 2


def test_v3_401_is_auth_failure_whatever_the_body_code(v3, emulator, tmp_path):
    """A v3 401 (body code 2) is a refused key: exit 2, one request, nothing recorded failed."""
    write_key(tmp_path / "api-key", "tsk_not_valid")
    (tmp_path / "a.png").write_bytes(png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", tmp_path / "a.png")
    assert result.returncode == 2 and "API key was refused" in result.stderr
    assert len(emulator.records()) == 1


def test_v3_pacing_spreads_a_burst(v3, emulator):
    """api.max_uploads_per_minute spaces presign requests instead of hammering into 429s."""
    tmp_path, config = v3
    config(api={"max_uploads_per_minute": 240})  # one every 0.25 s
    files = []
    for n in range(5):
        path = tmp_path / f"p{n}.png"
        path.write_bytes(unique_png(700 + n))
        files.append(path)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", *files)
    assert result.returncode == 0, result.stderr
    times = [r.monotonic_time for r in emulator.records() if r.path == PRESIGN]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 5 and min(gaps) >= 0.2


def test_v3_daemon_uploads_dropped_files(v3, emulator, s3_server):
    """The watching daemon under v3 uploads every dropped file once, byte for byte."""
    tmp_path, config = v3
    config(watch={"settle_seconds": 0.1, "rescan_seconds": 0})
    payloads = {f"d{n}.png": unique_png(900 + n) for n in range(5)}
    with DaemonProcess(tmp_path / "cfg.toml", tmp_path / "daemon.log"):
        for name, data in payloads.items():
            (tmp_path / "inbox" / name).write_bytes(data)
        ledger = tmp_path / "state" / "ledger.jsonl"
        wait_for(lambda: len(read_ledger(ledger)) == 5)
    for record in read_ledger(ledger):
        assert record["status"] == "uploaded" and record["protocol"] == "v3"
        assert (
            stored(emulator, s3_server, record["file_token"]) == payloads[Path(record["path"]).name]
        )


def test_check_online_says_which_protocol_the_key_works_on(v3, emulator, tmp_path):
    """`check --online` calls each protocol's balance endpoint and reports which one works."""
    result = run_cli("check", "--config", tmp_path / "cfg.toml", "--online")
    assert result.returncode == 0, result.stderr
    assert "v3: works" in result.stderr and "v2-sts: works" in result.stderr
