"""`tripo-watchd upload` end to end: the real CLI, the emulator and moto's S3 over loopback."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    cli_env,
    glb_bytes,
    jpeg_bytes,
    png_bytes,
    read_ledger,
    records_of,
    run_cli,
    write_config,
    write_key,
)

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator


@pytest.fixture
def setup(tmp_path: Path, emulator: TripoEmulator, s3_server: S3Server, api_key: str):
    """A config and key file for the emulator; yields (tmp_path, ledger, reconfigure)."""
    key_file = write_key(tmp_path / "api-key", api_key)
    ledger = tmp_path / "state" / "ledger.jsonl"

    def config(**sections: dict) -> Path:
        return write_config(
            tmp_path / "cfg.toml",
            api_base_url=emulator.base_url,
            s3_endpoint_url=s3_server.endpoint_url,
            ledger=ledger,
            key_file=key_file,
            sections=sections,
        )

    config()
    return tmp_path, ledger, config


def put(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_png_lands_byte_identical_at_the_key_the_token_named(setup, emulator, s3_server):
    """An uploaded PNG is in S3 byte for byte at exactly the key its token named, and recorded."""
    tmp_path, ledger, _ = setup
    data = png_bytes(300, 300)
    path = put(tmp_path, "chair.png", data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    (token,) = emulator.tokens
    assert record["status"] == "uploaded"
    assert record["key"] == token.key and record["bucket"] == token.bucket == "tripo-data"
    assert record["uri"] == f"s3://tripo-data/{token.key}"
    assert record["task_file"] == {
        "type": "png",
        "object": {"bucket": "tripo-data", "key": token.key},
    }
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["size"] == len(data) and record["format"] == "png"
    assert record["trace_id"] == token.trace_id
    assert record["path"] == str(path)
    assert s3_server.object_bytes(token.key) == data
    assert read_ledger(ledger) == [record]


def test_jpg_is_sent_as_jpeg_and_recorded_as_task_type_jpg(setup, emulator):
    """A .jpg asks for an STS token of format jpeg and its task file says type jpg."""
    tmp_path, _, _ = setup
    path = put(tmp_path, "photo.JPG", jpeg_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert emulator.tokens[0].format == "jpeg"
    assert record["format"] == "jpeg" and record["task_file"]["type"] == "jpg"


def test_models_upload_and_multipart_for_big_files(setup, emulator, s3_server):
    """A GLB above the multipart threshold goes up in parts and arrives whole."""
    tmp_path, _, config = setup
    mib = 1024 * 1024
    config(s3={"multipart_threshold_bytes": 5 * mib, "multipart_chunk_bytes": 5 * mib})
    data = glb_bytes(12 * mib)
    path = put(tmp_path, "big.glb", data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert s3_server.object_bytes(record["key"]) == data


def test_rejected_file_spends_no_token_and_says_why(setup, emulator):
    """A file whose content does not match its name is rejected with a reason; no token is asked."""
    tmp_path, ledger, _ = setup
    path = put(tmp_path, "fake.png", b"PK\x03\x04" + b"\0" * 100)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 1
    (record,) = records_of(result.stdout)
    assert record["status"] == "rejected" and "ZIP" in record["reason"]
    assert emulator.token_count() == 0
    assert read_ledger(ledger)[0]["status"] == "rejected"


def test_wrong_key_is_a_clear_error_without_retry_storm(setup, emulator, tmp_path):
    """A refused API key stops with exit 2 and a clear message after a single token request."""
    write_key(tmp_path / "api-key", "tsk_wrong")
    path = put(tmp_path, "a.png", png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 2
    assert "API key was refused" in result.stderr
    assert len(emulator.records()) == 1
    assert not (tmp_path / "state" / "ledger.jsonl").exists() or not read_ledger(
        tmp_path / "state" / "ledger.jsonl"
    )


def test_missing_key_says_where_to_put_one(setup, tmp_path, emulator, s3_server):
    """With no API key anywhere, upload exits 2 and names the places a key can go."""
    write_config(
        tmp_path / "cfg.toml",
        api_base_url=emulator.base_url,
        s3_endpoint_url=s3_server.endpoint_url,
        ledger=tmp_path / "ledger.jsonl",
    )
    path = put(tmp_path, "a.png", png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 2
    assert "TRIPO_API_KEY" in result.stderr


@pytest.mark.parametrize(("status", "code"), [(403, 1005), (400, 1004), (403, 2010)])
def test_permanent_api_errors_are_not_retried(setup, emulator, status, code):
    """403/1005, 400/1004 and 2010 (credits) are recorded failed after exactly one request."""
    tmp_path, _, _ = setup
    emulator.inject(Fault("status", status=status, code=code))
    path = put(tmp_path, "a.png", png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 1
    (record,) = records_of(result.stdout)
    assert record["status"] == "failed" and record["retryable"] is False
    assert record["attempts"] == 1 and len(emulator.records()) == 1


def test_server_errors_and_rate_limits_are_retried_then_succeed(setup, emulator, s3_server):
    """5xx, code-in-200, malformed answers and 429 + Retry-After are retried until it works."""
    tmp_path, _, _ = setup
    emulator.inject(
        Fault("status", status=500, code=1000),
        Fault("code_in_200", code=1001),
        Fault("malformed"),
        Fault("status", status=429, code=1007, retry_after="1"),
    )
    data = png_bytes()
    path = put(tmp_path, "a.png", data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert record["attempts"] == 5
    assert s3_server.object_bytes(record["key"]) == data


def test_retries_give_up_as_failed_with_the_reason(setup, emulator):
    """When every attempt fails the file is recorded failed, retryable, with the last reason."""
    tmp_path, _, config = setup
    config(pipeline={"max_attempts": 2})
    emulator.inject(Fault("status", status=503, code=1001, count=5))
    path = put(tmp_path, "a.png", png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 1
    (record,) = records_of(result.stdout)
    assert record["status"] == "failed" and record["retryable"] is True
    assert "internal error" in record["reason"] and record["attempts"] == 2


def test_expired_credentials_fetch_a_new_token(setup, emulator, s3_server):
    """Credentials S3 refuses lead to a fresh token and a successful upload to the new key."""
    tmp_path, _, _ = setup
    emulator.inject(Fault("expired_credentials"))
    data = png_bytes()
    path = put(tmp_path, "a.png", data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    assert emulator.token_count() == 2 and record["attempts"] == 2
    assert record["key"] == emulator.tokens[1].key
    assert s3_server.object_bytes(record["key"]) == data


def test_same_content_twice_is_recorded_as_duplicate_not_resent(setup, emulator):
    """With content dedupe a second copy of an uploaded file points at the first key; no token."""
    tmp_path, _, _ = setup
    data = png_bytes()
    first = put(tmp_path, "a.png", data)
    second = put(tmp_path, "b.png", data)
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", first, second)
    assert result.returncode == 0, result.stderr
    one, two = records_of(result.stdout)
    assert two["duplicate_of"] == str(first) and two["key"] == one["key"]
    assert emulator.token_count() == 1


def test_torn_ledger_line_is_survived(setup):
    """A ledger whose last line was torn by a crash still opens, and new records append cleanly."""
    tmp_path, ledger, _ = setup
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text('{"path": "/x.png", "status": "uploaded"}\n{"path": "/y.png", "sta')
    path = put(tmp_path, "a.png", png_bytes())
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", path)
    assert result.returncode == 0, result.stderr
    statuses = [r["status"] for r in read_ledger(ledger)]
    assert statuses == ["uploaded", "uploaded"]


def test_no_secret_reaches_output_or_ledger(setup, emulator, api_key):
    """API key, STS secret and session token appear in no log line, no stdout and no ledger byte."""
    tmp_path, ledger, _ = setup
    emulator.inject(Fault("expired_credentials"), Fault("status", status=500, code=1000))
    files = [put(tmp_path, f"{n}.png", png_bytes(40 + n, 40)) for n in range(3)]
    result = run_cli(
        "--log-level",
        "debug",
        "upload",
        "--config",
        tmp_path / "cfg.toml",
        *files,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr
    everything = result.stdout + result.stderr + ledger.read_text()
    secrets = (
        [api_key] + [t.sts_sk for t in emulator.tokens] + [t.session_token for t in emulator.tokens]
    )
    assert len(secrets) >= 5
    for secret in secrets:
        assert secret not in everything


def test_accelerate_auto_uses_the_accelerate_endpoint_for_big_files(setup, emulator, s3_server):
    """With accelerate = auto, only files over 100 KiB go through the accelerate endpoint."""
    tmp_path, _, config = setup
    accelerate = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    config(s3={"accelerate": "auto", "accelerate_endpoint_url": accelerate})
    small = put(tmp_path, "small.glb", glb_bytes(10 * 1024))
    big = put(tmp_path, "big.glb", glb_bytes(300 * 1024))
    result = run_cli("upload", "--config", tmp_path / "cfg.toml", small, big)
    assert result.returncode == 0, result.stderr
    one, two = records_of(result.stdout)
    assert one["endpoint"] == s3_server.endpoint_url
    assert two["endpoint"] == accelerate


def test_check_reports_bad_config_with_key_and_exit_2(tmp_path):
    """`check` names the file, the key and what is allowed, and exits 2."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[s3]\naccelerate = "sometimes"\n')
    result = run_cli("check", "--config", cfg)
    assert result.returncode == 2
    assert "s3.accelerate" in result.stderr and "always" in result.stderr


def test_ledger_command_filters_by_status(setup):
    """`ledger --status rejected` prints only the rejected records."""
    tmp_path, _, _ = setup
    good = put(tmp_path, "a.png", png_bytes())
    bad = put(tmp_path, "b.xyz", b"hello")
    run_cli("upload", "--config", tmp_path / "cfg.toml", good, bad)
    result = run_cli("ledger", "--config", tmp_path / "cfg.toml", "--status", "rejected")
    assert result.returncode == 0
    (record,) = records_of(result.stdout)
    assert record["path"] == str(bad)


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pty")
def test_upload_on_a_terminal_draws_a_progress_bar(setup, emulator):
    """On a TTY, `upload` shows a progress line per file that reaches 100 %."""
    tmp_path, _, _ = setup
    path = put(tmp_path, "big.glb", glb_bytes(3 * 1024 * 1024))
    command = shlex.join(
        [
            sys.executable,
            "-m",
            "tripo_watchd.cli",
            "upload",
            "--config",
            str(tmp_path / "cfg.toml"),
            str(path),
        ]
    )
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stdout
    assert "big.glb [" in result.stdout and "100.0%" in result.stdout
