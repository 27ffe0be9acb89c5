"""Security promises: key file modes, https only, no way to switch TLS checks off, no secret
in any output, no escape through symlinks, and TLS verified end to end against a private CA."""

from __future__ import annotations

import dataclasses
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    DaemonProcess,
    cli_env,
    glb_bytes,
    read_ledger,
    records_of,
    run_cli,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd import settings as settings_module
from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator

trustme = pytest.importorskip("trustme")


def _config(tmp: Path, api_url: str, s3_url: str, key_file: Path | None, **sections: dict) -> Path:
    return write_config(
        tmp / "cfg.toml",
        api_base_url=api_url,
        s3_endpoint_url=s3_url,
        ledger=tmp / "state" / "ledger.jsonl",
        key_file=key_file,
        watch=[tmp / "inbox"],
        sections=sections,
    )


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path, command):
    """An API key file other users can read is refused, and the message says to chmod 600 it."""
    key_file = write_key(tmp_path / "api-key", "tsk_mode_test_0123456789")
    key_file.chmod(0o644)
    (tmp_path / "inbox").mkdir()
    config = _config(tmp_path, "http://127.0.0.1:9/v2/openapi", "http://127.0.0.1:9", key_file)
    result = run_cli(command, "--config", config, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"chmod 600 {key_file}" in result.stderr
    assert "tsk_mode_test_0123456789" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("api", "s3", "key"),
    [
        ("http://api.tripo3d.ai/v2/openapi", "http://127.0.0.1:9", "api.base_url"),
        ("https://api.tripo3d.ai/v2/openapi", "http://10.1.2.3:9000", "s3.endpoint_url"),
    ],
)
def test_plain_http_to_a_remote_host_is_refused_by_check(tmp_path, api, s3, key):
    """`check` refuses http:// to a non-loopback host, naming the key and asking for https://."""
    result = run_cli("check", "--config", _config(tmp_path, api, s3, None), timeout=30)
    assert result.returncode == 2
    assert key in result.stderr and "https://" in result.stderr


_TLS_OFF = re.compile(r"verify|insecure_tls|no_tls|tls_insecure|skip_cert|ssl|cert_check", re.I)


def test_no_setting_turns_tls_verification_off():
    """No configuration key exists that disables TLS certificate verification."""
    offending = [
        f"{cls.__name__}.{f.name}"
        for cls in vars(settings_module).values()
        if dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls)
        if _TLS_OFF.search(f.name)
    ]
    assert offending == []


@pytest.mark.parametrize("section", ["api", "s3"])
def test_a_verify_false_key_is_rejected_as_unknown(tmp_path, section):
    """Writing `verify = false` in [api] or [s3] is an unknown-key error, not silently insecure."""
    config = _config(
        tmp_path,
        "https://api.tripo3d.ai/v2/openapi",
        "https://s3.example.com",
        None,
        **{section: {"verify": False}},
    )
    result = run_cli("check", "--config", config, timeout=30)
    assert result.returncode == 2 and f"{section}.verify" in result.stderr


# --- no secret anywhere -----------------------------------------------------------------------


class _Daemon(DaemonProcess):
    """The daemon with stdout kept in a file too, so every byte it writes can be searched."""

    def spawn(self, stderr: Any) -> subprocess.Popen[bytes]:
        with open(self.log.with_suffix(".stdout"), "ab") as stdout:
            return subprocess.Popen(self.command(), stdout=stdout, stderr=stderr, env=self.env)


def test_no_secret_reaches_logs_ledger_or_status(tmp_path, emulator, s3_server, api_key):
    """After uploads, a 401 and expired credentials, no key or STS secret is in any output."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    key_file = write_key(tmp_path / "api-key", api_key)
    config = _config(
        tmp_path,
        emulator.base_url,
        s3_server.endpoint_url,
        key_file,
        watch={"settle_seconds": 0.2, "rescan_seconds": 0},
        workers={"count": 2},
    )
    (outside / "private.png").write_bytes(unique_png(61))
    (inbox / "link-out.png").symlink_to(outside / "private.png")
    emulator.inject(Fault("status", status=401, code=1002, message="authentication failed"))
    with _Daemon(config, tmp_path / "daemon.log") as daemon:
        (inbox / "first.png").write_bytes(unique_png(62))
        wait_for(lambda: daemon.events("auth.failed"))
        emulator.inject(Fault("expired_credentials"))
        (inbox / "second.png").write_bytes(unique_png(63))
        (inbox / "model.glb").write_bytes(glb_bytes(4096))
        (inbox / "third.png").write_bytes(unique_png(64))
        ledger = tmp_path / "state" / "ledger.jsonl"
        wait_for(lambda: len([r for r in read_ledger(ledger) if r["status"] == "uploaded"]) >= 4)
        status = tmp_path / "state" / "status.json"
        wait_for(lambda: status.exists() and '"uploaded": 4' in status.read_text(), timeout=10)
    assert any(not t.valid for t in emulator.tokens), "the expired-credentials fault never fired"
    secrets = {"api key": api_key}
    for n, token in enumerate(emulator.tokens):
        secrets[f"sts_sk #{n}"] = token.sts_sk
        secrets[f"session_token #{n}"] = token.session_token
    assert all(len(v) >= 8 for v in secrets.values()), "emulator tokens lack sts_sk/session_token"
    outputs = [p for p in (tmp_path / "state").iterdir() if p.is_file()]
    outputs += [tmp_path / "daemon.log", tmp_path / "daemon.stdout"]
    for output in outputs:
        data = output.read_bytes()
        for what, value in secrets.items():
            assert value.encode() not in data, f"{what} found in {output.name}"
    uploaded = [r["path"] for r in read_ledger(ledger) if r["status"] == "uploaded"]
    assert str(inbox / "link-out.png") not in uploaded


# --- TLS end to end -----------------------------------------------------------------------------


class Tls:
    """A private CA, an https S3 and an https emulator that trust only that CA."""

    def __init__(self, ca_file: Path, s3: S3Server, emulator: TripoEmulator, api_key: str):
        self.ca_file = ca_file
        self.s3 = s3
        self.emulator = emulator
        self.api_key = api_key


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    base = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = base / "cert.pem", base / "key.pem", base / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    api_key = "tsk_tls_0123456789abcdef"
    s3 = S3Server(base, tls_cert=cert_file, tls_key=key_file, ca_bundle=ca_file)
    with s3, TripoEmulator(s3, api_keys=[api_key], ssl_context=context) as emulator:
        yield Tls(ca_file, s3, emulator, api_key)


# The CA variables many systems export (Debian/Nix containers, corporate machines).
_CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE")
_SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _upload_over_tls(
    tmp: Path, tls: Tls, api_ca: bool, s3_ca: bool, ca_env: str | None = None
) -> dict[str, Any]:
    """`tripo-watchd upload` of one image; `ca_env` sets the usual CA variables to that bundle."""
    (tmp / "inbox").mkdir()
    api: dict[str, Any] = {"ca_bundle": tls.ca_file} if api_ca else {}
    s3: dict[str, Any] = {"ca_bundle": tls.ca_file} if s3_ca else {}
    config = _config(
        tmp,
        tls.emulator.base_url,
        tls.s3.endpoint_url,
        write_key(tmp / "api-key", tls.api_key),
        api=api,
        s3=s3,
        pipeline={"max_attempts": 1},
    )
    image = tmp / "inbox" / "tls.png"
    image.write_bytes(unique_png(71 + 2 * api_ca + s3_ca + 4 * bool(ca_env)))
    env = {k: v for k, v in cli_env().items() if k not in _CA_ENV}
    if ca_env is not None:
        env.update(dict.fromkeys(_CA_ENV, ca_env))
    result = run_cli("upload", "--config", config, image, env=env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    (record,) = records_of(result.stdout)
    return record


def test_upload_works_over_tls_with_the_ca_bundle(tmp_path, tls):
    """With api.ca_bundle and s3.ca_bundle naming the private CA, the upload succeeds over https."""
    assert tls.emulator.base_url.startswith("https://")
    assert tls.s3.endpoint_url.startswith("https://")
    record = _upload_over_tls(tmp_path, tls, api_ca=True, s3_ca=True)
    assert record["status"] == "uploaded", record
    assert tls.s3.object_bytes(record["key"]) == (tmp_path / "inbox" / "tls.png").read_bytes()


def test_configured_ca_bundle_wins_over_ca_environment_variables(tmp_path, tls):
    """api/s3.ca_bundle are used even when REQUESTS_CA_BUNDLE etc. name the system bundle."""
    if not Path(_SYSTEM_BUNDLE).exists():
        pytest.skip(f"no system CA bundle at {_SYSTEM_BUNDLE}")
    record = _upload_over_tls(tmp_path, tls, api_ca=True, s3_ca=True, ca_env=_SYSTEM_BUNDLE)
    assert record["status"] == "uploaded", record


_UNTRUSTED = pytest.mark.parametrize(
    ("api_ca", "s3_ca"), [(False, True), (True, False)], ids=["api", "s3"]
)


@_UNTRUSTED
def test_untrusted_certificate_fails_the_upload_without_sending(tmp_path, tls, api_ca, s3_ca):
    """Without the CA bundle the upload is recorded failed (no crash) and nothing is stored."""
    before = set(tls.s3.list_keys())
    record = _upload_over_tls(tmp_path, tls, api_ca=api_ca, s3_ca=s3_ca)
    assert record["status"] == "failed", record
    assert set(tls.s3.list_keys()) == before


@_UNTRUSTED
def test_untrusted_certificate_reason_says_what_to_fix(tmp_path, tls, api_ca, s3_ca):
    """The failure reason says the certificate is not trusted and names the ca_bundle key."""
    record = _upload_over_tls(tmp_path, tls, api_ca=api_ca, s3_ca=s3_ca)
    reason = record["reason"].lower()
    assert "certificate" in reason, record
    assert ("api.ca_bundle" if not api_ca else "s3.ca_bundle") in reason, record
