"""`tripo-watchd run` end to end: every file that lands in a watched folder is uploaded once."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from support import (
    DaemonProcess,
    glb_bytes,
    png_bytes,
    read_ledger,
    unique_png,
    wait_for,
    write_config,
    write_key,
)

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator


class Farm:
    """A watched inbox, its config and ledger, and a way to start the daemon on them."""

    def __init__(
        self,
        tmp_path: Path,
        emulator: TripoEmulator,
        s3: S3Server,
        api_key: str,
        protocol: str = "v2-sts",
    ):
        self.protocol = protocol
        self.tmp = tmp_path
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        self.ledger = tmp_path / "state" / "ledger.jsonl"
        self.key_file = write_key(tmp_path / "api-key", api_key)
        self.emulator = emulator
        self.s3 = s3
        self.configure()

    def configure(self, **sections: dict) -> Path:
        merged = {
            "api": {"protocol": self.protocol},
            "watch": {"settle_seconds": 0.2, "rescan_seconds": 0},
            "workers": {"count": 4},
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        return write_config(
            self.tmp / "cfg.toml",
            api_base_url=(
                self.emulator.v3_base_url if self.protocol == "v3" else self.emulator.base_url
            ),
            s3_endpoint_url=self.s3.endpoint_url,
            ledger=self.ledger,
            key_file=self.key_file,
            watch=[self.inbox],
            sections=merged,
        )

    def daemon(self, *args: str) -> DaemonProcess:
        return DaemonProcess(self.tmp / "cfg.toml", self.tmp / "daemon.log", *args)

    def stored(self, record: dict) -> bytes:
        """The bytes S3 holds for a record, whichever protocol wrote it."""
        if record.get("protocol") == "v3":
            bucket, key = self.emulator.file_tokens[record["file_token"]]
            return self.s3.object_bytes(key, bucket)
        return self.s3.object_bytes(record["key"])

    def grants(self) -> int:
        """Upload grants the API handed out: STS tokens (v2) or presigned URLs (v3)."""
        if self.protocol == "v3":
            return len(self.emulator.file_tokens)
        return self.emulator.token_count()

    def records(self, status: str | None = None) -> list[dict]:
        return [r for r in read_ledger(self.ledger) if status is None or r["status"] == status]

    def uploaded_paths(self) -> list[str]:
        return [r["path"] for r in self.records("uploaded")]

    def wait_uploaded(self, count: int, timeout: float = 30) -> list[dict]:
        wait_for(lambda: len(self.records("uploaded")) >= count, timeout=timeout)
        return self.records("uploaded")


@pytest.fixture
def farm(tmp_path, emulator, s3_server, api_key) -> Farm:
    return Farm(tmp_path, emulator, s3_server, api_key)


both_protocols = pytest.mark.parametrize("protocol", ["v2-sts", "v3"])


@pytest.fixture
def any_farm(tmp_path, emulator, s3_server, api_key, protocol) -> Farm:
    """A farm on the protocol the test is parametrised with."""
    return Farm(tmp_path, emulator, s3_server, api_key, protocol)


@both_protocols
def test_file_created_in_place_is_uploaded_once(any_farm):
    """A PNG written into the inbox reaches S3 byte for byte, recorded once."""
    with any_farm.daemon():
        data = png_bytes(100, 100)
        (any_farm.inbox / "a.png").write_bytes(data)
        (record,) = any_farm.wait_uploaded(1)
        assert any_farm.stored(record) == data
    assert len(any_farm.records()) == 1 and any_farm.grants() == 1


def test_slow_writer_is_uploaded_once_complete(farm):
    """A file written over ~5 s by a writer that keeps it open is uploaded once, whole."""
    data = glb_bytes(200_000)
    with farm.daemon():
        with open(farm.inbox / "slow.glb", "wb") as sink:
            for n in range(10):
                sink.write(data[n * 20_000 : (n + 1) * 20_000])
                sink.flush()
                time.sleep(0.5)  # the writer's pace, not synchronisation
            sink.write(data[200_000:])
        (record,) = farm.wait_uploaded(1)
        assert farm.stored(record) == data
        assert farm.emulator.token_count() == 1


@both_protocols
def test_renamed_into_place_and_moved_in_and_nested_dirs(any_farm, tmp_path):
    """Rename from .part, a move from outside, mkdir -p + write, and a moved-in tree all arrive."""
    outside = tmp_path / "outside"
    (outside / "tree" / "deeper").mkdir(parents=True)
    for n in range(5):
        (outside / "tree" / "deeper" / f"t{n}.png").write_bytes(unique_png(1000 + n))
    (outside / "moved.png").write_bytes(unique_png(2000))
    with any_farm.daemon():
        part = any_farm.inbox / "download.png.part"
        part.write_bytes(unique_png(3000))
        part.rename(any_farm.inbox / "download.png")
        shutil.move(str(outside / "moved.png"), any_farm.inbox / "moved.png")
        nested = any_farm.inbox / "a" / "b"
        nested.mkdir(parents=True)
        (nested / "n.png").write_bytes(unique_png(4000))
        shutil.move(str(outside / "tree"), any_farm.inbox / "tree")
        any_farm.wait_uploaded(8)
    names = sorted(Path(p).name for p in any_farm.uploaded_paths())
    assert names == sorted(["download.png", "moved.png", "n.png"] + [f"t{n}.png" for n in range(5)])
    assert not [r for r in any_farm.records() if r["path"].endswith(".part")]


def test_ignored_names_are_never_uploaded(farm):
    """Temp, partial and hidden files are ignored; a real file next to them is uploaded."""
    with farm.daemon():
        for name in ("x.tmp", "y.png.part", ".hidden.png", "z.crdownload", "backup.png~"):
            (farm.inbox / name).write_bytes(unique_png(len(name)))
        (farm.inbox / ".git").mkdir()
        (farm.inbox / ".git" / "obj.png").write_bytes(unique_png(77))
        (farm.inbox / "real.png").write_bytes(unique_png(99))
        farm.wait_uploaded(1)
    assert [Path(r["path"]).name for r in farm.records()] == ["real.png"]


@both_protocols
def test_modified_after_upload_is_uploaded_again(any_farm):
    """A file changed after its upload is uploaded again with its new content."""
    path = any_farm.inbox / "a.png"
    with any_farm.daemon():
        path.write_bytes(unique_png(1))
        any_farm.wait_uploaded(1)
        path.write_bytes(unique_png(2, 40, 40))
        second = any_farm.wait_uploaded(2)[1]
        assert any_farm.stored(second) == path.read_bytes()


@both_protocols
def test_catch_up_uploads_what_arrived_while_down_and_skips_what_is_done(any_farm):
    """Files that arrived while the daemon was stopped are uploaded at start; done ones are not."""
    (any_farm.inbox / "first.png").write_bytes(unique_png(1))
    with any_farm.daemon():
        any_farm.wait_uploaded(1)
    (any_farm.inbox / "second.png").write_bytes(unique_png(2))
    (any_farm.inbox / "sub").mkdir()
    (any_farm.inbox / "sub" / "third.glb").write_bytes(glb_bytes())
    with any_farm.daemon():
        any_farm.wait_uploaded(3)
    assert any_farm.grants() == 3
    assert len(any_farm.records()) == 3


def test_poll_mode_and_rescan_find_files_without_events(farm):
    """In polling mode a new file is found by the periodic scan and uploaded."""
    farm.configure(watch={"mode": "poll", "poll_seconds": 0.3})
    with farm.daemon() as daemon:
        (farm.inbox / "nfs.png").write_bytes(unique_png(5))
        farm.wait_uploaded(1)
        assert "poll" in str(daemon.events("daemon.started")[0]["modes"])


@both_protocols
def test_content_dedupe_records_a_pointer_to_the_first_upload(any_farm):
    """A second copy of already-uploaded content is recorded as a duplicate, not sent again."""
    data = unique_png(42)
    with any_farm.daemon():
        (any_farm.inbox / "one.png").write_bytes(data)
        any_farm.wait_uploaded(1)
        (any_farm.inbox / "two.png").write_bytes(data)
        one, two = any_farm.wait_uploaded(2)
    assert two["duplicate_of"] == one["path"]
    assert two.get("key") == one.get("key") and two.get("file_token") == one.get("file_token")
    assert any_farm.grants() == 1


def test_after_upload_move_never_overwrites(farm, tmp_path):
    """after_upload = move puts the file in done_dir after its record; clashes get a new name."""
    done = tmp_path / "done"
    done.mkdir()
    (done / "a.png").write_bytes(b"older file, must survive")
    farm.configure(pipeline={"after_upload": "move", "done_dir": str(done)})
    with farm.daemon():
        (farm.inbox / "a.png").write_bytes(unique_png(3))
        farm.wait_uploaded(1)
        wait_for(lambda: (done / "a-1.png").exists() and not (farm.inbox / "a.png").exists())
    assert (done / "a.png").read_bytes() == b"older file, must survive"


def test_a_recorded_file_left_in_the_inbox_is_moved_at_the_next_start(farm, tmp_path):
    """A file recorded but not yet moved when the daemon stopped is moved at the next start,
    without a new token or record (as after a SIGKILL between the record and the move)."""
    with farm.daemon():
        (farm.inbox / "a.png").write_bytes(unique_png(11))
        (farm.inbox / "empty.png").write_bytes(b"")
        farm.wait_uploaded(1)
        wait_for(lambda: len(farm.records("rejected")) == 1)
    done, rejected = tmp_path / "done", tmp_path / "rejected"
    farm.configure(
        pipeline={"after_upload": "move", "done_dir": str(done), "rejected_dir": str(rejected)}
    )
    with farm.daemon() as daemon:
        wait_for(lambda: (done / "a.png").exists() and (rejected / "empty.png").exists())
        assert len(daemon.events("file.after_upload_resumed")) == 2
    assert not (farm.inbox / "a.png").exists() and not (farm.inbox / "empty.png").exists()
    assert farm.grants() == 1 and len(farm.records()) == 2


def test_after_upload_delete_removes_the_file(farm):
    """after_upload = delete removes the file once its upload is recorded."""
    farm.configure(pipeline={"after_upload": "delete"})
    with farm.daemon():
        (farm.inbox / "gone.png").write_bytes(unique_png(4))
        farm.wait_uploaded(1)
        wait_for(lambda: not (farm.inbox / "gone.png").exists())


def test_rejected_file_is_recorded_with_reason_and_daemon_lives(farm):
    """A bad file gets a rejected record with a reason; the daemon keeps uploading good ones."""
    with farm.daemon():
        (farm.inbox / "empty.png").write_bytes(b"")
        (farm.inbox / "notes.txt").write_text("hello")
        (farm.inbox / "ok.png").write_bytes(unique_png(8))
        farm.wait_uploaded(1)
        wait_for(lambda: len(farm.records("rejected")) == 2)
    reasons = {Path(r["path"]).name: r["reason"] for r in farm.records("rejected")}
    assert "empty" in reasons["empty.png"] and ".txt" in reasons["notes.txt"]


def test_a_thousand_files_at_once_all_arrive_exactly_once(farm):
    """1,000 files dropped at once are each uploaded exactly once."""
    farm.configure(workers={"count": 8})
    staging = farm.tmp / "staging"
    staging.mkdir()
    for n in range(1000):
        (staging / f"f{n:04d}.png").write_bytes(unique_png(n + 10, 24, 24))
    with farm.daemon():
        for n in range(1000):
            os.rename(staging / f"f{n:04d}.png", farm.inbox / f"f{n:04d}.png")
        farm.wait_uploaded(1000, timeout=180)
    paths = farm.uploaded_paths()
    assert len(paths) == len(set(paths)) == 1000
    assert farm.emulator.token_count() == 1000


def test_sigterm_finishes_in_flight_and_exits_0(farm):
    """SIGTERM during uploads lets in-flight files finish, records nothing half-done, exits 0."""
    farm.emulator.inject(Fault("delay", seconds=1.0, count=4))
    daemon = farm.daemon().start()
    for n in range(4):
        (farm.inbox / f"s{n}.png").write_bytes(unique_png(500 + n))
    wait_for(lambda: farm.emulator.records())
    daemon.signal(signal.SIGTERM)
    assert daemon.stop() == 0
    done = {r["path"] for r in farm.records()}
    with farm.daemon():  # whatever was left is picked up at the next start
        farm.wait_uploaded(4)
    assert len(farm.uploaded_paths()) == 4 and done <= set(farm.uploaded_paths())


@both_protocols
def test_revoked_key_pauses_then_resumes_when_the_key_file_changes(any_farm, api_key):
    """A 401 pauses uploads with one clear error and marks nothing failed; a new key resumes."""
    with any_farm.daemon() as daemon:
        any_farm.emulator.api_keys.clear()
        (any_farm.inbox / "a.png").write_bytes(unique_png(11))
        wait_for(lambda: daemon.events("auth.failed"))
        assert any_farm.records() == []
        any_farm.emulator.api_keys.add("tsk_new_key")
        write_key(any_farm.key_file, "tsk_new_key")
        any_farm.wait_uploaded(1)
        assert len(daemon.events("auth.failed")) == 1
    assert any_farm.records("failed") == []


def test_dry_run_uploads_nothing(farm):
    """--dry-run detects and validates files but asks for no token and writes no record."""
    with farm.daemon("--dry-run") as daemon:
        (farm.inbox / "a.png").write_bytes(unique_png(12))
        wait_for(lambda: daemon.events("file.would_upload"))
    assert farm.emulator.token_count() == 0 and farm.records() == []


def test_rejections_are_recorded_once_not_again_at_each_start(farm, tmp_path):
    """A rejected file, a FIFO and an escaping symlink are recorded once; a restart adds nothing."""
    (tmp_path / "elsewhere.png").write_bytes(unique_png(31))
    (farm.inbox / "escape.png").symlink_to(tmp_path / "elsewhere.png")
    os.mkfifo(farm.inbox / "pipe.png")
    (farm.inbox / "notes.txt").write_text("not a model")
    (farm.inbox / "ok.png").write_bytes(unique_png(32))
    with farm.daemon():
        wait_for(lambda: len(farm.records()) == 4)
    with farm.daemon() as again:
        wait_for(lambda: again.events("daemon.started"))
        (farm.inbox / "later.png").write_bytes(unique_png(33))
        farm.wait_uploaded(2)
    statuses = sorted(r["status"] for r in farm.records())
    assert statuses == ["rejected", "rejected", "rejected", "uploaded", "uploaded"]
