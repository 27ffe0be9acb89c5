"""Hostile and broken input: one unprivileged daemon receives many bad files at once.

Every bad file must end as a `rejected` record with a reason a person understands (or, for
things that are not files at all, no record), every good file next to them must still be
uploaded, and the daemon must stay alive. The daemon runs without root's power to
override file permissions, so a mode-000 file is really unreadable to it.

The 50,000-files-in-one-directory case from the issue is scaled down to 5,000 duplicates to
keep the suite fast; the same code paths (catch-up scan, bounded queue, dedupe) are exercised.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import (
    DaemonProcess,
    cli_env,
    jpeg_bytes,
    png_bytes,
    read_ledger,
    unique_png,
    wait_for,
    write_config,
)

from tripo_watchd.sandbox import S3Server, TripoEmulator

MANY = 5_000
DEEP = 110


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_override() -> None:
    """In the child before exec: give up root's power to ignore file permissions.

    Dropping the capabilities from the bounding set means the exec'd interpreter never holds
    them, so a mode-000 file is unreadable although the uid stays 0 (the interpreter lives
    under /root, which `nobody` cannot reach).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_override() -> bool:
    """True if a child started with `_drop_file_override` cannot read a mode-000 file."""
    with tempfile.NamedTemporaryFile(dir="/tmp") as sealed:
        os.chmod(sealed.name, 0)
        try:
            probe = subprocess.run(
                [sys.executable, "-c", f"open({sealed.name!r}).read()"],
                preexec_fn=_drop_file_override if os.geteuid() == 0 else None,
                capture_output=True,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode != 0


class UnprivilegedDaemon(DaemonProcess):
    """The daemon subprocess without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH."""

    def spawn(self, stderr: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=self.env,
            preexec_fn=_drop_file_override if os.geteuid() == 0 else None,
        )


@dataclass
class Outcome:
    """What one daemon run did with the hostile inbox."""

    inbox: Path
    outside: Path
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    alive: bool
    exit_code: int
    tokens: int
    contents: dict[str, bytes] = field(default_factory=dict)

    def by_path(self, path: Path | bytes) -> list[dict[str, Any]]:
        raw = os.fsencode(path)
        return [r for r in self.records if os.fsencode(r["path"]) == raw]

    def one(self, path: Path | bytes) -> dict[str, Any]:
        (record,) = self.by_path(path)
        return record


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _webp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "WEBP")
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    return b"PK\x03\x04" + b"\x14\x00" * 13 + b"payload" * 20


def _elf_bytes() -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + struct.pack("<HH", 2, 62) + b"\x00" * 200


def _sparse(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


DEEP_PARTS = ["d"] * DEEP
WEIRD_NAMES: list[bytes] = [
    b"new\nline.png",
    b"quote\"and'apostrophe.png",
    b"with some spaces.png",
    b"bad\xffbyte.png",
    b"n" * 251 + b".png",
]


@pytest.fixture(scope="module")
def outcome(s3_server: S3Server) -> Iterator[Outcome]:
    if not _can_drop_override():
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so a mode-000 file stays readable")
    api_key = "tsk_hostile_" + secrets.token_hex(8)
    base = Path(tempfile.mkdtemp(prefix="tripo-hostile-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with TripoEmulator(s3_server, api_keys=[api_key]) as emulator:
            yield _run(base, emulator, s3_server, api_key)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(base: Path, emulator: TripoEmulator, s3: S3Server, api_key: str) -> Outcome:
    inbox, outside, state = base / "inbox", base / "outside", base / "state"
    for d in (inbox, outside, state):
        d.mkdir()
        d.chmod(0o755)
    key_file = base / "api-key"
    key_file.write_text(api_key + "\n")
    key_file.chmod(0o600)
    ledger = state / "ledger.jsonl"
    config = write_config(
        base / "cfg.toml",
        api_base_url=emulator.base_url,
        s3_endpoint_url=s3.endpoint_url,
        ledger=ledger,
        key_file=key_file,
        watch=[inbox],
        sections={"watch": {"settle_seconds": 0.2, "rescan_seconds": 0}, "workers": {"count": 4}},
    )
    config.chmod(0o644)
    contents: dict[str, bytes] = {}

    # Present before start: found by the catch-up scan.
    many = inbox / "many"
    many.mkdir()
    same = unique_png(424242)
    for n in range(MANY):
        (many / f"m{n:05d}.png").write_bytes(same)
    deep = inbox.joinpath(*DEEP_PARTS)
    deep.mkdir(parents=True)
    (deep / "deep.png").write_bytes(unique_png(7001))
    _sparse(inbox / "huge.glb", b"glTF" + struct.pack("<II", 2, 2 * 1024**3), 2 * 1024**3)
    _sparse(inbox / "big.png", png_bytes(64, 64)[:64], 30 * 1024 * 1024)
    (inbox / "x.glb").mkdir()
    (inbox / "x.glb" / "inside-dir.png").write_bytes(unique_png(7002))

    daemon = UnprivilegedDaemon(config, base / "daemon.log", env=cli_env()).start()
    try:
        # Arriving while watched: noticed by events.
        (inbox / "empty.png").write_bytes(b"")
        (inbox / "trunc.png").write_bytes(_truncated(png_bytes(80, 80)))
        (inbox / "trunc.jpg").write_bytes(_truncated(jpeg_bytes(80, 80)))
        (inbox / "trunc.webp").write_bytes(_truncated(_webp_bytes()))
        (inbox / "wide.png").write_bytes(png_bytes(12000, 800))
        (inbox / "tiny.png").write_bytes(png_bytes(10, 10))
        (inbox / "zip.png").write_bytes(_zip_bytes())
        (inbox / "elf.png").write_bytes(_elf_bytes())
        (inbox / "notes.xyz").write_bytes(b"what is this")
        locked = inbox / "locked.png"
        locked.write_bytes(unique_png(7003))
        locked.chmod(0o000)
        (outside / "secret.png").write_bytes(unique_png(7004))
        contents["secret.png"] = (outside / "secret.png").read_bytes()
        (inbox / "passwd.png").symlink_to("/etc/passwd")
        (inbox / "escape.png").symlink_to(outside / "secret.png")
        for n in range(40):
            racer = inbox / f"race{n:02d}.png"
            racer.write_bytes(unique_png(8000 + n))
            racer.unlink()
        os.mkfifo(inbox / "x.png")
        (inbox / "after-fifo.png").write_bytes(unique_png(7005))
        for n, name in enumerate(WEIRD_NAMES):
            data = unique_png(9000 + n)
            with open(os.path.join(os.fsencode(inbox), name), "wb") as f:
                f.write(data)
            contents[os.fsdecode(name)] = data

        expected = [
            *(many / f"m{n:05d}.png" for n in range(MANY)),
            deep / "deep.png",
            inbox / "huge.glb",
            inbox / "big.png",
            inbox / "x.glb" / "inside-dir.png",
            *(inbox / name for name in ("empty.png", "trunc.png", "trunc.jpg", "trunc.webp")),
            *(inbox / name for name in ("wide.png", "tiny.png", "zip.png", "elf.png")),
            inbox / "notes.xyz",
            locked,
            inbox / "after-fifo.png",
            inbox / "x.png",
            inbox / "passwd.png",
            inbox / "escape.png",
            *(os.path.join(os.fsencode(inbox), name) for name in WEIRD_NAMES),
        ]
        wanted = {os.fsencode(p) for p in expected}

        def all_recorded() -> bool:
            seen = {os.fsencode(r["path"]) for r in read_ledger(ledger)}
            return wanted <= seen

        wait_for(all_recorded, timeout=90)
        alive = daemon.proc is not None and daemon.proc.poll() is None
    finally:
        exit_code = daemon.stop()
    return Outcome(
        inbox=inbox,
        outside=outside,
        records=read_ledger(ledger),
        events=daemon.events(),
        alive=alive,
        exit_code=exit_code,
        tokens=emulator.token_count(),
        contents=contents,
    )


def _rejected_because(outcome: Outcome, path: Path, *words: str) -> None:
    record = outcome.one(path)
    assert record["status"] == "rejected", record
    for word in words:
        assert word.lower() in record["reason"].lower(), record


def test_daemon_survives_everything(outcome):
    """After all the hostile input the daemon is still running, never crashed, and exits 0."""
    assert outcome.alive
    assert outcome.exit_code == 0
    assert not [e for e in outcome.events if e["event"] in ("file.crashed", "watch.tick_failed")]


def test_empty_file_is_rejected(outcome):
    """An empty file is rejected as empty."""
    _rejected_because(outcome, outcome.inbox / "empty.png", "empty")


@pytest.mark.parametrize("name", ["trunc.png", "trunc.jpg", "trunc.webp"])
def test_truncated_images_are_rejected(outcome, name):
    """A PNG, JPEG or WebP cut in half is rejected as truncated or corrupt."""
    _rejected_because(outcome, outcome.inbox / name, "truncated or corrupt")


@pytest.mark.parametrize("name", ["wide.png", "tiny.png"])
def test_images_outside_the_pixel_limits_are_rejected(outcome, name):
    """An image of 12000 x 800 or 10 x 10 px is rejected naming its size and the allowed range."""
    _rejected_because(outcome, outcome.inbox / name, " px")


def test_oversized_image_is_rejected_by_the_cap(outcome):
    """A 30 MB PNG is rejected by the image size cap, naming the cap."""
    _rejected_because(outcome, outcome.inbox / "big.png", "at most", "MB")


def test_sparse_2gb_model_is_rejected_by_the_cap(outcome):
    """A 2 GB sparse .glb is rejected by the model size cap instead of being read or sent."""
    _rejected_because(outcome, outcome.inbox / "huge.glb", "at most")


@pytest.mark.parametrize(("name", "what"), [("zip.png", "ZIP"), ("elf.png", "ELF")])
def test_disguised_files_are_rejected_naming_their_real_content(outcome, name, what):
    """A .png that is really a ZIP or an ELF binary is rejected saying what it really is."""
    _rejected_because(outcome, outcome.inbox / name, what)


def test_unknown_extension_is_rejected(outcome):
    """A file with an extension Tripo does not take is rejected naming the extension."""
    _rejected_because(outcome, outcome.inbox / "notes.xyz", ".xyz", "not accepted")


def test_unreadable_file_is_rejected(outcome):
    """A mode-000 file the daemon cannot read is rejected with 'permission denied'."""
    _rejected_because(outcome, outcome.inbox / "locked.png", "permission denied")


def test_files_deleted_before_upload_are_never_uploaded(outcome):
    """Files deleted right after they appear get no record or a rejection saying they are gone."""
    for n in range(40):
        for record in outcome.by_path(outcome.inbox / f"race{n:02d}.png"):
            assert record["status"] == "rejected" and "deleted" in record["reason"], record


def test_fifo_does_not_hang_a_worker(outcome):
    """A FIFO named x.png is rejected once, saying it is a FIFO; a good file after it uploads."""
    record = outcome.one(outcome.inbox / "x.png")
    assert record["status"] == "rejected" and "FIFO" in record["reason"], record
    assert outcome.one(outcome.inbox / "after-fifo.png")["status"] == "uploaded"


def test_directory_named_like_a_model_is_not_a_file(outcome):
    """A directory named x.glb gets no record itself, and a file inside it is uploaded."""
    assert outcome.by_path(outcome.inbox / "x.glb") == []
    assert outcome.one(outcome.inbox / "x.glb" / "inside-dir.png")["status"] == "uploaded"


@pytest.mark.parametrize("name", ["passwd.png", "escape.png"])
def test_symlinks_out_of_the_root_are_never_uploaded(outcome, name):
    """A symlink to /etc/passwd or out of the watched folder is rejected, saying so, never sent."""
    record = outcome.one(outcome.inbox / name)
    assert record["status"] == "rejected" and "outside the watched folders" in record["reason"]
    secret_sha = hashlib.sha256(outcome.contents["secret.png"]).hexdigest()
    assert not [r for r in outcome.records if r.get("sha256") == secret_sha]


@pytest.mark.parametrize(
    "name", WEIRD_NAMES, ids=["newline", "quotes", "spaces", "non-utf8", "255-bytes"]
)
def test_odd_names_are_uploaded_and_round_trip(outcome, name):
    """Names with newlines, quotes, spaces, non-UTF-8 bytes or 255 bytes upload, path intact."""
    real = os.path.join(os.fsencode(outcome.inbox), name)
    record = outcome.one(real)
    assert record["status"] == "uploaded", record
    assert os.fsencode(record["path"]) == real
    assert record["sha256"] == hashlib.sha256(outcome.contents[os.fsdecode(name)]).hexdigest()


def test_path_deeper_than_100_directories_is_uploaded(outcome):
    """A file 110 directories deep is uploaded with its full path recorded."""
    record = outcome.one(outcome.inbox.joinpath(*DEEP_PARTS, "deep.png"))
    assert record["status"] == "uploaded", record


def test_thousands_of_files_in_one_directory_each_get_one_record(outcome):
    """5,000 identical files in one folder each get exactly one uploaded record, mostly dedupes."""
    many = [r for r in outcome.records if "/many/" in r["path"]]
    paths = [r["path"] for r in many]
    assert len(paths) == len(set(paths)) == MANY
    assert {r["status"] for r in many} == {"uploaded"}
    assert sum(1 for r in many if not r.get("duplicate_of")) <= 4  # at most one per worker
