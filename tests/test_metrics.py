"""Tests for the Prometheus metrics and their HTTP endpoint."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tripo_watchd.metrics import Metrics, NullMetrics, outcome_of, parse_listen
from tripo_watchd.records import Record


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(url, timeout=5)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_endpoint_serves_the_daemon_figures() -> None:
    """A scrape of /metrics shows files by outcome, bytes, timings, queue, retries and auth."""
    metrics = Metrics()
    metrics.file_done("uploaded", size=2048, seconds=1.5)
    metrics.file_done("duplicate", size=2048)
    metrics.file_done("rejected")
    metrics.token_request(0.2)
    metrics.retry("RateLimited")
    metrics.retry("RateLimited")
    metrics.set_queue(queued=3, in_flight=2)
    metrics.set_auth(False)
    server = metrics.serve("127.0.0.1:0")
    try:
        values = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server()
    assert values[("tripo_watchd_files_total", (("outcome", "uploaded"),))] == 1
    assert values[("tripo_watchd_files_total", (("outcome", "duplicate"),))] == 1
    assert values[("tripo_watchd_files_total", (("outcome", "failed"),))] == 0
    assert values[("tripo_watchd_uploaded_bytes_total", ())] == 2048
    assert values[("tripo_watchd_upload_seconds_count", ())] == 1
    assert values[("tripo_watchd_upload_seconds_sum", ())] == 1.5
    assert values[("tripo_watchd_token_request_seconds_bucket", (("le", "0.25"),))] == 1
    assert values[("tripo_watchd_retries_total", (("reason", "RateLimited"),))] == 2
    assert values[("tripo_watchd_queue_depth", ())] == 3
    assert values[("tripo_watchd_in_flight", ())] == 2
    assert values[("tripo_watchd_auth_ok", ())] == 0


def test_stop_closes_the_port() -> None:
    """After the stop function returns, the endpoint no longer answers."""
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0")
    server()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_remote_listen_is_refused_unless_allowed() -> None:
    """The unauthenticated endpoint will not listen beyond loopback unless explicitly allowed."""
    with pytest.raises(ValueError, match="loopback"):
        Metrics().serve("0.0.0.0:0")


def test_parse_listen_forms() -> None:
    """Listen addresses may be host:port, [v6]:port or a bare port (meaning 127.0.0.1)."""
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="host:port"):
        parse_listen("localhost:http")


def test_metrics_are_separate_from_the_global_registry() -> None:
    """Two Metrics objects (e.g. in tests or after a reload) never collide."""
    Metrics().file_done("failed")
    assert (
        Metrics().registry.get_sample_value("tripo_watchd_files_total", {"outcome": "failed"}) == 0
    )


def test_retry_reasons_are_bounded() -> None:
    """Many distinct retry reasons collapse into "other" instead of growing without end."""
    metrics = Metrics()
    for n in range(30):
        metrics.retry(f"reason{n}")
    assert (
        metrics.registry.get_sample_value("tripo_watchd_retries_total", {"reason": "other"}) == 10
    )


def test_outcome_of_records_and_null_metrics() -> None:
    """Records map to outcomes, and NullMetrics accepts the same calls doing nothing."""
    assert outcome_of(Record(path="/a", status="uploaded")) == "uploaded"
    assert outcome_of(Record(path="/a", status="uploaded", duplicate_of="/b")) == "duplicate"
    assert outcome_of(Record(path="/a", status="failed")) == "failed"
    null = NullMetrics()
    null.file_done("uploaded", 1, 1.0)
    null.token_request(1.0)
    null.retry("x")
    null.set_queue(1, 1)
    null.set_auth(True)
