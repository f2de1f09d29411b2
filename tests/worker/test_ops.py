"""The worker's ops endpoint: real HTTP over 127.0.0.1, scraped and parsed as Prometheus does."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from lightning_lora.worker.ops import OpsServer, WorkerMetrics, serve_ops

P = "lightning_lora_worker"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> WorkerMetrics:
    return WorkerMetrics(clock=clock)


@pytest.fixture
def server(metrics: WorkerMetrics) -> Iterator[OpsServer]:
    srv = serve_ops(metrics, host="127.0.0.1", port=0, ready=lambda: True)
    try:
        yield srv
    finally:
        srv.stop()


def scrape(server: OpsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    response = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_move_after_job_events(server: OpsServer, metrics: WorkerMetrics) -> None:
    before = scrape(server)
    assert value(before, f"{P}_jobs_started_total") == 0
    assert value(before, f"{P}_jobs_completed_total") == 0
    assert value(before, f"{P}_jobs_requeued_total") == 0

    for _ in range(3):
        metrics.job_started()
    metrics.job_completed(120.0)
    metrics.job_requeued(30.0)
    after = scrape(server)
    assert value(after, f"{P}_jobs_started_total") == 3
    assert value(after, f"{P}_jobs_completed_total") == 1
    assert value(after, f"{P}_jobs_requeued_total") == 1


def test_failed_jobs_are_counted_by_code(server: OpsServer, metrics: WorkerMetrics) -> None:
    metrics.job_failed("INVALID_MESSAGE", 0.1)
    metrics.job_failed("DOWNLOAD_FAILED", 3.0)
    metrics.job_failed("DOWNLOAD_FAILED", 4.0)
    metrics.job_failed("", 1.0)
    samples = scrape(server)
    assert value(samples, f"{P}_jobs_failed_total", code="INVALID_MESSAGE") == 1
    assert value(samples, f"{P}_jobs_failed_total", code="DOWNLOAD_FAILED") == 2
    assert value(samples, f"{P}_jobs_failed_total", code="UNKNOWN") == 1


def test_duration_histogram_counts_per_outcome(server: OpsServer, metrics: WorkerMetrics) -> None:
    metrics.job_completed(90.0)
    metrics.job_completed(5000.0)
    metrics.job_failed("TRAINING_FAILED", 2.0)
    samples = scrape(server)
    name = f"{P}_job_duration_seconds"
    assert value(samples, f"{name}_count", outcome="completed") == 2
    assert value(samples, f"{name}_sum", outcome="completed") == pytest.approx(5090.0)
    assert value(samples, f"{name}_bucket", outcome="completed", le="120.0") == 1
    assert value(samples, f"{name}_bucket", outcome="completed", le="7200.0") == 2
    assert value(samples, f"{name}_count", outcome="failed") == 1
    assert value(samples, f"{name}_bucket", outcome="failed", le="5.0") == 1


def test_progress_and_outbox_gauges(server: OpsServer, metrics: WorkerMetrics) -> None:
    metrics.job_started()
    metrics.set_progress(0.25)
    metrics.set_outbox_pending(3)
    samples = scrape(server)
    assert value(samples, f"{P}_job_progress") == 0.25
    assert value(samples, f"{P}_webhooks_pending") == 3
    metrics.set_progress(7.0)
    assert value(scrape(server), f"{P}_job_progress") == 1.0
    metrics.job_completed(10.0)  # idle again
    metrics.set_outbox_pending(0)
    samples = scrape(server)
    assert value(samples, f"{P}_job_progress") == 0.0
    assert value(samples, f"{P}_webhooks_pending") == 0


def test_broker_age_grows_with_time_since_seen(
    server: OpsServer, metrics: WorkerMetrics, clock: FakeClock
) -> None:
    name = f"{P}_broker_last_seen_age_seconds"
    assert math.isinf(value(scrape(server), name))  # never seen
    metrics.broker_seen()
    assert value(scrape(server), name) == 0.0
    clock.now += 42.5
    assert value(scrape(server), name) == 42.5
    assert metrics.broker_seen_within(60.0) and not metrics.broker_seen_within(30.0)
    metrics.broker_seen()
    assert value(scrape(server), name) == 0.0


def test_readyz_follows_the_ready_check(metrics: WorkerMetrics, clock: FakeClock) -> None:
    connected = {"value": False}

    def ready() -> bool | tuple[bool, str]:
        if not connected["value"]:
            return False, "consumer not connected"
        return metrics.broker_seen_within(60.0)

    with serve_ops(metrics, port=0, ready=ready) as srv:
        url = f"http://127.0.0.1:{srv.port}/readyz"
        response = requests.get(url, timeout=5)
        assert response.status_code == 503 and response.text == "consumer not connected\n"
        assert value(scrape(srv), f"{P}_ready") == 0
        connected["value"] = True
        response = requests.get(url, timeout=5)
        assert response.status_code == 503 and response.text == "not ready\n"  # never seen
        metrics.broker_seen()
        response = requests.get(url, timeout=5)
        assert response.status_code == 200 and response.text == "ready\n"
        assert value(scrape(srv), f"{P}_ready") == 1
        clock.now += 61
        assert requests.get(url, timeout=5).status_code == 503
        assert requests.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5).status_code == 200


def test_readyz_is_503_when_the_check_raises(metrics: WorkerMetrics) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    with serve_ops(metrics, ready=broken) as srv:
        response = requests.get(f"http://127.0.0.1:{srv.port}/readyz", timeout=5)
        assert response.status_code == 503
        assert "RuntimeError" in response.text
        assert value(scrape(srv), f"{P}_ready") == 0  # the scrape itself still works


def test_healthz_and_unknown_paths(server: OpsServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    response = requests.get(f"{base}/healthz", timeout=5)
    assert response.status_code == 200 and response.text == "ok\n"
    for path in ("/", "/metricsx", "/favicon.ico", "/healthz/extra"):
        assert requests.get(f"{base}{path}", timeout=5).status_code == 404, path
    assert requests.get(f"{base}/metrics?name[]=x", timeout=5).status_code == 200


def test_openmetrics_is_served_when_asked(server: OpsServer, metrics: WorkerMetrics) -> None:
    metrics.job_failed("DOWNLOAD_FAILED", 3.0)
    response = requests.get(
        f"http://127.0.0.1:{server.port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(response.text)}
    (sample,) = [s for s in families[f"{P}_jobs_failed"].samples if s.name.endswith("_total")]
    assert sample.labels == {"code": "DOWNLOAD_FAILED"} and sample.value == 1


def test_each_metrics_object_has_its_own_registry(clock: FakeClock) -> None:
    first, second = WorkerMetrics(clock=clock), WorkerMetrics(clock=clock)
    first.job_started()
    with serve_ops(first) as a, serve_ops(second) as b:
        assert a.port != b.port
        assert value(scrape(a), f"{P}_jobs_started_total") == 1
        assert value(scrape(b), f"{P}_jobs_started_total") == 0


def test_stop_closes_the_port(metrics: WorkerMetrics) -> None:
    srv = serve_ops(metrics)
    url = f"http://127.0.0.1:{srv.port}/healthz"
    assert requests.get(url, timeout=5).status_code == 200
    srv.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    srv.stop()  # idempotent
