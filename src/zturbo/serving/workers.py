"""Supervised worker processes: one per device, each owning its Engine; restarted with backoff.

The supervisor thread (in the server process) is the only dispatcher: it claims the next queued job
for an idle worker and sends it over that worker's pipe. The worker runs it, writes the PNGs
(named from the job id and image index, so a re-run overwrites the same files) and then marks the
job done in SQLite with the claim's token, so a job is done exactly once. A worker that dies has
its job released: queued again, or failed after `jobs.MAX_ATTEMPTS` attempts. A job that runs past
the time limit has its worker killed and is failed at once (not retried: it would time out again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ..config import RuntimeConfig
from . import jobs

log = logging.getLogger("zturbo.workers")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a worker up this long without dying resets its backoff
# `Finished.loras` entries that count up over a worker process's life (the rest are gauges).
_LORA_COUNTERS = ("switches", "switch_seconds", "cache_hits", "cache_misses")


# --- messages: worker -> supervisor -------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    runtime: dict[str, Any]
    memory: dict[str, int] | None
    # Seconds from the worker process's start to ready; its phases (load_s, warmup_s) and
    # whether compiled artifacts were reused (compile_cache: hit, miss or off).
    ready_s: float | None = None
    startup: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Started:
    """The worker has read the job and begins it: from here on, its death costs the job an attempt."""

    job_id: str


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    steps: int


@dataclass(frozen=True)
class Finished:
    job_id: str
    status: str  # succeeded | failed | cancelled
    seconds: float
    fallbacks: int = 0
    memory: dict[str, int] | None = None
    loras: dict[str, float] | None = None  # the worker's LoRA numbers so far (`_lora_stats`)


@dataclass(frozen=True)
class Crashed:
    """The worker hit an error that may have broken its device (e.g. a CUDA fault); it exits next."""

    job_id: str
    reason: str


# --- the worker process ------------------------------------------------------------------------


class JobCancelled(Exception):
    pass


def worker_main(
    worker_id: str,
    device: str,
    config: RuntimeConfig,
    db_path: str,
    images_dir: str,
    conn: Connection,
) -> None:
    """Entry point of a worker process: load, warm up, report ready, then run claims until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"zturbo[{worker_id}]: %(message)s")
    from ..engine import Engine

    engine = Engine.load(dataclasses.replace(config, device=device))
    unit = engine.limits.spatial_unit
    engine.generate("warm-up", seed=0, steps=1, width=unit * 4, height=unit * 4)  # first-call costs, now
    engine.persist_compiled()  # that size's graphs too
    store = jobs.JobStore(Path(db_path), check=False)  # the server checked it at startup
    ready_s, startup = process_age(), engine.startup_report()
    logging.getLogger("zturbo").info("ready in %s s: %s", ready_s, startup)
    conn.send(Ready(_runtime(engine), _memory(engine.device), ready_s, startup))
    while True:
        try:
            claim = conn.recv()
        except EOFError:
            return  # the supervisor is gone
        if claim is None:
            return
        conn.send(Started(claim.job_id))
        _run_claim(engine, store, Path(images_dir), claim, conn)


def _run_claim(engine: Any, store: jobs.JobStore, images_dir: Path, claim: jobs.Claim, conn: Connection) -> None:
    from ..errors import ZTurboError

    start = time.perf_counter()
    from ..testing import step_sleep

    sleep = step_sleep()
    parent = os.getppid()

    def on_step(i: int, n: int) -> None:
        conn.send(Progress(claim.job_id, i, n))
        if sleep:
            time.sleep(sleep)
        if os.getppid() != parent:
            os._exit(1)  # orphaned: the server died; its successor re-runs the job
        # A cancel stops the job after its current step, unless that step was the last: finished
        # steps make an image, and docs/api.md promises that image (a cancel then is too late).
        if i < n and store.cancel_requested(claim.job_id):
            raise JobCancelled

    try:
        req = jobs.stored_request(claim.params, engine.limits, store.inputs.resolve)
        result = engine.generate(req, on_step=on_step)
        refs = _save_images(result.images, images_dir, claim.job_id)
    except JobCancelled:
        status = _record(store, claim, lambda: store.end(claim, jobs.CANCELLED), jobs.CANCELLED)
        conn.send(Finished(claim.job_id, status, time.perf_counter() - start, loras=_lora_stats(engine)))
        return
    except ZTurboError as e:  # a refusal (bad input, out of memory, storage): the engine is still sound
        error = {"type": e.kind, "message": str(e)}
        _record(store, claim, lambda: store.end(claim, jobs.FAILED, error), jobs.FAILED)
        conn.send(Finished(claim.job_id, jobs.FAILED, time.perf_counter() - start, loras=_lora_stats(engine)))
        return
    except Exception as e:  # anything else may have broken the device: report, exit, be restarted
        logging.getLogger("zturbo").exception("job %s crashed the worker", claim.job_id)
        conn.send(Crashed(claim.job_id, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"))
        os._exit(3)
    status = _record(store, claim, lambda: store.succeed(claim, refs), jobs.SUCCEEDED)
    seconds = time.perf_counter() - start
    memory = _memory(engine.device)
    conn.send(Finished(claim.job_id, status, seconds, len(result.fallbacks), memory, _lora_stats(engine)))


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


def _record(store: jobs.JobStore, claim: jobs.Claim, write: Any, status: str) -> str:
    """Record a job's end; when the job database cannot be written (a full disk), say so and report
    the job failed: the worker and its loaded model stay up. The row stays `running` until the
    server's next start re-queues it."""
    from ..errors import StorageError

    try:
        write()
    except StorageError as e:
        logging.getLogger("zturbo").error("job %s ended %s but could not be recorded: %s", claim.job_id, status, e)
        return jobs.FAILED
    return status


def _save_images(images: list[Any], images_dir: Path, job_id: str) -> list[jobs.ImageRef]:
    """Write a job's PNGs; a full disk or a missing permission is the job's StorageError, not a crash."""
    from ..errors import StorageError
    from ..imageio import save_png

    refs = []
    for k, image in enumerate(images):
        path = images_dir / f"{job_id}-{k}.png"  # a re-run of this job overwrites, never duplicates
        try:
            save_png(image, path, overwrite=True)
        except OSError as e:
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
    return {"model": engine.model.name, "device": str(engine.device), **engine.runtime()}


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
    claim: jobs.Claim | None = None
    claim_started: bool = False  # the worker said it began the claim (Started)
    claimed_at: float = 0.0
    started_at: float = 0.0
    restart_at: float = 0.0
    runtime: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] | None = None
    progress: tuple[int, int] | None = None
    last_error: str | None = None  # why it last died, for /v1/status
    crash_reason: str | None = None  # what the running process reported before exiting
    lora_set: str = jobs.NO_LORAS  # the LoRA set of the last job sent to the running process
    lora_stats: dict[str, float] = field(default_factory=dict)  # the running process's (`_lora_stats`)
    lora_totals: dict[str, float] = field(default_factory=dict)  # counted before the last restart (`take_lora_stats`)

    def take_lora_stats(self, stats: dict[str, float] | None) -> None:
        """The running process's latest numbers. A counter below its last value restarted within the
        process (an out-of-memory or precision recovery makes the engine a new merger): the count it
        had moves to the totals, so the metric never goes down."""
        if not stats:
            return
        for name in _LORA_COUNTERS:
            before = self.lora_stats.get(name, 0.0)
            if stats.get(name, 0.0) < before:
                self.lora_totals[name] = self.lora_totals.get(name, 0.0) + before
        self.lora_stats = stats

    def lora_counters(self) -> dict[str, float]:
        """The slot's LoRA numbers: counters summed over its processes, gauges of the running one."""
        out = dict(self.lora_stats)
        for name in _LORA_COUNTERS:
            out[name] = self.lora_totals.get(name, 0.0) + self.lora_stats.get(name, 0.0)
        return out

    def view(self) -> dict[str, Any]:
        pid = self.process.pid if self.process is not None else None
        out = {"id": self.id, "device": self.device, "state": self.state, "restarts": self.restarts, "pid": pid}
        return out | {"job": self.claim.job_id if self.claim else None, "last_error": self.last_error}


@dataclass
class Hooks:
    """What the supervisor tells the rest of the server; every callback runs on the supervisor thread."""

    on_event: Callable[[str, str, dict[str, Any]], None] = lambda job_id, event, data: None
    on_finished: Callable[[Finished], None] = lambda msg: None
    on_restart: Callable[[str, str], None] = lambda worker_id, reason: None


class Supervisor:
    """Starts the workers, feeds them jobs, watches them, restarts the dead ones."""

    def __init__(
        self,
        store: jobs.JobStore,
        config: RuntimeConfig,
        devices: list[str],
        data_dir: Path,
        *,
        job_timeout: float,
        hooks: Hooks | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.data_dir = data_dir
        self.job_timeout = job_timeout
        self.hooks = hooks or Hooks()
        self.slots = [WorkerSlot(f"worker-{i}", d) for i, d in enumerate(devices)]
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()  # guards the slots' fields read by other threads
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._stopping = threading.Event()
        self._dispatching = True
        self._stop_began: float | None = None  # when stop_dispatch was first called; the grace counts from it
        self._thread: threading.Thread | None = None
        self._ready: dict[str, Any] | None = None  # `startup()`, from the first Ready

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
        worker reused compiled artifacts; empty before any worker is ready."""
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
            for s in self.slots:
                if s.claim is not None and s.claim.job_id == job_id:
                    return s.progress
        return None

    def stop_dispatch(self) -> None:
        """Start no job from now on (the server is shutting down); running jobs go on."""
        with self._lock:  # held by _dispatch around each claim: none starts once this returns
            self._dispatching = False
            if self._stop_began is None:
                self._stop_began = time.monotonic()

    def stop(self, grace: float) -> None:
        """Stop dispatching; let running jobs finish until `grace` seconds after dispatching stopped,
        then stop the workers and put any job still running back in the queue without counting the attempt."""
        self.stop_dispatch()
        assert self._stop_began is not None
        deadline = self._stop_began + grace
        while time.monotonic() < deadline and any(s.claim is not None for s in self.slots):
            time.sleep(0.05)
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for slot in self.slots:
            self._halt(slot)
            if slot.claim is not None:
                job = self.store.release(slot.claim.job_id, slot.claim.attempt, "shutdown", count_attempt=False)
                log.info("job %s returned to the queue at shutdown (%s)", slot.claim.job_id, job and job.status)
                slot.claim = None

    # --- the supervisor thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must outlive any one bad event
                log.exception("supervisor error")
                time.sleep(0.5)

    def _tick(self) -> None:
        self._dispatch()
        waitables: list[Any] = [self._wake_r]
        for s in self.slots:
            if s.conn is not None:
                waitables.append(s.conn)
            if s.process is not None:
                waitables.append(s.process.sentinel)
        for ready in wait(waitables, timeout=0.25):
            if ready is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            for s in self.slots:
                if ready is s.conn:
                    self._drain(s)
        for s in self.slots:
            self._check(s)

    def _dispatch(self) -> None:
        if not self._dispatching:
            return
        for s in self.slots:
            if s.state != "ready" or s.claim is not None:
                continue
            if s.process is None or not s.process.is_alive():
                continue  # died while idle: _check restarts it; a job sent now would be lost
            with self._lock:
                claim = self.store.claim(s.id, prefer=s.lora_set) if self._dispatching else None
            if claim is None:
                return
            try:
                assert s.conn is not None
                s.conn.send(claim)
            except (OSError, AssertionError):
                self._died(s, claim_sent=claim)
                continue
            with self._lock:
                s.claim, s.claimed_at, s.state, s.progress = claim, time.monotonic(), "busy", None
                s.claim_started, s.lora_set = False, claim.lora_set
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
            if s.claim is not None and s.claim.job_id == msg.job_id:
                s.claim_started = True
        elif isinstance(msg, Ready):
            with self._lock:
                s.state, s.runtime, s.memory = "ready", {**msg.runtime, "startup": msg.startup}, msg.memory
                if self._ready is None:  # the server's start to its first ready worker
                    self._ready = {"ready_s": process_age(), "compile_cache": msg.startup.get("compile_cache", "off")}
            log.info("%s ready on %s in %s s (worker process), compile cache %s", s.id, s.device, msg.ready_s,
                     msg.startup.get("compile_cache", "off"))  # fmt: skip
        elif isinstance(msg, Progress):
            with self._lock:
                s.progress = (msg.step, msg.steps)
            self.hooks.on_event(msg.job_id, "progress", {"step": msg.step, "steps": msg.steps})
        elif isinstance(msg, Finished):
            with self._lock:
                s.claim, s.state, s.progress, s.failures = None, "ready", None, 0
                s.memory = msg.memory or s.memory
                s.take_lora_stats(msg.loras)
            self.hooks.on_finished(msg)
        elif isinstance(msg, Crashed):
            s.crash_reason = msg.reason

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
        elif s.claim is not None and self.job_timeout and now - s.claimed_at > self.job_timeout:
            self._time_out(s)

    def _time_out(self, s: WorkerSlot) -> None:
        claim = s.claim
        assert claim is not None
        log.warning("%s: job %s ran past the %g s limit; killing the worker", s.id, claim.job_id, self.job_timeout)
        s.process.kill()
        s.process.join(5)
        message = f"the job ran longer than the time limit of {self.job_timeout:g} s and was stopped"
        if self.store.end(claim, jobs.FAILED, {"type": "timeout", "message": message}):
            self.hooks.on_finished(Finished(claim.job_id, jobs.FAILED, self.job_timeout))
        with self._lock:
            s.claim = None
        self._schedule_restart(s, "job time limit")

    def _died(self, s: WorkerSlot, claim_sent: jobs.Claim | None = None) -> None:
        code = s.process.exitcode if s.process is not None else None
        reason = s.crash_reason or _exit_reason(code)
        log.warning("%s on %s died (%s)", s.id, s.device, reason)
        claim = claim_sent or s.claim
        if claim is not None:
            # Only a job the worker began costs an attempt: one sent to a dead worker was never run.
            counted = claim_sent is None and s.claim_started
            job = self.store.release(claim.job_id, claim.attempt, f"the worker died ({reason})", count_attempt=counted)
            if job is not None and job.finished:
                self.hooks.on_finished(Finished(claim.job_id, job.status, 0.0))
            elif job is not None:
                self.hooks.on_event(claim.job_id, "requeued", {"reason": reason, "attempts": job.attempts})
        with self._lock:
            s.claim = None
        self._schedule_restart(s, reason)

    def _schedule_restart(self, s: WorkerSlot, reason: str) -> None:
        if s.conn is not None:
            s.conn.close()
        if s.started_at and time.monotonic() - s.started_at > STABLE_AFTER_S:
            s.failures = 0
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**s.failures)
        with self._lock:
            s.failures += 1
            s.restarts += 1
            s.state, s.conn, s.progress = "restarting", None, None
            s.restart_at = time.monotonic() + delay
            s.last_error = reason
        self.hooks.on_restart(s.id, reason)
        log.info("%s restarts in %.1f s", s.id, delay)

    def _spawn(self, s: WorkerSlot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        images = str(self.data_dir / "images")
        process = self._ctx.Process(
            target=worker_main,
            args=(s.id, s.device, self.config, str(self.store.path), images, child),
            name=f"zturbo-{s.id}",
            daemon=True,
        )
        process.start()
        child.close()
        with self._lock:
            s.process, s.conn, s.state, s.started_at = process, parent, "starting", time.monotonic()
            s.crash_reason = None
            # A new process starts from the base weights and an empty cache; its counters add on.
            for name in _LORA_COUNTERS:
                s.lora_totals[name] = s.lora_totals.get(name, 0.0) + s.lora_stats.get(name, 0.0)
            s.lora_stats, s.lora_set = {}, jobs.NO_LORAS

    def _halt(self, s: WorkerSlot) -> None:
        if s.process is None:
            return
        if s.conn is not None:
            with contextlib.suppress(OSError):
                s.conn.send(None)
        if s.claim is None:
            s.process.join(2)
        if s.process.is_alive():
            s.process.kill()
            s.process.join(5)
        with self._lock:
            s.state = "stopped"


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
