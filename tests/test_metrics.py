"""The Prometheus metrics of one server, rendered without a server around them."""

from __future__ import annotations

import re
from types import SimpleNamespace

from zturbo.serving import jobs
from zturbo.serving.metrics import Metrics


def idle_service() -> SimpleNamespace:
    """What the scrape-time collector reads, for a server with no jobs and no workers."""
    store = SimpleNamespace(counts=lambda: dict.fromkeys(jobs.STATES, 0))
    supervisor = SimpleNamespace(workers=list, memory_by_worker=dict, loras_by_worker=dict)
    return SimpleNamespace(store=store, supervisor=supervisor)


def finished_series(metrics: Metrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    found = re.findall(r'^zturbo_jobs_finished_total\{status="(\w+)"\} (\S+)$', text, re.M)
    return {status: float(value) for status, value in found}


def test_every_final_state_has_its_series_before_any_job_ends():
    metrics = Metrics(idle_service())
    assert finished_series(metrics) == dict.fromkeys(jobs.FINISHED, 0.0)
    metrics.cancelled_queued()
    assert finished_series(metrics) == {jobs.SUCCEEDED: 0.0, jobs.FAILED: 0.0, jobs.CANCELLED: 1.0}
