"""Supervised worker processes: one per device, each owning its Engine; restarted with backoff.

The supervisor thread (in the server process) is the only dispatcher: when a worker's GPU is free,
or about to be, it claims the next queued job, with the waiting jobs that can share its batch
(`JobStore.claim_batch`), and sends them over that worker's pipe. The worker runs them as one batch
(or, where its free GPU memory holds fewer images, the first jobs that fit, giving the rest back:
`BatchRoom`) and hands the images to its writer thread, which encodes and writes them (named from the
job id and image index, so a re-run overwrites the same files) and then marks each job done in SQLite
with its claim's token, so a job is done exactly once and only once its files are durable. Meanwhile
the worker tells the supervisor that its GPU is free and runs the next batch, already in its pipe:
the supervisor sends a busy worker its next batch when the running one reports its last denoising
step (`WorkerSlot.waiting`), so the GPU never waits for the supervisor, and jobs that arrive while a
batch runs still join the next one. A worker that dies has every job it holds released: queued
again, or failed after `jobs.MAX_ATTEMPTS` attempts. The jobs of a batch of several that crashes,
runs out of memory or runs past the time limit are queued again to run alone, so one bad job fails
only itself; a job that runs past the time limit alone fails at once (not retried: it would time
out again). The time limit counts the GPU work only, from the worker's `Started` to its
`GpuFree`; a job's images then get the same time again to be written and recorded.

A worker reports `Ready` once its engine's text-to-image path is warm; the warm-up parts it put off
(`Engine.pending_warmups`) run one at a time between batches, only while no batch waits in its
pipe (`IdleWarmups`), and it reports their seconds once all have run (`Warmed`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import functools
import logging
import multiprocessing as mp
import os
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, TypeVar

from ..config import SERVE_MAX_BATCH, SERVE_MAX_BATCH_PIXELS, RuntimeConfig
from ..errors import StorageError
from . import jobs
from .stores import QueueStore, open_store

log = logging.getLogger("zturbo.workers")
T = TypeVar("T")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a worker up this long without dying resets its backoff
# Batches whose images wait for the writer beyond the one being written: the GPU runs ahead by at
# most this much, and the worker blocks rather than hold more images in memory.
WRITER_DEPTH = 1
CRASH_DRAIN_S = 30.0  # the most a crashing worker spends writing the results it already made
REQUEUE = "requeue"  # an Outcome's status: the job goes back to the queue to run alone (`_requeue_solo`)
# The largest pickled batch the supervisor leaves in a busy worker's pipe: within the smallest
# socket buffer of the platforms served (8 KiB on macOS), so the send never blocks the supervisor
# while the worker still runs the batch before it. A larger one is sent when that batch's GPU is free.
PIPE_ROOM = 8192
# How long a worker's pipe must stay empty before it starts a deferred warm-up part (`serve_batches`).
WARMUP_PAUSE_S = 0.5
# A job's end that the store refuses (an outage, a full disk) is tried again after each of these
# waits (15.5 s in all, well within a job's time limit for writing), then given back to the
# supervisor to queue again (`Unrecorded`).
RECORD_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# The supervisor logs a store it cannot reach at most this often, and tries again to queue the
# unrecorded jobs at most this often.
STORE_FAULT_LOG_S = 30.0
RELEASE_RETRY_S = 2.0
# `Finished.loras` entries that count up over a worker process's life (the rest are gauges).
LORA_COUNTERS = ("switches", "switch_seconds", "cache_hits", "cache_misses")


# --- messages: worker -> supervisor -------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The worker's engine is loaded and its main path warm: it takes jobs from now on."""

    runtime: dict[str, Any]
    memory: dict[str, int] | None
    # Seconds from the worker process's start to ready; its phases (load_s, warmup_s) and
    # whether compiled artifacts were reused (compile_cache: hit, miss or off).
    ready_s: float | None = None
    startup: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Warmed:
    """The worker has run the warm-up parts it put off until after Ready (`IdleWarmups`): each
    part's seconds, why any failed, and the worker process's age then (None where unknown)."""

    parts: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)
    warm_s: float | None = None


@dataclass(frozen=True)
class Warming:
    """The worker begins the deferred warm-up part `part` (`IdleWarmups`), or (None) has ended the
    one it ran: a batch sent meanwhile waits for it, and the time limit watches that wait."""

    part: str | None


@dataclass(frozen=True)
class Started:
    """The worker has read the job and begins it: from here on, its death costs the job an attempt."""

    job_id: str


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    steps: int
    preview: bytes | None = None  # a small JPEG of the job's first image at this step, when it asked


@dataclass(frozen=True)
class GpuFree:
    """The worker's GPU is done with these jobs (their images are with the writer): send the next batch.
    `images` and `ran`: the images and jobs that ran on the GPU (None: every job of `job_ids`), for
    the batch metrics; a job cancelled before the batch began, or whose request could not be read,
    is among `job_ids` but did not run."""

    job_ids: tuple[str, ...]
    images: int
    ran: int | None = None
    seconds: BatchSeconds | None = None


@dataclass(frozen=True)
class BatchSeconds:
    """Where a worker's time went since its last GpuFree, for the GPU-busy metrics: `engine` in the
    engine's call (the GPU's work and the host's share of it), `host` in the worker's own work
    around it (reading the requests, the room check, splitting the images, handing the previous
    batch to a full writer), `idle` waiting for this batch to arrive."""

    engine: float
    host: float
    idle: float
    warmup: float = 0.0  # deferred warm-up parts run between batches (`IdleWarmups`)
    # `engine` by the engine's own stages (`GenerateResult.timings`: encode_s, denoise_decode_s, ...).
    stages: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchRoom:
    """The worker's free GPU memory holds only `images` images of this batch key's shape: it runs
    the batch's first jobs that fit and gives `returned` back, for the supervisor to queue again in
    their place (no attempt counted; they may batch again). Later claims for the key ask for at
    most `images` images on this worker, until it reports a larger room (with nothing returned)
    or restarts."""

    batch_key: str
    images: int
    returned: tuple[str, ...]


@dataclass(frozen=True)
class Finished:
    job_id: str
    status: str  # succeeded | failed | cancelled
    seconds: float
    fallbacks: int = 0
    memory: dict[str, int] | None = None
    loras: dict[str, float] | None = None  # the worker's LoRA numbers so far (`_lora_stats`)


@dataclass(frozen=True)
class Unrecorded:
    """The worker made the job's outcome but the store would not record it (RECORD_RETRY_S): the
    row is still `running` on this claim; the supervisor queues it again, its attempt not counted."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Crashed:
    """The worker hit an error that may have broken its device (e.g. a CUDA fault), or its writer
    failed; it exits next. `job_ids`: the batch it was running (or writing)."""

    job_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Released:
    """The worker gave a job back to the queue itself (its batch ran out of memory; it runs alone
    next): `status` as `JobStore.release` left it, None when the claim was stale."""

    job_id: str
    status: str | None
    attempts: int
    reason: str


# --- the worker process ------------------------------------------------------------------------


class JobCancelled(Exception):
    pass


class Channel:
    """The worker's end of its pipe, shared by the job loop and the writer thread: one send at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self.conn.send(message)


@dataclass
class Outcome:
    """How one job of a batch ended on the GPU; the writer makes it durable and reports it."""

    claim: jobs.Claim
    status: str
    images: list[Any] = field(default_factory=list)
    error: dict[str, str] | None = None
    output_format: str = "png"
    compression: int | None = None


@dataclass
class BatchDone:
    """A batch's outcomes and what the worker reports with each job's end."""

    outcomes: list[Outcome]
    start: float
    fallbacks: int = 0
    memory: dict[str, int] | None = None
    loras: dict[str, float] | None = None
    engine_s: float = 0.0  # in the engine's call
    stages: dict[str, float] = field(default_factory=dict)  # the engine's timings of that call


class BatchClock:
    """A worker's account of its time between two GpuFree messages (`BatchSeconds`)."""

    def __init__(self) -> None:
        self.since = time.perf_counter()
        self.idle = 0.0
        self.warmup = 0.0

    def wait(self, conn: Connection) -> Any:
        """`conn.recv()`, its wait counted as idle."""
        return self.idling(conn.recv)

    def idling(self, work: Callable[[], T]) -> T:
        """`work()`, its time counted as idle: a wait for a batch."""
        return self._counted("idle", work)

    def warming(self, work: Callable[[], T]) -> T:
        """`work()`, its time counted as a deferred warm-up's."""
        return self._counted("warmup", work)

    def _counted(self, phase: str, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return work()
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)

    def rested(self, since: float) -> None:
        """Count the time from `since` (a `time.perf_counter()`) to now as idle: a wait for work that
        is not a `wait` (a Ray replica's, between its requests)."""
        self.idle += max(0.0, time.perf_counter() - since)

    def take(self, engine_s: float, stages: dict[str, float] | None = None) -> BatchSeconds:
        """The account since the last `take`, of which `engine_s` went to the engine (by its `stages`);
        starts the next."""
        now = time.perf_counter()
        host = max(0.0, now - self.since - self.idle - self.warmup - engine_s)
        split = {name: round(value, 6) for name, value in (stages or {}).items()}
        seconds = BatchSeconds(round(engine_s, 6), round(host, 6), round(self.idle, 6), round(self.warmup, 6), split)
        self.since, self.idle, self.warmup = now, 0.0, 0.0
        return seconds


def worker_main(
    worker_id: str,
    device: str,
    config: RuntimeConfig,
    store_location: str,
    data_dir: str,
    conn: Connection,
    skipped_warmups: Mapping[str, str] | None = None,
) -> None:
    """Entry point of a worker process: load, warm up the main path, report ready, then run batches
    until told to stop, and the rest of the warm-up while none waits (but `skipped_warmups`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"zturbo[{worker_id}]: %(message)s")
    engine, ready = load_engine(config, device, defer_warmup=True)
    store = open_store(store_location, Path(data_dir), check=False)  # the server checked it at startup
    channel = Channel(conn)
    channel.send(ready)
    # The writer has a connection of its own: its transactions and their fsyncs never hold up the
    # per-step cancel checks of the batch on the GPU.
    writer = Writer(open_store(store_location, Path(data_dir), check=False), Path(data_dir) / "images", channel)
    try:
        serve_batches(engine, store, conn, channel, writer, skipped_warmups)
    finally:
        writer.close()  # a graceful stop: the images already made are written and recorded


def serve_batches(
    engine: Any,
    store: QueueStore,
    conn: Connection,
    channel: Channel,
    writer: Writer,
    skipped_warmups: Mapping[str, str] | None = None,
) -> None:
    """Run the batches the supervisor sends until it says stop (None) or is gone. Whenever no batch
    waits in the pipe, the engine's next deferred warm-up part runs (`IdleWarmups`): a batch that
    arrives meanwhile runs before the part after it."""
    rooms: dict[str, int] = {}  # the rooms this process reported (`_within_room`)
    warmups = IdleWarmups(engine, channel, skipped_warmups)
    warmups.report_if_none_left()
    clock = BatchClock()
    while True:
        # A part starts only after a pause with no batch: the supervisor sends a large claimed batch
        # once it has read this worker's GpuFree, a moment after the pipe first reads empty.
        if warmups.pending() and not clock.idling(functools.partial(conn.poll, WARMUP_PAUSE_S)):
            clock.warming(warmups.run_next)
            continue
        try:
            claims = clock.wait(conn)
        except EOFError:
            return  # the supervisor is gone
        if claims is None:
            return
        for claim in claims:
            channel.send(Started(claim.job_id))
        run_batch(engine, store, claims, channel, writer, rooms, clock)


class IdleWarmups:
    """The warm-up parts the engine put off (`Engine.pending_warmups`), run one at a time between
    batches; once none is left, their seconds go to the supervisor (`Warmed`), once."""

    def __init__(self, engine: Any, channel: Channel, skipped: Mapping[str, str] | None = None) -> None:
        """`skipped`: parts not to run, each with why (one that overran the time limit in an earlier
        process of this worker); they are reported as failed."""
        self.engine, self.channel = engine, channel
        self.seconds: dict[str, float] = {}
        self.errors: dict[str, str] = dict(skipped or {})
        self.reported = False

    def pending(self) -> bool:
        return bool(self._names())

    def _names(self) -> list[str]:
        return [name for name in self.engine.pending_warmups() if name not in self.errors]

    def run_next(self) -> None:
        """Run the next pending part (each persists the compile cache); once none is left, report.
        A part that fails is logged and not tried again, and a request that needs it compiles then;
        but a device that no longer answers ends the process, as a crashed batch does (`_crash`),
        before any job can run on it."""
        name = self._names()[0]
        self.channel.send(Warming(name))
        try:
            self.seconds[name] = self.engine.finish_warmup(name)
        except Exception as e:
            logging.getLogger("zturbo").exception("the deferred warm-up %s failed", name)
            self.errors[name] = first_line(e)
            if not device_answers(self.engine.device):
                os._exit(3)
        self.channel.send(Warming(None))
        self.report_if_none_left()

    def report_if_none_left(self) -> None:
        """Report once no part is left to run, if any was put off (and so was run or skipped)."""
        if not self.reported and not self.pending() and (self.seconds or self.errors):
            self._report()

    def _report(self) -> None:
        self.reported = True
        warm_s = process_age()
        logging.getLogger("zturbo").info("fully warm in %s s: deferred warm-ups %s", warm_s, self.seconds)
        self.channel.send(Warmed(self.seconds, self.errors, warm_s))


def load_engine(config: RuntimeConfig, device: str, *, defer_warmup: bool = False) -> tuple[Any, Ready]:
    """The Engine on `device`, loaded and warmed up (all of its first-call costs paid unless
    `defer_warmup`), and its Ready report.
    `defer_warmup`: warm only what a first text-to-image request needs; the rest is left for
    `IdleWarmups` (`Engine.load`'s `defer_warmup`)."""
    from ..engine import Engine

    imported_s = process_age()  # the interpreter's start and the imports, before any loading
    engine = Engine.load(dataclasses.replace(config, device=device), defer_warmup=True)
    if not defer_warmup:  # every first-call cost paid before ready (a Ray replica)
        for name in engine.pending_warmups():
            engine.finish_warmup(name)
    engine.startup["phases"] = {"imports_s": imported_s, **engine.startup["phases"]}
    ready_s, startup = process_age(), engine.startup_report()
    logging.getLogger("zturbo").info("ready in %s s: %s", ready_s, startup)
    return engine, Ready(_runtime(engine), _memory(engine.device), ready_s, startup)


def run_batch(
    engine: Any,
    store: QueueStore,
    claims: list[jobs.Claim],
    channel: Channel,
    writer: Writer,
    rooms: dict[str, int] | None = None,
    clock: BatchClock | None = None,
) -> None:
    """Run `claims` as one batch on the engine, tell the supervisor the GPU is free, then hand the
    images to `writer` (blocking while it is full). A job whose stored request cannot be made
    fails alone, and one cancelled before the batch begins ends without running; the others run.
    `rooms`: the batch rooms this worker process reported so far (`_within_room`); `clock`: the
    worker's account of its time, reported with GpuFree."""
    from ..errors import ZTurboError

    start = time.perf_counter()
    outcomes, runnable = [], []
    cancelled = _cancels_requested(store, [claim.job_id for claim in claims])[0]  # while it waited for this GPU
    for claim in claims:
        if claim.job_id in cancelled:
            outcomes.append(Outcome(claim, jobs.CANCELLED))
            continue
        try:
            runnable.append((claim, jobs.stored_request(claim.params, engine.limits, store.inputs.resolve)))
        except ZTurboError as e:
            outcomes.append(Outcome(claim, jobs.FAILED, error={"type": e.kind, "message": str(e)}))
    runnable, returned = _within_room(engine, runnable, channel, rooms)
    done = BatchDone(outcomes, start)
    if runnable:
        done.outcomes += _generate(engine, store, runnable, writer, done)
    done.memory, done.loras = _memory(engine.device), _lora_stats(engine)
    for outcome in [o for o in done.outcomes if o.status == REQUEUE]:
        _requeue_solo(store, outcome, channel)  # told before GpuFree: the supervisor never resends a stale claim
    done.outcomes = [o for o in done.outcomes if o.status != REQUEUE]
    held = tuple(claim.job_id for claim in claims if claim.job_id not in returned)
    on_gpu = [claim for claim, _ in runnable]  # not those cancelled before it began or unreadable
    # GpuFree first: the batch's time limit stops with its GPU work, not after a wait for the writer.
    seconds = clock.take(done.engine_s, done.stages) if clock is not None else None
    channel.send(GpuFree(held, sum(claim.images for claim in on_gpu), len(on_gpu), seconds))
    writer.put(done)


def _within_room(
    engine: Any, runnable: list[tuple[jobs.Claim, Any]], channel: Channel, reported: dict[str, int] | None = None
) -> tuple[list[tuple[jobs.Claim, Any]], set[str]]:
    """The longest run of `runnable`'s first jobs whose images fit the engine's `batch_room` (the
    first job whatever its size), and the ids of the others, given back with a `BatchRoom` before
    any GPU work. The supervisor, not this worker, queues them again: it alone claims jobs, so no
    other worker can hold a claim of theirs before it has taken them from this one.

    `reported` keeps the room last reported per batch key: once memory frees up (a LoRA's copies
    gone, another process ended) a larger room is reported too, so a cap measured at a bad moment
    does not hold for the process's life."""
    if not runnable:
        return runnable, set()
    requests = [request for _, request in runnable]
    room = engine.batch_room(requests[0])  # in images of the shape the whole batch shares (`shared()`)
    images = sum(request.num_images for request in requests)
    key = runnable[0][0].batch_key
    reported = {} if reported is None else reported
    if room is None or room >= images:
        if room is not None and room > reported.get(key, room):
            channel.send(BatchRoom(key, room, ()))
            reported[key] = room
        return runnable, set()
    reported[key] = room
    kept, held = 1, requests[0].num_images
    while kept < len(requests) and held + requests[kept].num_images <= room:
        held += requests[kept].num_images
        kept += 1
    returned = tuple(claim.job_id for claim, _ in runnable[kept:])
    message = "free GPU memory holds %d of the batch's %d images: running %d of its %d jobs"
    logging.getLogger("zturbo").info(message, room, images, kept, len(runnable))
    channel.send(BatchRoom(key, room, returned))
    return runnable[:kept], set(returned)


def _cancels_requested(store: QueueStore, job_ids: list[str], *, quiet: bool = False) -> tuple[set[str], bool]:
    """Which of `job_ids` have a cancel requested, and whether the store answered: one it cannot
    reach now (a brief outage) reads as no cancel, rather than failing the batch; said once
    unless `quiet`."""
    try:
        return store.cancels_requested(job_ids), True
    except (StorageError, sqlite3.OperationalError) as e:
        if not quiet:
            logging.getLogger("zturbo").warning("cancels of %s not read; the batch goes on: %s", ", ".join(job_ids), e)
        return set(), False


def _requeue_solo(store: QueueStore, outcome: Outcome, channel: Channel) -> None:
    """Give a job of a batch that failed as a whole back to the queue, to run alone, its attempt
    not counted (the batch's size, not the job, failed)."""
    claim, reason = outcome.claim, (outcome.error or {}).get("message", "its batch failed")
    job = store.release(claim.job_id, claim.attempt, reason, count_attempt=False, solo=True)
    status, attempts = (job.status, job.attempts) if job is not None else (None, claim.attempt)
    channel.send(Released(claim.job_id, status, attempts, reason))


def _generate(
    engine: Any, store: QueueStore, runnable: list[tuple[jobs.Claim, Any]], writer: Writer, done: BatchDone
) -> list[Outcome]:
    """One engine run for every request of `runnable` (`GenerateRequest.combine`), its images split
    back per job; a refusal fails them all, except that a batch of several that runs out of memory
    has its jobs run alone (REQUEUE); any other error exits the worker (see `_crash`)."""
    from ..errors import GPUMemoryError, ZTurboError
    from ..request import GenerateRequest

    claims = [claim for claim, _ in runnable]
    requests = [request for _, request in runnable]
    combined = requests[0] if len(requests) == 1 else GenerateRequest.combine(requests)
    watch = BatchWatch(store, claims, [r.num_images for r in requests], writer.channel, engine.device)
    start = time.perf_counter()
    try:
        result = engine.generate(combined, on_step=watch.on_step, **watch.preview_arguments())
    except JobCancelled:
        return [Outcome(claim, jobs.CANCELLED) for claim in claims]
    except ZTurboError as e:  # a refusal (bad input, out of memory, storage): the engine is still sound
        status = REQUEUE if isinstance(e, GPUMemoryError) and len(claims) > 1 else jobs.FAILED
        if status == REQUEUE:  # even the engine's leaner plan could not fit this batch; each job alone may
            e = GPUMemoryError(f"its batch of {len(claims)} jobs ran out of GPU memory; it runs alone next ({e})")
        return [Outcome(claim, status, error={"type": e.kind, "message": str(e)}) for claim in claims]
    except Exception as e:  # anything else may have broken the device: report, exit, be restarted
        _crash(claims, e, writer)
    finally:
        done.engine_s = time.perf_counter() - start
    done.fallbacks, done.stages = len(result.fallbacks), dict(result.timings)
    outcomes, offset = [], 0
    for claim, request in runnable:
        images, offset = result.images[offset : offset + request.num_images], offset + request.num_images
        if claim.job_id in watch.cancelled:
            outcomes.append(Outcome(claim, jobs.CANCELLED))
            continue
        fmt, compression = request.output_format, request.output_compression
        outcomes.append(Outcome(claim, jobs.SUCCEEDED, images, output_format=fmt, compression=compression))
    return outcomes


def _crash(claims: list[jobs.Claim], error: Exception, writer: Writer) -> None:
    """Report the error and exit; the images of earlier batches (host memory, not the device's) are
    written and recorded first (for at most CRASH_DRAIN_S), so only the failed batch's jobs run again."""
    ids = tuple(claim.job_id for claim in claims)
    name = f"job {ids[0]}" if len(ids) == 1 else f"the batch of {len(ids)} jobs {', '.join(ids)}"
    logging.getLogger("zturbo").exception("%s crashed the worker", name)
    writer.close(timeout=CRASH_DRAIN_S)
    writer.channel.send(Crashed(ids, f"{name}: {first_line(error)}"))
    os._exit(3)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class BatchWatch:
    """The engine's per-step callbacks for one batch: progress (and previews) per job, the orphan
    check, and cancels. A cancelled job leaves the batch's result; when every job of the batch is
    cancelled the run stops."""

    def __init__(
        self, store: QueueStore, claims: list[jobs.Claim], counts: list[int], channel: Channel, device: Any = None
    ) -> None:
        from ..testing import step_sleep

        self.store, self.claims, self.counts, self.channel, self.device = store, claims, counts, channel, device
        self.cancelled: set[str] = set()
        self.unread = False  # a cancel check found the store unreachable (said once per batch)
        self.previews = False  # whether on_preview reports the progress of the jobs that asked for previews
        self.sleep = step_sleep()
        self.parent = os.getppid()

    def preview_arguments(self) -> dict[str, Any]:
        """`on_preview` for the engine, when a job of the batch asked for previews."""
        self.previews = any(claim.preview for claim in self.claims)
        return {"on_preview": self.on_preview} if self.previews else {}

    def on_step(self, i: int, n: int) -> None:
        if i == n:
            # The host queues steps ahead of the GPU, and the supervisor sends the next batch on
            # this step's progress: it waits for the GPU to run the step, as the check of the
            # latents after the loop would wait anyway.
            _settle(self.device)
        for claim in self.claims:
            if not (claim.preview and self.previews):
                self.channel.send(Progress(claim.job_id, i, n))
        if self.sleep:
            time.sleep(self.sleep)
        if os.getppid() != self.parent:
            os._exit(1)  # orphaned: the server died; its successor re-runs the jobs
        # A cancel stops a job after its current step, unless that step was the last: finished
        # steps make an image, and docs/api.md promises that image (a cancel then is too late).
        if i < n:
            ids = [c.job_id for c in self.claims if c.job_id not in self.cancelled]
            seen, answered = _cancels_requested(self.store, ids, quiet=self.unread)
            self.cancelled |= seen
            self.unread |= not answered
            if len(self.cancelled) == len(self.claims):
                raise JobCancelled

    def on_preview(self, i: int, n: int, images: list[Any]) -> None:
        from .. import preview

        offset = 0
        for claim, count in zip(self.claims, self.counts, strict=True):
            if claim.preview:
                self.channel.send(Progress(claim.job_id, i, n, preview.jpeg_bytes(images[offset])))
            offset += count


def device_answers(device: Any) -> bool:
    """Whether `device` still runs work after an error (a CUDA fault poisons the context for good)."""
    try:
        _settle(device)
    except Exception:
        return False
    return True


def _settle(device: Any) -> None:
    """Wait until `device` has run what is queued on its current stream (off CUDA nothing is queued)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()


class Writer:
    """The worker's writer thread: encodes and writes each finished batch's images, records each
    job's end in SQLite and only then reports it, while the GPU runs the next batch. At most
    WRITER_DEPTH batches wait for it; `put` blocks beyond that."""

    def __init__(
        self,
        store: QueueStore,
        images_dir: Path,
        channel: Channel,
        depth: int = WRITER_DEPTH,
        retry_s: tuple[float, ...] = RECORD_RETRY_S,
    ) -> None:
        """`retry_s`: the waits before each new try to record a job's end (`_record`)."""
        self.store, self.images_dir, self.channel, self.retry_s = store, images_dir, channel, retry_s
        self._queue: queue.Queue[BatchDone | None] = queue.Queue(maxsize=depth)
        self.holding: tuple[str, ...] = ()  # the jobs of the batch being written
        self._thread = threading.Thread(target=self._loop, name="zturbo-writer", daemon=True)
        self._thread.start()

    def put(self, done: BatchDone) -> None:
        self._queue.put(done)

    def close(self, timeout: float | None = None) -> None:
        """Write what waits, then end the thread; with `timeout`, return after at most that many
        seconds in all, whatever the writer is stuck on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        try:
            while (done := self._queue.get()) is not None:
                self._write(done)
        except BaseException as e:  # a dead writer would leave the worker blocked in `put` for ever
            self._fail(e)

    def _write(self, done: BatchDone) -> None:
        self.holding = tuple(outcome.claim.job_id for outcome in done.outcomes)
        for outcome in done.outcomes:
            status = self._finish(outcome)
            if status is None:
                self.channel.send(Unrecorded(outcome.claim.job_id, "the job store did not record its end"))
                continue
            seconds = time.perf_counter() - done.start
            fallbacks = done.fallbacks if outcome.status == jobs.SUCCEEDED else 0
            self.channel.send(Finished(outcome.claim.job_id, status, seconds, fallbacks, done.memory, done.loras))
        self.holding = ()

    def _fail(self, error: BaseException) -> None:
        """Say so and exit the process: the supervisor then releases every job the worker holds."""
        logging.getLogger("zturbo").error("the writer failed; the worker exits", exc_info=error)
        with contextlib.suppress(Exception):  # the pipe itself may be what failed
            self.channel.send(Crashed(self.holding, f"the writer failed: {first_line(error)}"))
        os._exit(3)

    def _finish(self, outcome: Outcome) -> str | None:
        """Write the job's images and record its end; the status recorded, None if it could not be (`_record`)."""
        from ..errors import ZTurboError

        store, claim = self.store, outcome.claim
        if outcome.status != jobs.SUCCEEDED:
            end = outcome.status
            return _record(claim, lambda: store.end(claim, end, outcome.error), end, self.retry_s)
        try:
            refs = _save_images(outcome, self.images_dir)
        except ZTurboError as e:  # a full disk, a missing permission: the job's failure, the worker lives on
            error = {"type": e.kind, "message": str(e)}
        except Exception as e:  # an encoder fault: this job fails, the next ones still get written
            logging.getLogger("zturbo").exception("job %s: its images could not be written", claim.job_id)
            error = {"type": "internal_error", "message": f"the images could not be written ({type(e).__name__}: {e})"}
        else:
            warnings = list(dict.fromkeys(w for image in outcome.images for w in image.warnings))
            return _record(claim, lambda: store.succeed(claim, refs, warnings), jobs.SUCCEEDED, self.retry_s)
        return _record(claim, lambda: store.end(claim, jobs.FAILED, error), jobs.FAILED, self.retry_s)


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc, so interpreter start and imports
    count); None where that is not known."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 2)


def _lora_stats(engine: Any) -> dict[str, float] | None:
    """The LoRA numbers of this worker process so far: set switches and their seconds, the saved base
    weights, the parsed-file cache; None for an engine without LoRA support."""
    library = getattr(engine, "loras", None)
    if library is None:
        return None
    stats = {"cache_hits": library.hits, "cache_misses": library.misses, "cache_bytes": library.cached_bytes}
    merger = engine.merger
    if merger is not None:
        stats |= {"switches": merger.stats.switches, "switch_seconds": merger.stats.seconds}
        stats["backup_bytes"] = merger.backup_bytes
    return stats


def _record(claim: jobs.Claim, write: Any, status: str, retry_s: tuple[float, ...]) -> str | None:
    """Record a job's end (`write`), trying again after each wait of `retry_s` while the store
    refuses (an outage, a full disk, 'database is locked'); `status`, or None when it never took it:
    the worker and its loaded model stay up, and the job runs again (`Unrecorded`)."""
    for wait_s in (*retry_s, None):
        try:
            write()
        except (StorageError, sqlite3.Error) as e:
            if wait_s is None:
                message = "job %s ended %s but could not be recorded (%d tries): %s; it runs again"
                logging.getLogger("zturbo").error(message, claim.job_id, status, len(retry_s) + 1, e)
                return None
            time.sleep(wait_s)
        else:
            return status
    return None


def _save_images(outcome: Outcome, images_dir: Path) -> list[jobs.ImageRef]:
    """Write a job's images durably in its format; a full disk or a missing permission is the job's
    StorageError, not a crash."""
    from .. import imageio
    from ..errors import StorageError

    refs = []
    for k, image in enumerate(outcome.images):
        path = (
            images_dir / f"{outcome.claim.job_id}-{k}{imageio.IMAGE_SUFFIXES[outcome.output_format]}"
        )  # a re-run overwrites
        try:
            imageio.save_image(
                image, path, output_format=outcome.output_format, compression=outcome.compression, overwrite=True
            )
        except OSError as e:
            if not images_dir.is_dir():  # the cause, where the error's own words ("File exists") miss it
                raise StorageError(
                    f"could not write the image {path}: {images_dir} is not a directory; move it aside so the "
                    "server can make its images directory again"
                ) from e
            raise StorageError(f"could not write the image {path}: {e.strerror or e}; {_storage_hint(e)}") from e
        refs.append(jobs.ImageRef(jobs.new_id(), k, image.seed, path.name))
    return refs


def _storage_hint(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk, then submit the job again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the server's images directory writable by the user it runs as"
    return "check the server's images directory (inside --data-dir)"


def _runtime(engine: Any) -> dict[str, Any]:
    return {
        "model": engine.model.name,
        "model_source": engine.model.origin,
        "device": str(engine.device),
        **engine.runtime(),
    }


def _memory(device: Any) -> dict[str, int] | None:
    if device.type != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {"used_bytes": total - free, "free_bytes": free, "total_bytes": total}


def _die_with_parent() -> None:
    """Linux: be killed when the server process dies, so no orphan keeps holding a GPU."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the server died before the request above was in place: nobody would stop this worker


# --- the supervisor (server process) ------------------------------------------------------------


@dataclass
class WorkerSlot:
    """What the supervisor knows of one worker; replaced process and pipe on each restart."""

    id: str
    device: str
    state: str = "starting"  # starting | ready | busy | restarting | stopped
    restarts: int = 0
    failures: int = 0  # consecutive deaths, for the backoff
    process: Any = None
    conn: Connection | None = None
    # Every job the running process holds: the batch on its GPU (`running`), the batch sent to run
    # next (`waiting`) and the ones its writer has yet to record. All are released when it dies.
    claims: dict[str, jobs.Claim] = field(default_factory=dict)
    running: tuple[str, ...] = ()
    # The next batch, claimed and sent at the running batch's last denoising step (at most one): the
    # worker reads it once its GPU is free, and it becomes `running` with that batch's GpuFree. Its
    # jobs are `running` in the store but never began: a death releases them uncounted.
    waiting: tuple[str, ...] = ()
    unsent: bytes | None = None  # the waiting batch, pickled, held back until it runs (PIPE_ROOM)
    started: set[str] = field(default_factory=set)  # the jobs the worker said it began (Started)
    # When the worker began the running batch (its first Started): the time limit counts its GPU work
    # from then, not while the worker still waits for its writer. None while it has not begun.
    gpu_since: float | None = None
    handed: dict[str, float] = field(default_factory=dict)  # job with the writer -> since when (GpuFree)
    warming: str | None = None  # the deferred warm-up part the running process is in (`Warming`)
    # Parts a process of this worker overran the time limit in, with a batch waiting: its next
    # processes skip them (`IdleWarmups`), and a request that needs one compiles within its own time.
    skipped_warmups: dict[str, str] = field(default_factory=dict)
    window_until: float | None = None  # free, with one job waiting: the batching window ends then
    started_at: float = 0.0
    restart_at: float = 0.0
    runtime: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] | None = None
    last_error: str | None = None  # why it last died, for /v1/status
    crash_reason: str | None = None  # what the running process reported before exiting
    lora_set: str = jobs.NO_LORAS  # the LoRA set of the last job sent to the running process
    # The running process's room in images per batch key (`BatchRoom`): its claims ask for no more.
    rooms: dict[str, int] = field(default_factory=dict)
    lora_stats: dict[str, float] = field(default_factory=dict)  # the running process's (`_lora_stats`)
    lora_totals: dict[str, float] = field(default_factory=dict)  # counted before the last restart (`take_lora_stats`)

    def take_lora_stats(self, stats: dict[str, float] | None) -> None:
        """The running process's latest numbers. A counter below its last value restarted within the
        process (an out-of-memory or precision recovery makes the engine a new merger): the count it
        had moves to the totals, so the metric never goes down."""
        if not stats:
            return
        for name in LORA_COUNTERS:
            before = self.lora_stats.get(name, 0.0)
            if stats.get(name, 0.0) < before:
                self.lora_totals[name] = self.lora_totals.get(name, 0.0) + before
        self.lora_stats = stats

    def lora_counters(self) -> dict[str, float]:
        """The slot's LoRA numbers: counters summed over its processes, gauges of the running one."""
        out = dict(self.lora_stats)
        for name in LORA_COUNTERS:
            out[name] = self.lora_totals.get(name, 0.0) + self.lora_stats.get(name, 0.0)
        return out

    def view(self) -> dict[str, Any]:
        pid = self.process.pid if self.process is not None else None
        out = {"id": self.id, "device": self.device, "state": self.state, "restarts": self.restarts, "pid": pid}
        job = self.running[0] if self.running else None
        held = {"job": job, "jobs": list(self.claims), "waiting": list(self.waiting), "warming": self.warming}
        return out | held | {"last_error": self.last_error}

    def take(self, job_id: str) -> jobs.Claim | None:
        """The held claim of `job_id`, no longer held (None if it is not)."""
        self.started.discard(job_id)
        self.handed.pop(job_id, None)
        self.running = tuple(j for j in self.running if j != job_id)
        self.waiting = tuple(j for j in self.waiting if j != job_id)
        self.advance()
        return self.claims.pop(job_id, None)

    def advance(self) -> None:
        """Once no job of the running batch is left on the GPU, its clock stops and the waiting batch
        runs next; that batch's clock starts with its own first Started, not while it waited."""
        if not self.running:
            self.running, self.waiting, self.gpu_since = self.waiting, (), None


@dataclass
class Hooks:
    """What the supervisor tells the rest of the server; every callback runs on the supervisor thread."""

    on_event: Callable[[str, str, dict[str, Any]], None] = lambda job_id, event, data: None
    on_finished: Callable[[Finished], None] = lambda msg: None
    on_restart: Callable[[str, str], None] = lambda worker_id, reason: None
    # A batch's GPU work ended (GpuFree): the jobs and images it ran. A batch its worker died in is
    # not counted; its jobs are, where they run again.
    on_batch: Callable[[int, int], None] = lambda jobs, images: None
    # The same GpuFree's account of the worker's time (`BatchSeconds`), by worker id.
    on_seconds: Callable[[str, BatchSeconds], None] = lambda worker_id, seconds: None
    # A worker that will not come back under its id (a Ray replica whose lease ended).
    on_gone: Callable[[str], None] = lambda worker_id: None


class Supervisor:
    """Starts the workers, feeds them jobs, watches them, restarts the dead ones."""

    def __init__(
        self,
        store: QueueStore,
        config: RuntimeConfig,
        devices: list[str],
        data_dir: Path,
        *,
        job_timeout: float,
        hooks: Hooks | None = None,
        max_batch: int = SERVE_MAX_BATCH,
        max_batch_pixels: int | None = SERVE_MAX_BATCH_PIXELS,
        batch_window: float = 0.002,
    ) -> None:
        """`max_batch`: most images one batch makes; `max_batch_pixels`: most pixels (None: no bound);
        `batch_window`: seconds a free worker waits for a companion when exactly one job is waiting."""
        self.store = store
        self.max_batch, self.max_batch_pixels = max_batch, max_batch_pixels
        self.batch_window = batch_window
        self.config = config
        self.data_dir = data_dir
        self.job_timeout = job_timeout
        self.hooks = hooks or Hooks()
        self.slots = [WorkerSlot(f"worker-{i}", d) for i, d in enumerate(devices)]
        self._ctx = mp.get_context("spawn")
        self._lock = threading.RLock()  # guards the slots' fields read by other threads
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._stopping = threading.Event()
        self._dispatching = True
        self._stop_began: float | None = None  # when stop_dispatch was first called; the grace counts from it
        self._progress: dict[str, tuple[int, int]] = {}  # running job -> (step, steps)
        self._previews: dict[str, bytes] = {}  # running job -> its last preview (JPEG)
        self._thread: threading.Thread | None = None
        self._ready: dict[str, Any] | None = None  # `startup()`, from the first Ready (and its Warmed)
        self._first_ready: str | None = None  # the slot that sent it
        # Jobs whose end a worker could not record (`Unrecorded`), still `running` on their claim:
        # queued again once the store takes it, and why.
        self._unrecorded: dict[str, tuple[jobs.Claim, str]] = {}
        self._release_at = 0.0  # when to try those again
        self._fault_logged_at = -STORE_FAULT_LOG_S  # when a store fault was last logged

    # --- public, any thread -------------------------------------------------------------------

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="zturbo-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: dispatch now rather than at the next tick."""
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"!")

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.view() for s in self.slots]

    def ready(self) -> bool:
        with self._lock:
            return any(s.state in ("ready", "busy") for s in self.slots)

    def startup(self) -> dict[str, Any]:
        """Seconds from the server process's start to its first ready worker, and whether that
        worker reused compiled artifacts; once it has run its deferred warm-ups, their seconds and
        when it was fully warm (`warm_s`). Empty before any worker is ready."""
        with self._lock:
            return dict(self._ready or {})

    def runtime(self) -> dict[str, Any]:
        """The runtime one ready worker reported (dtypes, memory plan), and GPU memory summed."""
        with self._lock:
            runtimes = [s.runtime for s in self.slots if s.runtime]
            memories = [s.memory for s in self.slots if s.memory]
        out = dict(runtimes[0]) if runtimes else {}
        if memories:
            out["gpu_memory"] = {k: sum(m[k] for m in memories) for k in memories[0]}
        return out

    def memory_by_worker(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {s.id: dict(s.memory) for s in self.slots if s.memory}

    def loras_by_worker(self) -> dict[str, dict[str, float]]:
        """Each worker's LoRA numbers (`WorkerSlot.lora_counters`)."""
        with self._lock:
            return {s.id: s.lora_counters() for s in self.slots}

    def progress(self, job_id: str) -> tuple[int, int] | None:
        with self._lock:
            return self._progress.get(job_id)

    def preview(self, job_id: str) -> bytes | None:
        """The last preview (JPEG) of a running job that asked for previews."""
        with self._lock:
            return self._previews.get(job_id)

    def stop_dispatch(self) -> None:
        """Start no job from now on (the server is shutting down); running jobs go on."""
        with self._lock:  # held by _dispatch around each claim: none starts once this returns
            self._dispatching = False
            for slot in self.slots:  # an open window would make the loop spin (`_wait_s`)
                slot.window_until = None
            if self._stop_began is None:
                self._stop_began = time.monotonic()

    def stop(self, grace: float) -> None:
        """Stop dispatching; let running jobs finish until `grace` seconds after dispatching stopped,
        then stop the workers and put any job still running back in the queue without counting the attempt."""
        self.stop_dispatch()
        assert self._stop_began is not None
        deadline = self._stop_began + grace
        while time.monotonic() < deadline and any(s.claims for s in self.slots):
            time.sleep(0.05)
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._release_at = 0.0
        with contextlib.suppress(StorageError):  # else the next start, or another node, takes them back
            self._release_unrecorded()
        for slot in self.slots:
            self._halt(slot)
            for claim in list(slot.claims.values()):
                job = self.store.release(claim.job_id, claim.attempt, "shutdown", count_attempt=False)
                log.info("job %s returned to the queue at shutdown (%s)", claim.job_id, job and job.status)
                self._forget(slot, claim.job_id)

    # --- the supervisor thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must outlive any one bad event
                log.exception("supervisor error")
                time.sleep(0.5)

    def _tick(self) -> None:
        try:
            for job in self.store.heartbeat():  # a shared store: this node's lease, and lost nodes' jobs back
                log.info("job %s of a lost node: %s (attempt %d)", job.id, job.status, job.attempts)
            self._release_unrecorded()
            self._dispatch()
        except StorageError as e:  # the workers' messages are still read, and dead workers still seen
            self._store_fault(e)
        waitables: list[Any] = [self._wake_r]
        for s in self.slots:
            if s.conn is not None:
                waitables.append(s.conn)
            if s.process is not None:
                waitables.append(s.process.sentinel)
        for ready in wait(waitables, timeout=self._wait_s()):
            if ready is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            for s in self.slots:
                if ready is s.conn:
                    self._drain(s)
        for s in self.slots:
            self._check(s)

    def _store_fault(self, error: Exception) -> None:
        """Log a store the supervisor cannot reach, at most every STORE_FAULT_LOG_S."""
        now = time.monotonic()
        if now - self._fault_logged_at >= STORE_FAULT_LOG_S:
            self._fault_logged_at = now
            log.warning("the job store cannot be reached; no job is dispatched until it can: %s", error)

    def _release_unrecorded(self) -> None:
        """Queue again the jobs whose end a worker could not record, their attempt not counted (the
        job ran; the store failed); tried again every RELEASE_RETRY_S while the store refuses."""
        if not self._unrecorded or time.monotonic() < self._release_at:
            return
        self._release_at = time.monotonic() + RELEASE_RETRY_S
        for job_id, (claim, reason) in list(self._unrecorded.items()):
            job = self.store.release(job_id, claim.attempt, reason, count_attempt=False)
            del self._unrecorded[job_id]
            if job is not None and job.finished:
                self.hooks.on_finished(Finished(job_id, job.status, 0.0))
            elif job is not None:
                self.hooks.on_event(job_id, "requeued", {"reason": reason, "attempts": job.attempts})

    def _wait_s(self) -> float:
        """How long the loop may wait for a message: at most until the first batching window ends."""
        ends = [s.window_until for s in self.slots if s.window_until is not None and self._dispatching]
        return max(0.0, min(0.25, *(end - time.monotonic() for end in ends))) if ends else 0.25

    def _dispatch(self) -> None:
        self._send_held()
        if not self._dispatching:
            return
        if not self._send_to_free(warming=False):
            return
        if any(self._idle(s) and s.warming is None for s in self.slots):
            return  # an idle worker takes the next jobs (after its window) before a busy one is sent them
        # A busy worker at its batch's last step begins a batch sooner than a deferred warm-up part ends.
        for s in self.slots:
            if self._finishing(s) and not self._claim_and_send(s, waiting=True):
                return
        self._send_to_free(warming=True)

    def _send_to_free(self, *, warming: bool) -> bool:
        """Send a batch to each free worker past its batching window that is in a deferred warm-up part
        (`warming`) or is not; False once no job waits."""
        for s in self.slots:
            if (s.warming is not None) != warming or not self._idle(s) or self._in_window(s):
                continue
            if not self._claim_and_send(s, waiting=False):
                return False
        return True

    @staticmethod
    def _idle(s: WorkerSlot) -> bool:
        # A worker that died while idle is not: _check restarts it; a job sent now would be lost.
        return s.state == "ready" and not s.running and s.process is not None and s.process.is_alive()

    def _finishing(self, s: WorkerSlot) -> bool:
        """Whether `s` runs a batch that has made its last denoising step (it decodes now) and has no
        batch waiting: its next batch may be claimed and sent. Not earlier, so that jobs arriving
        while a batch runs still join the next one."""
        if s.state != "busy" or s.waiting or s.process is None or not s.process.is_alive():
            return False
        with self._lock:
            progress = [self._progress.get(j) for j in s.running]
        return any(p is not None and p[0] >= p[1] for p in progress)

    def _claim_and_send(self, s: WorkerSlot, *, waiting: bool) -> bool:
        """Claim `s`'s next batch and send it (to run now, or after its running batch: `waiting`);
        False when no job waits."""
        with self._lock:
            if not self._dispatching:
                return False
            claims = self.store.claim_batch(
                s.id, s.lora_set, self.max_batch, rooms=s.rooms, max_pixels=self.max_batch_pixels
            )
        if not claims:
            return False
        payload = ForkingPickler.dumps(claims)  # the framing `Connection.recv` reads
        if waiting and len(payload) + 4 > PIPE_ROOM:  # send_bytes adds a 4-byte length
            self._sent(s, claims, waiting=True, unsent=bytes(payload))
            return True
        try:
            assert s.conn is not None
            s.conn.send_bytes(payload)
        except (OSError, AssertionError):
            self._drain(s)  # what the worker sent before it died still counts
            self._died(s, sent=claims)
            return True
        self._sent(s, claims, waiting=waiting)
        return True

    def _send_held(self) -> None:
        """Send each held-back waiting batch whose turn has come (its running batch's GpuFree). Also
        while stopping: its jobs were claimed before, and run within the grace or go back then."""
        for s in self.slots:
            if s.unsent is None or s.waiting:
                continue
            payload, s.unsent = s.unsent, None
            try:
                assert s.conn is not None
                s.conn.send_bytes(payload)
            except (OSError, AssertionError):
                self._drain(s)
                self._died(s)

    def _in_window(self, s: WorkerSlot) -> bool:
        """Whether the free worker `s` waits for a companion of the one waiting job: from when it
        finds exactly one job waiting, for at most `batch_window` seconds."""
        if self.batch_window <= 0 or self.max_batch <= 1 or self.store.depth() != 1:
            s.window_until = None
            return False
        now = time.monotonic()
        if s.window_until is None:
            s.window_until = now + self.batch_window
        if now < s.window_until:
            return True
        s.window_until = None
        return False

    def _sent(
        self, s: WorkerSlot, claims: list[jobs.Claim], *, waiting: bool = False, unsent: bytes | None = None
    ) -> None:
        """`claims` are `s`'s now: its running batch, or (`waiting`) the one it runs next, `unsent`
        where held back."""
        ids = tuple(claim.job_id for claim in claims)
        with self._lock:
            s.claims |= {claim.job_id: claim for claim in claims}
            if waiting:
                s.waiting, s.unsent = ids, unsent
            else:
                # A worker in a deferred warm-up part begins the batch after it: the wait counts.
                s.running, s.gpu_since, s.state = ids, time.monotonic() if s.warming else None, "busy"
            s.lora_set = claims[0].lora_set  # the set the worker will have merged last
        for claim in claims:
            self.hooks.on_event(claim.job_id, "running", {"worker": s.id, "attempt": claim.attempt})

    def _drain(self, s: WorkerSlot) -> None:
        assert s.conn is not None
        try:
            while s.conn.poll():
                self._handle(s, s.conn.recv())
        except (EOFError, OSError):
            pass  # the process is ending; its sentinel tells the rest

    def _handle(self, s: WorkerSlot, msg: Any) -> None:
        if isinstance(msg, Started):
            self._started(s, msg.job_id)
        elif isinstance(msg, Ready):
            with self._lock:
                s.state, s.runtime, s.memory = "ready", {**msg.runtime, "startup": msg.startup}, msg.memory
                if self._ready is None:  # the server's start to its first ready worker, and that worker's phases
                    self._first_ready = s.id
                    self._ready = {
                        "ready_s": process_age(),
                        "compile_cache": msg.startup.get("compile_cache", "off"),
                        "worker_ready_s": msg.ready_s,
                        "worker_phases": msg.startup.get("phases", {}),
                        "worker_warmup_parts": msg.startup.get("warmup_parts", {}),
                    }
            log.info("%s ready on %s in %s s (worker process), compile cache %s", s.id, s.device, msg.ready_s,
                     msg.startup.get("compile_cache", "off"))  # fmt: skip
        elif isinstance(msg, Warming):
            self._warming(s, msg.part)
        elif isinstance(msg, Warmed):
            self._warmed(s, msg)
        elif isinstance(msg, Progress):
            self._progressed(msg)
        elif isinstance(msg, GpuFree):
            self._gpu_free(s, msg.job_ids)
            ran = len(msg.job_ids) if msg.ran is None else msg.ran
            if ran:  # a batch whose jobs were all cancelled before it began ran nothing
                self.hooks.on_batch(ran, msg.images)
            if msg.seconds is not None:
                self.hooks.on_seconds(s.id, msg.seconds)
        elif isinstance(msg, BatchRoom):
            self._batch_room(s, msg)
        elif isinstance(msg, Finished):
            with self._lock:
                self._forget(s, msg.job_id)
                self._free_if_done(s)  # the writer may report a job before the worker's GpuFree arrives
                s.failures = 0
                s.memory = msg.memory or s.memory
                s.take_lora_stats(msg.loras)
            self.hooks.on_finished(msg)
        elif isinstance(msg, Unrecorded):
            with self._lock:
                claim = self._forget(s, msg.job_id)
                self._free_if_done(s)
            if claim is not None:
                self._unrecorded[msg.job_id] = (claim, msg.reason)
                self._release_at = 0.0
        elif isinstance(msg, Crashed):
            s.crash_reason = msg.reason
        elif isinstance(msg, Released):
            self._released(s, msg)

    def _warmed(self, s: WorkerSlot, msg: Warmed) -> None:
        """`s` ran its deferred warm-ups: for the first ready worker, /ready tells when (`startup`)."""
        with self._lock:
            s.runtime.setdefault("startup", {})["deferred_warmup_parts"] = msg.parts
            if self._ready is not None and s.id == self._first_ready and "warm_s" not in self._ready:
                warm = {"warm_s": process_age(), "worker_warm_s": msg.warm_s, "deferred_warmup_parts": msg.parts}
                self._ready |= warm | ({"deferred_warmup_failed": sorted(msg.errors)} if msg.errors else {})
        failed = "".join(f"; {name} failed: {why}" for name, why in msg.errors.items())
        log.info("%s fully warm in %s s (worker process): deferred warm-ups %s%s", s.id, msg.warm_s, msg.parts, failed)

    def _warming(self, s: WorkerSlot, part: str | None) -> None:
        """`s` began (or ended: None) a deferred warm-up part. A batch sent to it that has not begun
        waits for the part, and its time limit counts that wait: a part that hangs is stopped
        (`_time_out`). Once the part ends, the batch's clock starts again with its first Started."""
        with self._lock:
            s.warming = part
            if s.running and not s.started.intersection(s.running):
                s.gpu_since = time.monotonic() if part is not None else None

    def _started(self, s: WorkerSlot, job_id: str) -> None:
        if job_id not in s.claims:
            return
        with self._lock:
            s.started.add(job_id)
            if job_id in s.running and s.gpu_since is None:
                s.gpu_since = time.monotonic()

    def _gpu_free(self, s: WorkerSlot, job_ids: tuple[str, ...]) -> None:
        """The batch's GPU work is done: its clock stops, its jobs' writing clock starts, and the
        waiting batch, if any, is the running one (`WorkerSlot.advance`)."""
        now = time.monotonic()
        with self._lock:
            s.running = tuple(j for j in s.running if j not in job_ids)
            s.handed |= {j: now for j in job_ids if j in s.claims}
            s.advance()
            self._free_if_done(s)

    def _batch_room(self, s: WorkerSlot, msg: BatchRoom) -> None:
        """Keep the worker's room for the batch key; queue the jobs it gave back again, each in its
        place, its attempt not counted and still free to batch (the batch's size did not fit, not
        the job)."""
        with self._lock:
            s.rooms[msg.batch_key] = msg.images
        reason = (
            f"its batch did not fit in {s.id}'s free GPU memory (room for {msg.images} images); it runs in a later one"
        )
        for job_id in msg.returned:
            claim = s.claims.get(job_id)
            if claim is None:
                continue
            job = self.store.release(job_id, claim.attempt, reason, count_attempt=False)
            status, attempts = (job.status, job.attempts) if job is not None else (None, claim.attempt)
            self._released(s, Released(job_id, status, attempts, reason))

    def _released(self, s: WorkerSlot, msg: Released) -> None:
        self._forget(s, msg.job_id)
        if msg.status in jobs.FINISHED:
            self.hooks.on_finished(Finished(msg.job_id, msg.status, 0.0))
        elif msg.status is not None:
            self.hooks.on_event(msg.job_id, "requeued", {"reason": msg.reason, "attempts": msg.attempts})

    @staticmethod
    def _free_if_done(s: WorkerSlot) -> None:
        if s.state == "busy" and not s.running:
            s.state = "ready"

    def _progressed(self, msg: Progress) -> None:
        data: dict[str, Any] = {"step": msg.step, "steps": msg.steps}
        with self._lock:
            self._progress[msg.job_id] = (msg.step, msg.steps)
            if msg.preview is not None:
                self._previews[msg.job_id] = msg.preview
                data["preview"] = base64.b64encode(msg.preview).decode()
        self.hooks.on_event(msg.job_id, "progress", data)

    def _forget(self, s: WorkerSlot, job_id: str) -> jobs.Claim | None:
        """`job_id` no longer held by `s`: its claim, progress and preview go."""
        with self._lock:
            self._progress.pop(job_id, None)
            self._previews.pop(job_id, None)
            return s.take(job_id)

    def _check(self, s: WorkerSlot) -> None:
        now = time.monotonic()
        if s.state == "restarting":
            if now >= s.restart_at and not self._stopping.is_set():
                self._spawn(s)
            return
        if s.process is None or s.state == "stopped":
            return
        if not s.process.is_alive():
            self._drain(s)
            self._died(s)
        elif any(self._overdue(s, now)):
            self._time_out(s)

    def _overdue(self, s: WorkerSlot, now: float) -> tuple[bool, set[str]]:
        """Whether the GPU batch ran past the time limit, and the jobs whose writing did."""
        if not self.job_timeout:
            return False, set()
        gpu = bool(s.running) and s.gpu_since is not None and now - s.gpu_since > self.job_timeout
        return gpu, {j for j, since in s.handed.items() if now - since > self.job_timeout}

    def _time_out(self, s: WorkerSlot) -> None:
        """Kill a worker past a time limit. A lone job past it on the GPU fails with `timeout`; a
        batch's jobs are queued again to run alone, each attempt counted; a job whose images were
        not recorded in time is queued again, its attempt counted; the others it held run again,
        their attempt given back (they were in time; the kill cut them off)."""
        self._drain(s)  # what the worker finished meanwhile is not timed out
        gpu, late = self._overdue(s, time.monotonic())
        if not (gpu or late) or s.process is None:
            return
        batch = set(s.running) if gpu else set()
        log.warning("%s: jobs %s ran past the %g s limit; killing the worker", s.id, ", ".join(sorted(batch | late)),
                    self.job_timeout)  # fmt: skip
        s.process.kill()
        s.process.join(5)
        why = f"the worker was stopped at the time limit of {self.job_timeout:g} s (a batch on its GPU or a write)"
        reason = "job time limit"
        if gpu and s.warming is not None and not s.started.intersection(batch):
            why, batch = self._skip_warmup(s, s.warming), set()  # the batch never began: uncounted
            reason = f"deferred warm-up part {s.warming} past the job time limit"
        if len(batch) == 1:
            self._fail_timed_out(s, batch.pop())
        self._release(s, why, counted=batch | late, solo=batch)
        self._schedule_restart(s, reason)

    def _skip_warmup(self, s: WorkerSlot, part: str) -> str:
        """`s`'s batch waited past the time limit behind the deferred warm-up part `part`: the
        worker's next processes skip it. Why the worker was stopped."""
        limit = f"the time limit of {self.job_timeout:g} s"
        s.skipped_warmups[part] = f"it ran past {limit} with a batch waiting; skipped since"
        why = f"the worker was stopped: its deferred warm-up part {part} ran past {limit}"
        log.warning("%s: %s; its next processes skip that part", s.id, why)
        return why

    def _fail_timed_out(self, s: WorkerSlot, job_id: str) -> None:
        claim = self._forget(s, job_id)
        if claim is not None and self.store.end(claim, jobs.FAILED, timed_out(self.job_timeout)):
            self.hooks.on_finished(Finished(claim.job_id, jobs.FAILED, self.job_timeout))

    def _died(self, s: WorkerSlot, sent: list[jobs.Claim] | None = None) -> None:
        """The worker is gone: every job it held is released; only a job it began costs an attempt
        (one sent to a dead worker was never run), except that the jobs of a batch of several that
        was on the GPU run alone next, their attempt given back (which of them broke it is unknown)."""
        code = s.process.exitcode if s.process is not None else None
        reason = s.crash_reason or _exit_reason(code)
        log.warning("%s on %s died (%s)", s.id, s.device, reason)
        with self._lock:
            s.claims |= {claim.job_id: claim for claim in sent or ()}
        batch = {j for j in s.running if j in s.started} if len(s.running) > 1 else set()
        self._release(s, f"the worker died ({reason})", counted=s.started - batch, solo=batch, reason=reason)
        self._schedule_restart(s, reason)

    def _release(
        self,
        s: WorkerSlot,
        why: str,
        *,
        counted: Collection[str],
        solo: Collection[str] = (),
        reason: str | None = None,
    ) -> None:
        for claim in list(s.claims.values()):
            self._forget(s, claim.job_id)
            job = self.store.release(
                claim.job_id, claim.attempt, why, count_attempt=claim.job_id in counted, solo=claim.job_id in solo
            )
            if job is not None and job.finished:
                self.hooks.on_finished(Finished(claim.job_id, job.status, 0.0))
            elif job is not None:
                self.hooks.on_event(claim.job_id, "requeued", {"reason": reason or why, "attempts": job.attempts})

    def _schedule_restart(self, s: WorkerSlot, reason: str) -> None:
        if s.conn is not None:
            s.conn.close()
        if s.started_at and time.monotonic() - s.started_at > STABLE_AFTER_S:
            s.failures = 0
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**s.failures)
        with self._lock:
            s.failures += 1
            s.restarts += 1
            s.state, s.conn, s.window_until, s.unsent, s.warming = "restarting", None, None, None, None
            s.restart_at = time.monotonic() + delay
            s.last_error = reason
        self.hooks.on_restart(s.id, reason)
        log.info("%s restarts in %.1f s", s.id, delay)

    def _spawn(self, s: WorkerSlot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(s.id, s.device, self.config, self.store.location, str(self.data_dir), child, dict(s.skipped_warmups)),
            name=f"zturbo-{s.id}",
            daemon=True,
        )
        process.start()
        child.close()
        with self._lock:
            s.process, s.conn, s.state, s.started_at = process, parent, "starting", time.monotonic()
            s.crash_reason, s.warming = None, None
            # A new process starts from the base weights and an empty cache; its counters add on.
            for name in LORA_COUNTERS:
                s.lora_totals[name] = s.lora_totals.get(name, 0.0) + s.lora_stats.get(name, 0.0)
            s.lora_stats, s.lora_set = {}, jobs.NO_LORAS
            s.rooms = {}  # its GPU memory is measured anew

    def _halt(self, s: WorkerSlot) -> None:
        if s.process is None:
            return
        if s.conn is not None:
            with contextlib.suppress(OSError):
                s.conn.send(None)
        if not s.claims:
            s.process.join(2)
        if s.process.is_alive():
            s.process.kill()
            s.process.join(5)
        with self._lock:
            s.state, s.warming = "stopped", None


def timed_out(limit: float) -> dict[str, str]:
    """The error of a job that ran past the time limit `limit` alone on its GPU (not retried: it
    would time out again)."""
    return {"type": "timeout", "message": f"the job ran longer than the time limit of {limit:g} s and was stopped"}


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
