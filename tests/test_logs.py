"""Tests for logging set-up and redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tripo_watchd import logs
from tripo_watchd.secrets import Secret

API_KEY = "tsk_live_0123456789abcdefSECRET"
STS_SK = "stsSecretKey/with+slashes=="


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    logs.forget_secrets()
    yield
    logs.forget_secrets()
    logs.reset_logging()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_shape() -> None:
    """When not on a terminal each event is one JSON object with timestamp, level and event."""
    out = io.StringIO()
    logs.configure_logging(stream=out)  # StringIO is not a TTY -> JSON
    structlog.get_logger().info("upload_done", path="/in/a.glb", seconds=1.5)
    (event,) = json_lines(out)
    assert event["event"] == "upload_done"
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]
    assert event["path"] == "/in/a.glb" and event["seconds"] == 1.5


def test_console_shape() -> None:
    """On a terminal the line is plain readable text without colour codes."""
    out = io.StringIO()
    logs.configure_logging(json_output=False, stream=out)
    structlog.get_logger().warning("slow_down", retry_after=3)
    line = out.getvalue()
    assert "[warning" in line and "slow_down" in line and "retry_after=3" in line
    assert "\x1b[" not in line


def test_level_filters() -> None:
    """Events below the configured level are not written."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out, level="warning")
    structlog.get_logger().info("chatty")
    structlog.get_logger().error("bad")
    assert [e["event"] for e in json_lines(out)] == ["bad"]


def test_reconfigure_is_idempotent() -> None:
    """Configuring twice does not duplicate stdlib output."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    logs.configure_logging(json_output=True, stream=out)
    logging.getLogger("botocore.test").warning("once")
    assert len(json_lines(out)) == 1


@pytest.mark.parametrize(
    "key",
    [*sorted(logs.SECRET_KEYS), "API_KEY", "X-Amz-Security-Token", "Authorization"],
)
def test_every_secret_key_hidden(key: str) -> None:
    """A value under any secret-named key, nested or not, never reaches the log."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    structlog.get_logger().info(
        "event", **{key: "v4lue-to-hide"}, headers={key: "v4lue-to-hide"}, items=[{key: "v"}]
    )
    text = out.getvalue()
    assert "v4lue-to-hide" not in text
    (event,) = json_lines(out)
    assert event[key] == "***"
    assert event["headers"][key] == "***"
    assert event["items"][0][key] == "***"


def test_public_ids_stay_visible() -> None:
    """file_token and trace_id are public ids that operators need, so they are not hidden."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    structlog.get_logger().info("done", file_token="ft-123", trace_id="tr-456")
    (event,) = json_lines(out)
    assert event["file_token"] == "ft-123" and event["trace_id"] == "tr-456"


def test_secret_instances_hidden() -> None:
    """A Secret logged by mistake renders as ***."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    structlog.get_logger().info("cfg", key_holder=Secret(API_KEY), nested={"k": Secret("x")})
    (event,) = json_lines(out)
    assert event["key_holder"] == "***" and event["nested"]["k"] == "***"


@pytest.mark.parametrize("json_output", [True, False])
def test_registered_secret_hidden_in_exception(json_output: bool) -> None:
    """A registered secret inside an exception message and its traceback is masked."""
    out = io.StringIO()
    logs.configure_logging(json_output=json_output, stream=out)
    logs.register_secret(API_KEY, pinned=True)
    logs.register_secret(STS_SK)
    try:
        raise RuntimeError(f"refused key {API_KEY} with {STS_SK}")
    except RuntimeError:
        structlog.get_logger().exception("upload_failed", note=f"sk={STS_SK}")
    text = out.getvalue()
    assert API_KEY not in text and STS_SK not in text
    assert "Traceback" in text and "refused key ***" in text


def test_patterns_scrubbed() -> None:
    """Bearer tokens and presigned-URL credentials in free text are masked."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    url = (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1/x"
        "&X-Amz-Security-Token=tok&X-Amz-Signature=abc123&v=1"
    )
    structlog.get_logger().info("req", header="Bearer abc.def.ghi", url=url)
    (event,) = json_lines(out)
    assert event["header"] == "Bearer ***"
    assert event["url"] == (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***"
        "&X-Amz-Security-Token=***&X-Amz-Signature=***&v=1"
    )


def test_stdlib_logger_output_scrubbed() -> None:
    """Library logs (botocore, urllib3) go through the same redaction and JSON shape."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    logs.register_secret(STS_SK)
    lib = logging.getLogger("botocore.endpoint")
    lib.warning("sending %s with Authorization: Bearer xyz", STS_SK)
    lib.info("below the library level")
    try:
        raise ValueError(STS_SK)
    except ValueError:
        lib.error("failed", exc_info=True)
    text = out.getvalue()
    assert STS_SK not in text and "xyz" not in text
    first, second = json_lines(out)
    assert first["logger"] == "botocore.endpoint" and first["level"] == "warning"
    assert first["event"] == "sending *** with Authorization: Bearer ***"
    assert "ValueError: ***" in second["exception"]


def test_short_values_not_registered() -> None:
    """Very short values are ignored so ordinary words are not blanked everywhere."""
    out = io.StringIO()
    logs.configure_logging(json_output=True, stream=out)
    logs.register_secret("abc")
    structlog.get_logger().info("abc")
    assert json_lines(out)[0]["event"] == "abc"


def test_recent_secrets_bounded_but_pinned_kept() -> None:
    """Old per-upload secrets fall out of memory; the pinned API key is never forgotten."""
    logs.register_secret(API_KEY, pinned=True)
    first = "first-sts-secret-value"
    logs.register_secret(first)
    for i in range(logs.MAX_RECENT_SECRETS):
        logs.register_secret(f"sts-secret-{i:08d}")
    assert logs.scrub_text(API_KEY) == "***"
    assert logs.scrub_text(first) == first
    assert logs.scrub_text("sts-secret-00000007") == "***"
