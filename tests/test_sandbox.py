"""Contract tests of the sandbox: the Tripo emulator over real HTTP and the local S3 behind it."""

from __future__ import annotations

import re
import ssl
import time
import uuid
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from tripo_watchd.sandbox import Fault, S3Server, TripoEmulator

URI_RE = re.compile(
    r"^tcli_[0-9a-f]{32}/\d{8}/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"/input\.(webp|jpeg|png|glb|obj|fbx|stl)$"
)
DATA_FIELDS = {"s3_host", "resource_bucket", "resource_uri", "session_token", "sts_ak", "sts_sk"}


def token(emulator: TripoEmulator, key: str, body: Any = None, **kw: Any) -> requests.Response:
    if "data" not in kw:
        kw["json"] = {"format": "png"} if body is None else body
    return requests.post(
        f"{emulator.base_url}/upload/sts/token",
        headers={"Authorization": f"Bearer {key}"},
        timeout=kw.pop("timeout", 10),
        **kw,
    )


def creds_of(data: dict[str, Any]) -> dict[str, str]:
    return {
        "AccessKeyId": data["sts_ak"],
        "SecretAccessKey": data["sts_sk"],
        "SessionToken": data["session_token"],
    }


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_token_success_shape(emulator: TripoEmulator, api_key: str) -> None:
    """A valid key and format get code 0 with every documented field and a fresh key each time."""
    first = token(emulator, api_key, {"format": "glb"})
    second = token(emulator, api_key, {"format": "glb"})
    assert first.status_code == 200
    data = first.json()["data"]
    assert first.json()["code"] == 0
    assert set(data) == DATA_FIELDS
    assert data["s3_host"] == "s3.us-west-2.amazonaws.com"
    assert data["resource_bucket"] == "tripo-data"
    assert URI_RE.match(data["resource_uri"])
    assert data["resource_uri"].endswith("/input.glb")
    assert data["sts_ak"].startswith("ASIA")
    assert second.json()["data"]["resource_uri"] != data["resource_uri"]
    assert emulator.token_count() == 2


def test_trace_id_on_every_response(emulator: TripoEmulator, api_key: str) -> None:
    """Every answer, success or error, carries a distinct X-Tripo-Trace-ID that the log keeps."""
    ok = token(emulator, api_key)
    bad = token(emulator, "tsk_wrong")
    ids = [ok.headers["X-Tripo-Trace-ID"], bad.headers["X-Tripo-Trace-ID"]]
    assert all(uuid.UUID(i) for i in ids) and ids[0] != ids[1]
    assert [r.trace_id for r in emulator.records()] == ids
    assert emulator.tokens[0].trace_id == ids[0]


def test_bad_or_revoked_key_is_401_1002(emulator: TripoEmulator, api_key: str) -> None:
    """A wrong, missing or revoked key gets HTTP 401 with body code 1002."""
    assert token(emulator, api_key).status_code == 200
    emulator.api_keys.discard(api_key)
    for response in (
        token(emulator, api_key),
        token(emulator, "tsk_nope"),
        requests.post(f"{emulator.base_url}/upload/sts/token", json={"format": "png"}, timeout=5),
    ):
        assert response.status_code == 401
        assert response.json()["code"] == 1002


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'"png"'])
def test_malformed_body_is_400_1003(emulator: TripoEmulator, api_key: str, body: bytes) -> None:
    """A body that is not a JSON object gets HTTP 400 with code 1003."""
    response = token(emulator, api_key, data=body)
    assert (response.status_code, response.json()["code"]) == (400, 1003)


@pytest.mark.parametrize("body", [{}, {"format": "jpg"}, {"format": "PNG"}, {"format": 3}])
def test_bad_format_is_400_1004(emulator: TripoEmulator, api_key: str, body: Any) -> None:
    """A missing or unknown format (including `jpg`) gets HTTP 400 with code 1004."""
    response = token(emulator, api_key, body)
    assert (response.status_code, response.json()["code"]) == (400, 1004)


def test_balance_endpoints(emulator: TripoEmulator, api_key: str) -> None:
    """The v2 and v3 balance calls answer for a good key and refuse a bad one with 401."""
    auth = {"Authorization": f"Bearer {api_key}"}
    v2 = requests.get(f"{emulator.base_url}/user/balance", headers=auth, timeout=5)
    v3 = requests.get(f"{emulator.v3_base_url}/account/balance", headers=auth, timeout=5)
    assert v2.json()["data"] == {"balance": 100.0, "frozen": 0.0}
    assert v3.json()["status"] == "success" and v3.json()["data"]["balance"] == 100.0
    refused = requests.get(f"{emulator.v3_base_url}/account/balance", timeout=5)
    assert refused.status_code == 401


def test_keep_alive_session(emulator: TripoEmulator, api_key: str) -> None:
    """One HTTP/1.1 connection serves many requests, errors included."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {api_key}"
        url = f"{emulator.base_url}/upload/sts/token"
        statuses = [
            session.post(url, json={"format": f}, timeout=5).status_code
            for f in ("png", "bad", "stl", "png")
        ]
    assert statuses == [200, 400, 200, 200]


def test_fault_status_with_retry_after(emulator: TripoEmulator, api_key: str) -> None:
    """A status fault answers its HTTP status, code and Retry-After, then the next call is fine."""
    emulator.inject(Fault("status", status=429, code=1007, retry_after="2", count=2))
    first, second, third = (token(emulator, api_key) for _ in range(3))
    for r in (first, second):
        assert (r.status_code, r.json()["code"], r.headers["Retry-After"]) == (429, 1007, "2")
    assert third.status_code == 200
    assert emulator.pending_faults() == 0


def test_fault_delay_makes_client_time_out(emulator: TripoEmulator, api_key: str) -> None:
    """A delay fault holds the answer long enough for a client timeout to fire."""
    emulator.inject(Fault("delay", seconds=2.0))
    with pytest.raises(requests.exceptions.ReadTimeout):
        token(emulator, api_key, timeout=0.3)
    assert token(emulator, api_key).status_code == 200


def test_fault_malformed(emulator: TripoEmulator, api_key: str) -> None:
    """A malformed fault answers 200 with a body that is not JSON."""
    emulator.inject(Fault("malformed"))
    response = token(emulator, api_key)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_fault_bad_shape(emulator: TripoEmulator, api_key: str) -> None:
    """A bad_shape fault answers code 0 with `data` missing promised fields."""
    emulator.inject(Fault("bad_shape"))
    body = token(emulator, api_key).json()
    assert body["code"] == 0 and not set(body["data"]) >= DATA_FIELDS


def test_fault_code_in_200(emulator: TripoEmulator, api_key: str) -> None:
    """A code_in_200 fault answers HTTP 200 whose body code is an error."""
    emulator.inject(Fault("code_in_200", code=1000))
    response = token(emulator, api_key)
    assert (response.status_code, response.json()["code"]) == (200, 1000)


def test_fault_reset(emulator: TripoEmulator, api_key: str) -> None:
    """A reset fault closes the connection without any answer."""
    emulator.inject(Fault("reset"))
    with pytest.raises(requests.exceptions.ConnectionError):
        token(emulator, api_key)
    assert emulator.records()[-1].status == 0
    assert token(emulator, api_key).status_code == 200


def test_fault_expired_credentials(
    emulator: TripoEmulator, api_key: str, s3_server: S3Server
) -> None:
    """An expired_credentials fault looks normal but S3 refuses its key with InvalidAccessKeyId."""
    emulator.inject(Fault("expired_credentials"))
    data = token(emulator, api_key).json()["data"]
    assert set(data) == DATA_FIELDS
    client = s3_server.client_for(creds_of(data))
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=data["resource_bucket"], Key=data["resource_uri"], Body=b"x")
    assert error_code(info.value) == "InvalidAccessKeyId"


def test_fault_endpoint_filter(emulator: TripoEmulator, api_key: str) -> None:
    """A fault aimed at one endpoint leaves the others alone."""
    emulator.inject(Fault("status", status=503, code=1001, endpoint="/user/balance"))
    assert token(emulator, api_key).status_code == 200
    auth = {"Authorization": f"Bearer {api_key}"}
    assert (
        requests.get(f"{emulator.base_url}/user/balance", headers=auth, timeout=5).status_code
        == 503
    )


def test_faults_over_http(emulator: TripoEmulator, api_key: str) -> None:
    """Subprocess users can queue and clear faults over HTTP."""
    url = f"{emulator.root_url}/_emulator/faults"
    faults = [Fault("status", status=500, code=1000).to_dict(), {"kind": "code_in_200"}]
    assert requests.post(url, json=faults, timeout=5).json()["data"]["queued"] == 2
    assert token(emulator, api_key).status_code == 500
    assert requests.delete(url, timeout=5).status_code == 200
    assert token(emulator, api_key).status_code == 200
    assert requests.post(url, json=[{"kind": "nope"}], timeout=5).status_code == 400


def test_random_faults_reproducible(emulator: TripoEmulator, api_key: str) -> None:
    """Random faults hit about `rate` of requests, the same ones for the same seed."""

    def run() -> list[int]:
        emulator.set_random_faults(0.5, seed=7, kinds=["status", "code_in_200", "malformed"])
        outcome = [token(emulator, api_key, {"format": "bad"}).status_code for _ in range(30)]
        emulator.clear_faults()
        return outcome

    first, second = run(), run()
    assert first == second
    assert 5 < sum(s != 400 for s in first) < 25


def test_credentials_scoped_to_one_key(
    emulator: TripoEmulator, api_key: str, s3_server: S3Server
) -> None:
    """Token credentials write only the named key: others AccessDenied, bad signature refused."""
    data = token(emulator, api_key).json()["data"]
    bucket, key = data["resource_bucket"], data["resource_uri"]
    client = s3_server.client_for(creds_of(data))
    client.put_object(Bucket=bucket, Key=key, Body=b"hello")
    assert s3_server.object_bytes(key) == b"hello"
    assert key in s3_server.list_keys()
    for other in (key + "x", key.rsplit("/", 1)[0] + "/other.png", "elsewhere.png"):
        with pytest.raises(ClientError) as info:
            client.put_object(Bucket=bucket, Key=other, Body=b"no")
        assert error_code(info.value) == "AccessDenied"
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=bucket, Key=key)
    assert error_code(info.value) == "AccessDenied"
    forged = s3_server.client_for({**creds_of(data), "SecretAccessKey": "x" * 40})
    with pytest.raises(ClientError) as info:
        forged.put_object(Bucket=bucket, Key=key, Body=b"forged")
    assert error_code(info.value) == "SignatureDoesNotMatch"
    unsigned = requests.put(f"{s3_server.endpoint_url}/{bucket}/{key}", data=b"anon", timeout=5)
    assert unsigned.status_code >= 400
    assert s3_server.object_bytes(key) == b"hello"


def test_multipart_with_token_credentials(s3_server: S3Server) -> None:
    """Minted credentials can create, upload, list, complete and abort multipart on the key."""
    key = f"tcli_{uuid.uuid4().hex}/mp/input.glb"
    client = s3_server.client_for(s3_server.mint_credentials(s3_server.bucket, key))
    part_body = b"a" * (5 * 1024 * 1024)
    upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
    parts = []
    for number, body in ((1, part_body), (2, b"tail")):
        etag = client.upload_part(
            Bucket=s3_server.bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body,
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    listed = client.list_parts(Bucket=s3_server.bucket, Key=key, UploadId=upload["UploadId"])
    assert len(listed["Parts"]) == 2
    client.complete_multipart_upload(
        Bucket=s3_server.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    assert s3_server.object_bytes(key) == part_body + b"tail"
    aborted = client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
    client.abort_multipart_upload(Bucket=s3_server.bucket, Key=key, UploadId=aborted["UploadId"])
    with pytest.raises(ClientError) as info:
        client.create_multipart_upload(Bucket=s3_server.bucket, Key=key + ".other")
    assert error_code(info.value) == "AccessDenied"


def presign(emulator: TripoEmulator, api_key: str, fmt: str = "png") -> requests.Response:
    return requests.post(
        f"{emulator.v3_base_url}/files/presign",
        json={"format": fmt},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=5,
    )


def test_v3_presign_put_works(emulator: TripoEmulator, api_key: str, s3_server: S3Server) -> None:
    """A v3 presigned URL takes one PUT of the bytes, stored under the key its file_token names."""
    body = presign(emulator, api_key).json()
    assert body["code"] == 0 and body["status"] == "success"
    data = body["data"]
    assert data["file_token"].startswith("file_") and data["expires_in"] == 1800
    put = requests.put(data["upload_url"], data=b"v3 bytes", timeout=5)
    assert put.status_code == 200 and put.headers["ETag"]
    bucket, key = emulator.file_tokens[data["file_token"]]
    assert s3_server.object_bytes(key, bucket) == b"v3 bytes"
    tampered = data["upload_url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert requests.put(tampered, data=b"evil", timeout=5).status_code == 403


def test_v3_presign_expires(emulator: TripoEmulator, api_key: str) -> None:
    """A presigned URL is refused with 403 once its expires_in has passed."""
    emulator.presign_expires_in = 1
    data = presign(emulator, api_key).json()["data"]
    assert data["expires_in"] == 1
    deadline = time.monotonic() + 5
    while True:
        put = requests.put(data["upload_url"], data=b"late", timeout=5)
        if put.status_code == 403 or time.monotonic() > deadline:
            break
    assert put.status_code == 403 and b"expired" in put.content


def test_v3_errors(emulator: TripoEmulator, api_key: str) -> None:
    """v3 refuses a bad key with 401, a bad format with 400, and rate-limit faults with 429/1007."""
    assert presign(emulator, "tsk_bad").status_code == 401
    assert presign(emulator, api_key, "exe").status_code == 400
    emulator.inject(Fault("status", status=429, code=1007, endpoint="/files/presign"))
    limited = presign(emulator, api_key)
    assert (limited.status_code, limited.json()["code"]) == (429, 1007)


def test_tls_emulator(s3_server: S3Server, tmp_path: Any) -> None:
    """With an ssl_context the emulator serves https that a client trusting the CA can use."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with TripoEmulator(s3_server, api_keys=["k"], ssl_context=ctx) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:")
        response = token(emu, "k", verify=str(ca_file))
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            token(emu, "k")


def test_mint_is_fast(s3_server: S3Server) -> None:
    """Minting a one-key credential stays well under 100 ms, so tests can make many tokens."""
    start = time.monotonic()
    for i in range(10):
        s3_server.mint_credentials(s3_server.bucket, f"speed/{i}")
    assert (time.monotonic() - start) / 10 < 0.1


def test_stop_cuts_keep_alive(s3_server: S3Server) -> None:
    """After stop() the emulator answers nothing, even on a connection opened before."""
    emu = TripoEmulator(s3_server, api_keys=["k"]).start()
    with requests.Session() as session:
        url = f"{emu.base_url}/upload/sts/token"
        headers = {"Authorization": "Bearer k"}
        assert session.post(url, json={"format": "png"}, headers=headers, timeout=5).ok
        emu.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(url, json={"format": "png"}, headers=headers, timeout=5)


def test_s3_server_over_tls(tmp_path: Any) -> None:
    """With a certificate the local S3 serves https, and boto3 trusting the CA can upload."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with S3Server(tmp_path, tls_cert=cert_file, tls_key=key_file, ca_bundle=ca_file) as server:
        assert server.endpoint_url.startswith("https://127.0.0.1:")
        creds = server.mint_credentials(server.bucket, "tls/input.png")
        server.client_for(creds).put_object(Bucket=server.bucket, Key="tls/input.png", Body=b"t")
        assert server.object_bytes("tls/input.png") == b"t"
