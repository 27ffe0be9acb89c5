"""Big files are streamed by part and hashed alongside, unless a same-size upload is known."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import read_ledger, records_of, run_cli, write_config, write_key

from tripo_watchd.config import load_settings
from tripo_watchd.digest import StreamDigest
from tripo_watchd.ledger import JsonlLedger
from tripo_watchd.pipeline import Pipeline
from tripo_watchd.protocols import s3_sender
from tripo_watchd.protocols.registry import make_protocol
from tripo_watchd.protocols.s3_sender import open_for_upload
from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator
from tripo_watchd.sandbox.faultproxy import FaultProxy
from tripo_watchd.secrets import Secret
from tripo_watchd.throttle import Bandwidth, ThrottledReader

MiB = 1024 * 1024
MULTIPART = {"multipart_threshold_bytes": 5 * MiB, "multipart_chunk_bytes": 5 * MiB}


def random_glb(size: int, seed: int = 0) -> bytes:
    """A valid GLB of exactly `size` bytes whose BIN chunk is pseudo-random (no two seeds alike)."""
    json_chunk = b'{"asset":{"version":"2.0"}}    '[:28]
    bin_length = size - 12 - 8 - len(json_chunk) - 8
    payload = hashlib.shake_256(seed.to_bytes(8, "little")).digest(bin_length)
    return b"".join(
        (
            struct.pack("<4sII", b"glTF", 2, size),
            struct.pack("<II", len(json_chunk), 0x4E4F534A),
            json_chunk,
            struct.pack("<II", bin_length, 0x004E4942),
            payload,
        )
    )


# -- the digest ---------------------------------------------------------------------------------


def test_digest_of_in_order_reads_with_rereads_equals_hashlib() -> None:
    """Reads in order, with seeks back and re-reads between them, hash each byte exactly once."""
    data = os.urandom(100_000)
    digest = StreamDigest(len(data))
    reader = digest.reader(io.BytesIO(data))
    reader.read(30_000)
    reader.seek(10_000)  # a retry of a part: re-read, not re-hashed
    reader.read(40_000)
    end = reader.seek(0, io.SEEK_END)  # a size probe, then back: no bytes skipped
    reader.seek(50_000)
    assert end == len(data) and reader.tell() == 50_000
    reader.read()
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_digest_with_a_skipped_range_is_invalid() -> None:
    """A read that starts past the bytes hashed so far makes the one-pass digest unusable."""
    data = os.urandom(10_000)
    digest = StreamDigest(len(data))
    reader = digest.reader(io.BytesIO(data))
    reader.read(1_000)
    reader.seek(2_000)
    reader.read()
    reader.seek(0)
    reader.read()
    assert digest.hexdigest() is None


def test_digest_spans_a_second_stream_of_a_new_attempt() -> None:
    """An attempt that restarts from byte 0 on a new stream continues the same digest."""
    data = os.urandom(50_000)
    digest = StreamDigest(len(data))
    digest.reader(io.BytesIO(data)).read(20_000)
    assert digest.hexdigest() is None  # incomplete
    second = digest.reader(io.BytesIO(data))
    while second.read(7_000):
        pass
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_digest_under_a_throttled_reader_with_a_signing_pass() -> None:
    """Under ThrottledReader, a signing pass then the sending pass still hash each byte once."""
    data = os.urandom(300_000)
    digest = StreamDigest(len(data))
    sent: list[int] = []
    throttled = ThrottledReader(
        digest.reader(io.BytesIO(data)), Bandwidth(1e12), callback=sent.append
    )
    throttled.signal_not_transferring()
    assert throttled.read() == data
    throttled.seek(0)
    throttled.signal_transferring()
    assert throttled.read() == data
    assert sum(sent) == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_digest_alongside_hashes_the_file_from_its_descriptor(tmp_path) -> None:
    """A digest fed by its side thread equals hashlib's; a file shorter than signed gives None."""
    data = random_glb(3 * MiB + 17, seed=8)
    path = tmp_path / "f.glb"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = StreamDigest(len(data))
        digest.reader(io.BytesIO(data)).read(MiB)  # an earlier attempt hashed the first MiB
        with digest.alongside(fd):
            pass
        short = StreamDigest(len(data) + 1)
        with short.alongside(fd):
            pass
    finally:
        os.close(fd)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert short.hexdigest() is None


# -- the pipeline against the emulator and moto ------------------------------------------------


class Rig:
    """Config, key and an in-process pipeline pointed at the emulator and an S3 endpoint."""

    def __init__(self, tmp: Path, emulator: TripoEmulator, endpoint: str, api_key: str) -> None:
        self.tmp, self.emulator, self.endpoint, self.api_key = tmp, emulator, endpoint, api_key
        self.key_file = write_key(tmp / "api-key", api_key)
        self.ledger = tmp / "state" / "ledger.jsonl"
        self.config = self.configure()

    def configure(self, **sections: dict[str, Any]) -> Path:
        merged: dict[str, dict[str, Any]] = {"s3": dict(MULTIPART)}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        return write_config(
            self.tmp / "cfg.toml",
            api_base_url=self.emulator.base_url,
            s3_endpoint_url=self.endpoint,
            ledger=self.ledger,
            key_file=self.key_file,
            sections=merged,
        )

    def put(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def upload(self, *paths: Path) -> tuple[list[dict[str, Any]], str]:
        result = run_cli("upload", "--config", self.config, *paths)
        assert result.returncode == 0, result.stderr
        return records_of(result.stdout), result.stderr


@pytest.fixture
def rig(tmp_path: Path, emulator: TripoEmulator, s3_server: S3Server, api_key: str) -> Rig:
    return Rig(tmp_path, emulator, s3_server.endpoint_url, api_key)


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("dedupe", ["content", "path", "off"])
def test_big_file_is_hashed_while_sent_unless_an_upload_of_its_size_is_known(
    rig, s3_server, dedupe
):
    """A 12 MiB GLB is hashed alongside its upload; a copy of a known size is hashed first, once."""
    rig.configure(pipeline={"dedupe": dedupe})
    settings = load_settings(rig.config)
    ledger = JsonlLedger(settings.ledger.path)
    protocol = make_protocol(settings, lambda: Secret(rig.api_key))
    pipeline = Pipeline(settings, ledger, protocol)
    try:
        pipeline.process(rig.put("warm.glb", random_glb(6 * MiB, seed=99)))  # client, models
        data = random_glb(12 * MiB, seed=1)
        path = rig.put("big.glb", data)
        record = pipeline.process(path)
        assert record.status == "uploaded" and record.duplicate_of is None
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert s3_server.object_bytes(record.key) == data

        again = rig.put("copy.glb", data) if dedupe == "content" else path
        os.utime(again, ns=(1, 1))  # a path dedupe sees a changed file
        before = _bytes_read()
        second = pipeline.process(again)
        read = _bytes_read() - before
    finally:
        protocol.close()
        ledger.close()
    assert second.sha256 == record.sha256
    if dedupe == "off":  # no dedupe: sent again
        assert second.duplicate_of is None and rig.emulator.token_count() == 3
    else:  # the same size is in the ledger: hashed before, then not sent (no second read)
        assert second.duplicate_of == str(path if dedupe == "content" else again)
        assert len(data) <= read < 1.25 * len(data)
        assert rig.emulator.token_count() == 2


def test_without_proc_a_big_file_is_streamed_in_order_and_still_hashed(rig, s3_server, monkeypatch):
    """Where /proc/self/fd is missing, a big file goes up from one stream and its sha256 holds."""
    monkeypatch.setattr(s3_sender, "_PROC_FD", rig.tmp / "no-proc")
    rig.configure(s3={"progress_log_seconds": 0.01})
    settings = load_settings(rig.config)
    ledger = JsonlLedger(settings.ledger.path)
    protocol = make_protocol(settings, lambda: Secret(rig.api_key))
    data = random_glb(12 * MiB, seed=7)
    try:
        record = Pipeline(settings, ledger, protocol).process(rig.put("big.glb", data))
    finally:
        protocol.close()
        ledger.close()
    assert record.status == "uploaded"
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert s3_server.object_bytes(record.key) == data


def test_big_file_is_streamed_from_disk_not_held_in_memory(rig, s3_server):
    """Sending a 24 MiB GLB in 5 MiB parts never holds more than about two parts in memory."""
    settings = load_settings(rig.config)
    ledger = JsonlLedger(settings.ledger.path)
    protocol = make_protocol(settings, lambda: Secret(rig.api_key))
    pipeline = Pipeline(settings, ledger, protocol)
    data = random_glb(24 * MiB, seed=6)
    path = rig.put("big.glb", data)
    del data
    try:
        pipeline.process(rig.put("warm.glb", random_glb(6 * MiB, seed=98)))  # client, models
        tracemalloc.start()
        try:
            record = pipeline.process(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        protocol.close()
        ledger.close()
    assert record.status == "uploaded"
    assert s3_server.object_bytes(record.key) == path.read_bytes()
    assert peak < 2 * MULTIPART["multipart_chunk_bytes"], f"peak {peak / MiB:.1f} MiB"


def test_big_glb_multipart_via_cli_has_its_sha256_and_a_copy_is_a_duplicate(rig, s3_server):
    """`upload` of a 12 MiB GLB in 5 MiB parts records the real sha256; a copy is a duplicate."""
    data = random_glb(12 * MiB, seed=2)
    first = rig.put("big.glb", data)
    (record,), stderr = rig.upload(first)
    assert record["status"] == "uploaded"
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert s3_server.object_bytes(record["key"]) == data
    assert "hash_pass_after_upload" not in stderr
    (copy,), _ = rig.upload(rig.put("copy.glb", data))
    assert copy["duplicate_of"] == str(first) and copy["key"] == record["key"]
    assert rig.emulator.token_count() == 1
    assert [r["sha256"] for r in read_ledger(rig.ledger)] == [record["sha256"]] * 2


def test_token_with_expired_credentials_still_gives_the_right_sha256(rig, s3_server):
    """A first token S3 refuses restarts the multipart upload; the digest is still the file's."""
    rig.emulator.inject(Fault("expired_credentials"))
    data = random_glb(12 * MiB, seed=3)
    (record,), _ = rig.upload(rig.put("big.glb", data))
    assert record["attempts"] == 2 and rig.emulator.token_count() == 2
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert s3_server.object_bytes(record["key"]) == data


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3_server.port) as fault_proxy:
        yield fault_proxy


def test_credentials_expiring_mid_multipart_still_give_the_right_sha256(
    tmp_path, emulator, s3_server, proxy, api_key
):
    """ExpiredToken on part 2 re-sends the file with a new token; the record's sha256 is right."""
    rig = Rig(tmp_path, emulator, proxy.url, api_key)
    proxy.respond_next(
        1, 400, "ExpiredToken", "The provided token has expired.", match="partNumber=2"
    )
    proxy.reset_after_bytes(1 * MiB)  # and one part retried by botocore on the way
    data = random_glb(16 * MiB + 123, seed=4)
    (record,), _ = rig.upload(rig.put("big.glb", data))
    assert record["attempts"] == 2 and record["key"] == emulator.tokens[1].key
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert s3_server.object_bytes(record["key"]) == data
    assert proxy.stats().faults == {"http_400": 1, "reset_mid": 1}


class _SkippingProtocol:
    """A protocol whose send reads the file with a hole (as a broken stream would)."""

    name = "skipping"

    class _Destination:
        trace_id = None

        def ledger_fields(self) -> dict[str, Any]:
            return {"key": "k"}

    def destination(self, kind: Any, size: int) -> Any:
        return self._Destination()

    def send(self, destination: Any, body: Any) -> None:
        with open_for_upload(body) as stream:
            stream.read(MiB)
            stream.seek(2 * MiB)
            stream.read()

    def close(self) -> None:
        pass


def test_a_hole_in_the_upload_reads_falls_back_to_a_hash_pass(tmp_path):
    """If the upload skipped bytes, the sha256 comes from a separate pass and is still right."""
    config = write_config(
        tmp_path / "cfg.toml",
        api_base_url="http://127.0.0.1:9",
        s3_endpoint_url="http://127.0.0.1:9",
        ledger=tmp_path / "ledger.jsonl",
        sections={"s3": MULTIPART},
    )
    settings = load_settings(config)
    ledger = JsonlLedger(settings.ledger.path)
    data = random_glb(6 * MiB, seed=5)
    path = tmp_path / "holey.glb"
    path.write_bytes(data)
    try:
        record = Pipeline(settings, ledger, _SkippingProtocol()).process(path)
    finally:
        ledger.close()
    assert record.status == "uploaded"
    assert record.sha256 == hashlib.sha256(data).hexdigest()
