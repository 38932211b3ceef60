"""Prometheus metrics of one server, in a registry of its own (never the process-global default)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import jobs

if TYPE_CHECKING:
    from .service import Service
    from .workers import BatchSeconds, Finished

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter("zturbo_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.rejected = Counter("zturbo_jobs_rejected", "Submissions refused because the queue was full", registry=r)
        self.completed = Counter("zturbo_jobs_finished", "Jobs that ended, by final state", ["status"], registry=r)
        self.restarts = Counter("zturbo_worker_restarts", "Worker process restarts", ["worker"], registry=r)
        self.by_mode = Counter(
            "zturbo_jobs_by_mode",
            "Jobs accepted, by mode (txt2img, img2img, inpaint, outpaint) and whether a control image guides them",
            ["mode", "controlled"],
            registry=r,
        )
        self.fallbacks = Counter("zturbo_fallbacks", "Precision or memory-plan fallbacks taken by jobs", registry=r)
        self.run_seconds = Histogram(
            "zturbo_job_run_seconds", "Seconds a worker spent on a job", buckets=LATENCY_BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "zturbo_job_queue_seconds", "Seconds from submission to the last start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.total_seconds = Histogram(
            "zturbo_job_latency_seconds", "Seconds from submission to the end", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "zturbo_batch_images", "Images per batch a worker ran on its GPU", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_jobs = Histogram(
            "zturbo_batch_jobs", "Jobs per batch a worker ran on its GPU", buckets=BATCH_BUCKETS, registry=r
        )
        self.worker_seconds = Counter(
            "zturbo_worker_seconds",
            "Seconds each worker spent, by phase: engine (in the engine's calls), host (its own work between "
            "them), idle (waiting for a batch), warmup (deferred warm-up parts after ready); engine over the sum "
            "is the share of time the GPU had jobs' work",
            ["worker", "phase"],
            registry=r,
        )
        r.register(_LiveCollector(service))
        self._run_sum = 0.0
        self._run_count = 0

    def finished(self, job: jobs.Job, msg: Finished) -> None:
        self.completed.labels(job.status).inc()
        self.fallbacks.inc(msg.fallbacks)
        if job.status == jobs.SUCCEEDED and job.started_at and job.finished_at:
            self.run_seconds.observe(msg.seconds)
            self._run_sum += msg.seconds
            self._run_count += 1
            self.wait_seconds.observe(job.started_at - job.created_at)
        if job.finished_at:
            self.total_seconds.observe(job.finished_at - job.created_at)

    def submitted_mode(self, mode: str, controlled: bool) -> None:
        self.by_mode.labels(mode, "true" if controlled else "false").inc()

    def cancelled_queued(self) -> None:
        self.completed.labels(jobs.CANCELLED).inc()

    def batched(self, job_count: int, images: int) -> None:
        self.batch_jobs.observe(job_count)
        self.batch_images.observe(images)

    def worker_time(self, worker: str, seconds: BatchSeconds) -> None:
        for phase in ("engine", "host", "idle", "warmup"):
            self.worker_seconds.labels(worker, phase).inc(getattr(seconds, phase))

    def restarted(self, worker: str, reason: str) -> None:
        self.restarts.labels(worker).inc()

    def average_job_seconds(self) -> float:
        return self._run_sum / self._run_count if self._run_count else 1.0

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The LoRA numbers each worker reports with every finished job (workers._lora_stats):
# (entry, metric name, help, counter?). Counters sum over a worker's restarts.
LORA_METRICS = (
    ("switches", "zturbo_lora_switches", "LoRA set changes merged into the transformer's weights", True),
    ("switch_seconds", "zturbo_lora_switch_seconds", "Seconds spent changing LoRA sets (sum; count: switches)", True),
    ("backup_bytes", "zturbo_lora_backup_bytes", "Bytes of base weights kept to undo the merged LoRAs", False),
    ("cache_hits", "zturbo_lora_cache_hits", "LoRA loads served by the parsed-LoRA cache", True),
    ("cache_misses", "zturbo_lora_cache_misses", "LoRA loads that read and parsed the file", True),
    ("cache_bytes", "zturbo_lora_cache_bytes", "Host bytes of parsed LoRAs held in the cache", False),
)


class _LiveCollector:
    """Values read at scrape time: queue depth, jobs by state, workers, GPU memory, LoRAs."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.service.store.counts()
        depth = GaugeMetricFamily("zturbo_queue_depth", "Jobs waiting in the queue")
        depth.add_metric([], counts[jobs.QUEUED])
        yield depth
        by_state = GaugeMetricFamily("zturbo_jobs", "Jobs in the database by state", labels=["state"])
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        workers = GaugeMetricFamily("zturbo_workers", "Worker processes by state", labels=["state"])
        states: dict[str, int] = {s: 0 for s in ("starting", "ready", "busy", "restarting", "stopped")}
        for w in self.service.supervisor.workers():
            states[w["state"]] = states.get(w["state"], 0) + 1
        for state, n in states.items():
            workers.add_metric([state], n)
        yield workers
        memory = GaugeMetricFamily("zturbo_gpu_memory_bytes", "GPU memory per worker", labels=["worker", "kind"])
        for worker, stats in self.service.supervisor.memory_by_worker().items():
            for kind, value in stats.items():
                memory.add_metric([worker, kind.removesuffix("_bytes")], value)
        yield memory
        yield from _lora_families(self.service.supervisor.loras_by_worker())


def _lora_families(by_worker: dict[str, dict[str, float]]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    for entry, name, doc, counter in LORA_METRICS:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["worker"])
        for worker, stats in by_worker.items():
            family.add_metric([worker], stats.get(entry, 0.0))
        yield family
