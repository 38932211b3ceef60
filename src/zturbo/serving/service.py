"""The service behind the HTTP API: the job queue, the worker supervisor and the metrics of one
running server, and the settings `zturbo serve` decides before it starts.

Nothing here imports the web framework: `zturbo serve` makes and starts the service (its workers
begin loading the model) before it imports FastAPI and builds the routes around it (app.py).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_LORA_CACHE_BYTES, SERVE_MAX_BATCH, SERVE_MAX_BATCH_PIXELS, RuntimeConfig
from ..request import IMAGE_FIELDS, LIMITS, GenerateRequest, ModelLimits
from . import jobs
from .stores import DEFAULT_STORE, open_store
from .workers import Finished, Hooks, Supervisor

log = logging.getLogger("zturbo.server")

PART_OVERHEAD_BYTES = 1024  # a multipart part's boundary and headers
# History reads running at once: a search reads every finished job (0.6 s over 30,000 jobs of
# 4,000-character prompts on 2 cores), and 40 at once held every worker thread for 36 s.
HISTORY_SLOTS = 2


@dataclass
class ServeSettings:
    """Everything `zturbo serve` decides before the app starts."""

    config: RuntimeConfig
    data_dir: Path
    devices: list[str]
    limits: ModelLimits
    api_key: str | None = None
    # The job queue (`stores.check_store`): "sqlite", a file in data_dir, or a postgresql:// URL.
    store: str = DEFAULT_STORE
    node_lease_s: float | None = None  # a shared store's node lease (None: its default)
    queue_size: int = 64
    job_timeout: float = 600.0
    shutdown_grace: float = 30.0
    sync_timeout: float = 600.0  # longest the OpenAI and A1111 routes wait for their job before answering 504
    # Transport bounds, not request limits: a full job body (two 4000-character prompts, 64 seeds)
    # is well under 100 KB even JSON-escaped; larger bodies get 413, larger headers 431.
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    max_upload_bytes: int = 64 << 20  # one web UI upload: a PNG to read parameters from (4 MP: ~12 MB)
    max_input_bytes: int = LIMITS.input_bytes  # one input image of a job, as uploaded (the table's limit)
    # Host names a server without a key answers besides loopback ones ("*": any); see app._install_host_check.
    allowed_hosts: tuple[str, ...] = ()
    model_names: tuple[str, ...] = field(default=())
    # Where job LoRA names resolve (None: <data_dir>/loras, made if missing); host memory each
    # worker keeps for parsed LoRAs; the served transformer's linears, which a LoRA must map onto
    # (None: the published Z-Image-Turbo's).
    lora_dir: Path | None = None
    lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES
    lora_targets: Callable[[], Mapping[str, tuple[int, int]]] | None = None
    # The A1111 routes' --client-defaults: "turbo" runs Turbo's steps and CFG for SD's defaults, "honour" as sent.
    client_defaults: str = "turbo"
    # Batching: most images and most pixels one batch makes, and how long a free worker waits for a
    # companion of a lone waiting job (docs/server.md, "Batching").
    max_batch: int = SERVE_MAX_BATCH
    max_batch_pixels: int = SERVE_MAX_BATCH_PIXELS
    batch_window_ms: float = 2.0

    @property
    def max_image_body_bytes(self) -> int:
        """The largest body a route taking images reads: the rest of the body plus every image field at
        its limit, in base64 (4 characters for 3 bytes, the larger of JSON's and multipart's forms)."""
        per_image = 4 * -(-self.max_input_bytes // 3) + PART_OVERHEAD_BYTES
        return self.max_body_bytes + len(IMAGE_FIELDS) * per_image


# Makes what runs the jobs from the store, the workers' config and the hooks: the Supervisor of this
# machine's worker processes by default, or a Ray deployment's dispatcher (raydeploy.RayDispatcher).
Dispatcher = Callable[[Any, RuntimeConfig, Hooks], Any]


def worker_config(settings: ServeSettings) -> RuntimeConfig:
    """The config the workers load the model with: they resolve LoRA names in the server's directory,
    and never take a path."""
    lora_dir = settings.lora_dir or settings.data_dir / "loras"
    return dataclasses.replace(
        settings.config, lora_dir=str(lora_dir), lora_paths=False, lora_cache_bytes=settings.lora_cache_bytes
    )


class Service:
    """The queue, the workers and the metrics of one running server."""

    def __init__(self, settings: ServeSettings, dispatcher: Dispatcher | None = None) -> None:
        from .loras import ServerLoras
        from .metrics import Metrics

        self.settings = settings
        self.images_dir = settings.data_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        lora_dir = settings.lora_dir or settings.data_dir / "loras"
        lora_dir.mkdir(parents=True, exist_ok=True)
        config = worker_config(settings)
        self.loras = ServerLoras(lora_dir, settings.lora_targets or _published_targets)
        self.store = open_store(
            settings.store, settings.data_dir, max_queued=settings.queue_size, lease_s=settings.node_lease_s
        )
        self.events = jobs.JobEvents()
        self.history_slots = asyncio.Semaphore(HISTORY_SLOTS)  # history pages and searches read at once
        self.metrics = Metrics(self)
        hooks = Hooks(
            on_event=self._on_event,
            on_finished=self._on_finished,
            on_restart=self.metrics.restarted,
            on_batch=self.metrics.batched,
            on_seconds=self.metrics.worker_time,
            on_gone=self.metrics.departed,
        )
        make = dispatcher or self._local_workers
        self.supervisor = make(self.store, config, hooks)
        self.stopping = threading.Event()  # set when shutdown begins: event streams end
        self._started = self._stopped = False

    def _local_workers(self, store: Any, config: RuntimeConfig, hooks: Hooks) -> Supervisor:
        s = self.settings
        return Supervisor(store, config, s.devices, s.data_dir, job_timeout=s.job_timeout, hooks=hooks,
                          max_batch=s.max_batch, max_batch_pixels=s.max_batch_pixels,
                          batch_window=s.batch_window_ms / 1000)  # fmt: skip

    def start(self) -> None:
        """Recover the queue and start the workers; once (`zturbo serve` starts them before it
        imports the web framework, so that they load while the routes, the UI and uvicorn come up;
        the lifespan then finds them started)."""
        if self._started:
            return
        self._started = True
        for job in self.store.recover():
            log.info("recovered job %s: %s (attempt %d)", job.id, job.status, job.attempts)
        swept = self.store.sweep_inputs()
        if swept:
            log.info("removed %d stored input files no job refers to", swept)
        self.supervisor.start()

    def begin_stop(self) -> None:
        """Shutdown has begun: no job starts from now on, and event streams end within a second."""
        self.stopping.set()
        self.supervisor.stop_dispatch()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.begin_stop()
        self.supervisor.stop(self.settings.shutdown_grace)
        self.store.close()

    def _on_event(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        self.events.publish(job_id, event, data)

    def _on_finished(self, msg: Finished) -> None:
        job = self.store.get(msg.job_id)
        self.metrics.finished(job, msg)
        self.events.publish(msg.job_id, "finished", {"status": job.status})

    def submit(self, request: GenerateRequest, job_id: str, client: str | None, *, preview: bool = False) -> jobs.Job:
        """Queue a request whose LoRAs exist and fit the model (a 400 now, not a failed job later);
        `preview`: its progress events carry previews."""
        self.loras.check(request.loras)
        try:
            job = self.store.submit(request, job_id=job_id, client=client, preview=preview)
        except jobs.QueueFullError as e:
            self.metrics.rejected.inc()
            e.retry_after = self.retry_after()
            raise
        self.metrics.submitted.inc()
        self.metrics.submitted_mode(request.inputs.mode, request.inputs.controlled)
        self.supervisor.wake()
        return job

    def cancel(self, job_id: str) -> jobs.Job:
        """Cancel a job (`QueueStore.cancel`): a queued one is finished now and its waiters told."""
        job = self.store.cancel(job_id)
        if job.finished:
            self.metrics.cancelled_queued()
            self.events.publish(job_id, "finished", {"status": job.status})
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one average job, spread over the workers."""
        workers = max(1, len(self.settings.devices))
        return max(1, min(300, math.ceil(self.metrics.average_job_seconds() / workers)))

    def preview(self, job_id: str) -> str | None:
        """The running job's latest preview as base64 JPEG, if it asked for previews."""
        data = self.supervisor.preview(job_id)
        return base64.b64encode(data).decode() if data else None

    def sign(self, image_id: str, expires: int) -> str:
        key = (self.settings.api_key or "").encode()
        return hmac.new(key, f"{image_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def _published_targets() -> Mapping[str, tuple[int, int]]:
    from ..adapters.formats import published_targets

    return published_targets()
