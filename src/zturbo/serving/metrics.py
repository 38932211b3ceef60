"""Prometheus metrics of one server, in a registry of its own (never the process-global default)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import jobs

if TYPE_CHECKING:
    from .service import Service
    from .workers import BatchSeconds, Finished

# The worker label that a departed worker's counts move to (`WorkerCounters.depart`).
DEPARTED = "departed"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter("zturbo_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.rejected = Counter("zturbo_jobs_rejected", "Submissions refused because the queue was full", registry=r)
        self.completed = Counter("zturbo_jobs_finished", "Jobs that ended, by final state", ["status"], registry=r)
        for status in jobs.FINISHED:  # each state's series from the start: a rate or a delta needs no first job
            self.completed.labels(status)
        self.restarts = WorkerCounters("zturbo_worker_restarts", "Worker process restarts", ["worker"])
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
        self.worker_seconds = WorkerCounters(
            "zturbo_worker_seconds",
            "Seconds each worker spent, by phase: engine (in the engine's calls), host (its own work between "
            "them), idle (waiting for a batch), warmup (deferred warm-up parts after ready); engine over the sum "
            "is the share of time the GPU had jobs' work",
            ["worker", "phase"],
        )
        self.stage_seconds = WorkerCounters(
            "zturbo_engine_stage_seconds",
            "Seconds of each worker's engine calls by the engine's own stages (encode_s, inputs_s, "
            "denoise_decode_s, lora_s; host clocks, so a stage's GPU work may show in the next one's)",
            ["worker", "stage"],
        )
        r.register(_LiveCollector(service, (self.restarts, self.worker_seconds, self.stage_seconds)))
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
            self.worker_seconds.inc((worker, phase), getattr(seconds, phase))
        for stage, value in seconds.stages.items():
            self.stage_seconds.inc((worker, stage), value)

    def restarted(self, worker: str, reason: str) -> None:
        self.restarts.inc((worker,))

    def departed(self, worker: str) -> None:
        """`worker` will not come back (a Ray replica whose lease ended): its counts move to DEPARTED."""
        for counters in (self.restarts, self.worker_seconds, self.stage_seconds):
            counters.depart(worker)

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


class WorkerCounters:
    """Counters labelled first by worker. A departed worker's counts move to the worker DEPARTED, so
    the sum over workers never goes down while the series stay as few as the live workers: a Ray
    deployment's replicas come and go under new names, and a series for every name ever seen would
    grow without bound."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def depart(self, worker: str) -> None:
        if worker == DEPARTED:
            return
        with self._lock:
            for labels in [k for k in self._values if k[0] == worker]:
                moved = (DEPARTED, *labels[1:])
                self._values[moved] = self._values.get(moved, 0.0) + self._values.pop(labels)

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        with self._lock:
            for labels, value in self._values.items():
                family.add_metric(list(labels), value)
        return family


class _LiveCollector:
    """Values read at scrape time: queue depth, jobs by state, workers, GPU memory, LoRAs, and the
    counters by worker."""

    def __init__(self, service: Service, counters: tuple[WorkerCounters, ...] = ()) -> None:
        self.service = service
        self.counters = counters

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
        for counters in self.counters:
            yield counters.family()


def _lora_families(by_worker: dict[str, dict[str, float]]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    for entry, name, doc, counter in LORA_METRICS:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["worker"])
        for worker, stats in by_worker.items():
            if counter or worker != DEPARTED:  # a departed worker holds no memory
                family.add_metric([worker], stats.get(entry, 0.0))
        yield family
