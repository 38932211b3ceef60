"""The worker's job loop and the supervisor's dispatch, in this process: no worker is spawned.

`run_batch` runs with the session's tiny engine; the supervisor gets slots whose "process" is a
stand-in, so a dead worker and its pipe can be arranged exactly.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from zturbo import imageio
from zturbo.config import RuntimeConfig
from zturbo.request import GenerateRequest, ModelLimits
from zturbo.serving import jobs, workers

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 1}
LIMITS = ModelLimits(spatial_unit=16, max_pixels=128 * 128)


@pytest.fixture
def store(tmp_path):
    s = jobs.JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def run_claims(
    engine: Any, store: jobs.JobStore, images_dir: Path, claims: list[jobs.Claim], retry_s: tuple[float, ...] = ()
) -> list[Any]:
    """Run `claims` as a worker would, its writer drained (recording each end once more after each of
    `retry_s`); the messages sent."""
    here, there = mp.Pipe()
    channel = workers.Channel(there)
    writer = workers.Writer(store, images_dir, channel, retry_s=retry_s)
    try:
        workers.run_batch(engine, store, claims, channel, writer)
    finally:
        writer.close()
    messages = []
    while here.poll():
        messages.append(here.recv())
    return messages


def run_claim(
    engine: Any, store: jobs.JobStore, images_dir: Path, retry_s: tuple[float, ...] = (), **options: Any
) -> tuple[jobs.Job, list[Any]]:
    """Queue one small job (SMALL, with `options`), run it as a worker would; the job as stored and
    the messages sent."""
    store.submit(GenerateRequest.create("a fox", limits=engine.limits, **SMALL | options))
    claim = store.claim("worker-0")
    messages = run_claims(engine, store, images_dir, [claim], retry_s)
    return store.get(claim.job_id), messages


def ends(messages: list[Any]) -> list[Any]:
    """The messages besides progress and the GPU's release."""
    return [m for m in messages if not isinstance(m, (workers.Progress, workers.GpuFree))]


class StandIn:
    """What `run_batch` asks of an engine besides `generate` and its limits: a stand-in plans no
    device memory (as the CPU engine it wraps), so its batches are never cut."""

    def batch_room(self, request: GenerateRequest) -> int | None:
        return None


class CancelDuringLastStep(StandIn):
    """The engine, with a cancel request arriving while its last denoising step runs."""

    def __init__(self, engine: Any, store: jobs.JobStore) -> None:
        self.engine, self.store = engine, store
        self.limits, self.device = engine.limits, engine.device

    def generate(self, request: GenerateRequest, on_step: Any) -> Any:
        def step(i: int, n: int) -> None:
            if i == n:
                job_id = self.store._db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchone()[0]
                self.store.cancel(job_id)
            on_step(i, n)

        return self.engine.generate(request, on_step=step)


def test_a_cancel_during_the_last_step_keeps_the_finished_image(engine, store, tmp_path):
    job, messages = run_claim(CancelDuringLastStep(engine, store), store, tmp_path)
    assert job.cancel_requested  # the cancel was recorded, but came after the steps were done
    assert job.status == jobs.SUCCEEDED and len(job.images) == 1
    assert (tmp_path / job.images[0].file).is_file()
    assert messages[-1].status == jobs.SUCCEEDED


class StandInProcess:
    """What the supervisor reads of a worker process; `alive` is set by the test."""

    pid, exitcode, sentinel = 4242, 1, None

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False

    def join(self, timeout: float | None = None) -> None:
        pass


def supervisor_with_idle_worker(
    store: jobs.JobStore, tmp_path: Path, **batching: Any
) -> tuple[workers.Supervisor, Any, StandInProcess]:
    """A supervisor whose one worker is ready and idle; the worker's end of the pipe is returned.
    Without `batching` (max_batch, batch_window) it sends one job at a time, at once."""
    config = RuntimeConfig(model="unloaded", device="cpu")
    batching = batching or {"max_batch": 1, "batch_window": 0.0}
    supervisor = workers.Supervisor(store, config, ["cpu"], tmp_path, job_timeout=60, **batching)
    worker_end, process = attach_worker(supervisor.slots[0])
    return supervisor, worker_end, process


def supervisor_with_two_idle_workers(
    store: jobs.JobStore, tmp_path: Path, **batching: Any
) -> tuple[workers.Supervisor, Any, Any]:
    """A supervisor of two ready, idle workers (`batching`: max_batch, batch_window); their pipes' ends."""
    config = RuntimeConfig(model="unloaded", device="cpu")
    supervisor = workers.Supervisor(store, config, ["cpu", "cpu"], tmp_path, job_timeout=60, **batching)
    first_end, _ = attach_worker(supervisor.slots[0])
    second_end, _ = attach_worker(supervisor.slots[1])
    return supervisor, first_end, second_end


def attach_worker(slot: workers.WorkerSlot) -> tuple[Any, StandInProcess]:
    """Make `slot`'s worker a ready, idle stand-in process; the worker's end of its pipe and the process."""
    here, there = mp.Pipe()
    process = StandInProcess()
    slot.process, slot.conn, slot.state = process, here, "ready"
    return there, process


def waitable(process: StandInProcess) -> Any:
    """Give the stand-in a sentinel the supervisor's own loop (`_tick`) can wait on, as a live
    process's is: never ready. The returned end keeps it so; close it after the test."""
    process.sentinel, keep = mp.Pipe()
    return keep


def tick(supervisor: workers.Supervisor) -> None:
    """One round of the supervisor's loop, without its wait."""
    supervisor._dispatch()
    for slot in supervisor.slots:
        if slot.conn is not None:
            supervisor._drain(slot)
        supervisor._check(slot)


class DeferredWarmUps(StandIn):
    """The tiny engine with two warm-up parts left for after ready (`Engine.pending_warmups`): the
    first holds until the test releases it, so that a job arrives while it runs. `order` logs the
    parts and the jobs' engine calls as they begin."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.limits, self.device = engine, engine.limits, engine.device
        self.parts = ["inputs_s", "small_call_s"]
        self.order: list[str] = []
        self.running, self.release = threading.Event(), threading.Event()

    def pending_warmups(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def finish_warmup(self, name: str) -> float:
        self.parts.remove(name)
        self.order.append(name)
        if name == "inputs_s":
            self.running.set()
            assert self.release.wait(30)
        return 1.5

    def generate(self, request: GenerateRequest, **callbacks: Any) -> Any:
        self.order.append("job")
        return self.engine.generate(request, **callbacks)


def serving_deferred_warmups(engine, store, tmp_path):
    """A supervisor whose one worker, ready, runs `serve_batches` on a `DeferredWarmUps` in a thread."""
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path)
    standin = DeferredWarmUps(engine)
    supervisor._handle(supervisor.slots[0], workers.Ready({}, None, 1.0, {}))
    channel = workers.Channel(worker_end)
    writer = workers.Writer(store, tmp_path, channel)
    worker = threading.Thread(target=workers.serve_batches, args=(standin, store, worker_end, channel, writer))
    worker.start()
    return supervisor, standin, worker, writer


def test_a_job_that_arrives_during_the_deferred_warm_ups_runs_before_the_rest_of_them(engine, store, tmp_path):
    """A worker is ready before its deferred warm-ups have run; a job sent meanwhile waits only for
    the part running then, and the supervisor hears the parts' seconds once all have run."""
    supervisor, standin, worker, writer = serving_deferred_warmups(engine, store, tmp_path)
    slot = supervisor.slots[0]
    try:
        assert standin.running.wait(30)  # the worker took its first deferred part, its pipe empty
        job = store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL))
        tick(supervisor)
        assert slot.running == (job.id,)  # sent at once: the worker is ready as far as the supervisor knows
        standin.release.set()
        deadline = time.monotonic() + 60
        while (store.get(job.id).status != jobs.SUCCEEDED or "warm_s" not in supervisor.startup()) and (
            time.monotonic() < deadline
        ):
            tick(supervisor)
            time.sleep(0.01)
    finally:
        standin.release.set()
        slot.conn.send(None)
        worker.join(30)
        writer.close()
    assert store.get(job.id).status == jobs.SUCCEEDED
    assert standin.order == ["inputs_s", "job", "small_call_s"]  # the job ran before the part after the running one
    assert supervisor.startup()["deferred_warmup_parts"] == {"inputs_s": 1.5, "small_call_s": 1.5}
    assert not worker.is_alive()


def test_a_deferred_warm_up_that_fails_is_reported_and_the_others_still_run() -> None:
    from zturbo.errors import GPUMemoryError

    class FailingFirst:
        device = None  # off CUDA: the device still answers after the failure

        def __init__(self) -> None:
            self.parts = ["inputs_s", "small_call_s"]

        def pending_warmups(self) -> tuple[str, ...]:
            return tuple(self.parts)

        def finish_warmup(self, name: str) -> float:
            self.parts.remove(name)
            if name == "inputs_s":
                raise GPUMemoryError("out of memory in the VAE encoder")
            return 0.5

    here, there = mp.Pipe()
    warmups = workers.IdleWarmups(FailingFirst(), workers.Channel(there))
    warmups.run_next()
    assert warmups.pending()  # the failure did not stop the worker's loop
    assert [here.recv(), here.recv()] == [workers.Warming("inputs_s"), workers.Warming(None)] and not here.poll(0.1)
    warmups.run_next()
    assert not warmups.pending()
    assert [here.recv(), here.recv()] == [workers.Warming("small_call_s"), workers.Warming(None)]
    message = here.recv()
    assert isinstance(message, workers.Warmed) and message.parts == {"small_call_s": 0.5}
    assert message.errors == {"inputs_s": "GPUMemoryError: out of memory in the VAE encoder"}
    assert not here.poll(0.1)  # reported once


def test_a_deferred_warm_up_that_leaves_the_device_unanswering_ends_the_worker(monkeypatch) -> None:
    class BreaksTheDevice:
        device = None

        def pending_warmups(self) -> tuple[str, ...]:
            return ("inputs_s",)

        def finish_warmup(self, name: str) -> float:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    exits: list[int] = []
    monkeypatch.setattr(workers, "device_answers", lambda device: False)
    monkeypatch.setattr(workers.os, "_exit", exits.append)
    _, there = mp.Pipe()
    workers.IdleWarmups(BreaksTheDevice(), workers.Channel(there)).run_next()
    assert exits == [3]  # restarted like a crashed batch, before any job can run on that device


def test_a_batch_waiting_behind_a_hung_warm_up_part_is_stopped_at_the_time_limit(store, tmp_path):
    """A deferred part that never ends holds the batch sent meanwhile: the time limit counts that
    wait, the worker is killed, the batch's jobs run again uncounted (they never began), and the
    worker's next processes skip the part."""
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    slot = supervisor.slots[0]
    supervisor.job_timeout = 1.0
    events: list[tuple[str, str, dict[str, Any]]] = []
    supervisor.hooks.on_event = lambda job_id, event, data: events.append((job_id, event, data))
    worker_end.send(workers.Warming("inputs_s"))
    tick(supervisor)
    assert slot.warming == "inputs_s" and slot.view()["warming"] == "inputs_s"
    job = store.submit(batch_request("a fox"))
    tick(supervisor)
    assert slot.running == (job.id,) and slot.gpu_since is not None  # its clock runs while it waits
    tick(supervisor)
    assert process.alive  # within the limit
    slot.gpu_since -= 2
    tick(supervisor)
    assert not process.alive and slot.state == "restarting" and slot.warming is None
    assert slot.last_error == "deferred warm-up part inputs_s past the job time limit"
    after = store.get(job.id)
    assert (after.status, after.attempts) == (jobs.QUEUED, 0)
    [(_, _, requeued)] = [e for e in events if e[1] == "requeued"]
    assert "deferred warm-up part inputs_s ran past the time limit of 1 s" in requeued["reason"]
    assert list(slot.skipped_warmups) == ["inputs_s"]


def test_a_batch_sent_as_a_warm_up_part_begins_waits_with_its_clock_running(store, tmp_path):
    """The worker may begin a part just as a batch is sent to it: the batch's clock starts with the
    part's Warming, and starts again with its first Started once the part has ended."""
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path)
    slot = supervisor.slots[0]
    job = store.submit(batch_request("a fox"))
    tick(supervisor)
    assert slot.running == (job.id,) and slot.gpu_since is None
    worker_end.send(workers.Warming("small_call_s"))
    tick(supervisor)
    assert slot.gpu_since is not None
    worker_end.send(workers.Warming(None))
    tick(supervisor)
    assert slot.gpu_since is None and slot.warming is None
    worker_end.send(workers.Started(job.id))
    tick(supervisor)
    assert slot.gpu_since is not None


def test_a_free_worker_in_a_warm_up_part_is_sent_jobs_after_the_others(store, tmp_path):
    supervisor, first_end, second_end = supervisor_with_two_idle_workers(store, tmp_path, max_batch=1, batch_window=0.0)
    first_end.send(workers.Warming("inputs_s"))
    tick(supervisor)
    job = store.submit(batch_request("a fox"))
    tick(supervisor)
    assert supervisor.slots[1].running == (job.id,) and not supervisor.slots[0].running
    assert second_end.poll(1) and not first_end.poll(0.1)
    second_end.recv()
    # The other worker at its batch's last step takes the next job before the one in a part.
    second_end.send(workers.Started(job.id))
    second_end.send(workers.Progress(job.id, 2, 2))
    tick(supervisor)
    then = store.submit(batch_request("a heron"))
    tick(supervisor)
    assert supervisor.slots[1].waiting == (then.id,) and not supervisor.slots[0].running
    # With no worker at its last step, the one in a part is sent the job rather than leave it waiting.
    last = store.submit(batch_request("a crane"))
    tick(supervisor)
    assert supervisor.slots[0].running == (last.id,)


def test_skipped_warm_up_parts_are_not_run_and_are_reported_as_failed() -> None:
    class TwoParts:
        device = None

        def __init__(self) -> None:
            self.parts, self.ran = ["inputs_s", "small_call_s"], []

        def pending_warmups(self) -> tuple[str, ...]:
            return tuple(self.parts)

        def finish_warmup(self, name: str) -> float:
            self.parts.remove(name)
            self.ran.append(name)
            return 0.5

    here, there = mp.Pipe()
    engine = TwoParts()
    warmups = workers.IdleWarmups(engine, workers.Channel(there), {"inputs_s": "it hung"})
    assert warmups.pending()
    warmups.run_next()
    assert engine.ran == ["small_call_s"] and not warmups.pending()
    messages = [here.recv() for _ in range(3)]
    assert messages[:2] == [workers.Warming("small_call_s"), workers.Warming(None)]
    assert messages[2].parts == {"small_call_s": 0.5} and messages[2].errors == {"inputs_s": "it hung"}
    # Every part skipped: reported at once, as the worker begins to serve.
    here, there = mp.Pipe()
    skipped = {"inputs_s": "it hung", "small_call_s": "it hung"}
    nothing = workers.IdleWarmups(TwoParts(), workers.Channel(there), skipped)
    assert not nothing.pending()
    nothing.report_if_none_left()
    assert here.recv().errors == skipped and not (nothing.report_if_none_left() or here.poll(0.1))


def test_a_batch_sent_just_after_ready_runs_before_the_deferred_warm_ups(engine, store, tmp_path):
    """A worker waits for a pause with no batch before it starts a deferred part, so a batch the
    supervisor sends a moment after the pipe first reads empty is not held up behind one."""
    supervisor, standin, worker, writer = serving_deferred_warmups(engine, store, tmp_path)
    slot = supervisor.slots[0]
    standin.release.set()  # no part holds
    try:
        job = store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL))
        tick(supervisor)  # well within WARMUP_PAUSE_S of the worker's first look at its pipe
        deadline = time.monotonic() + 60
        while store.get(job.id).status != jobs.SUCCEEDED and time.monotonic() < deadline:
            tick(supervisor)
            time.sleep(0.01)
    finally:
        slot.conn.send(None)
        worker.join(30)
        writer.close()
    assert standin.order[0] == "job"


def test_a_job_sent_to_a_worker_that_had_died_idle_costs_no_attempt(store, tmp_path):
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    process.alive = False  # died while idle, before the supervisor looked
    worker_end.close()
    job = store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL))
    tick(supervisor)
    after = store.get(job.id)
    assert (after.status, after.attempts) == (jobs.QUEUED, 0)
    assert supervisor.slots[0].state == "restarting"


def test_an_attempt_counts_only_once_the_worker_has_taken_the_job(store, tmp_path):
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    job = store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL))
    tick(supervisor)
    [claim] = worker_end.recv()
    assert claim.job_id == job.id and store.get(job.id).status == jobs.RUNNING
    process.alive = False  # died before it read the job
    tick(supervisor)
    assert (store.get(job.id).status, store.get(job.id).attempts) == (jobs.QUEUED, 0)

    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    tick(supervisor)
    worker_end.send(workers.Started(worker_end.recv()[0].job_id))
    process.alive = False  # died while running it: a real attempt
    tick(supervisor)
    assert (store.get(job.id).status, store.get(job.id).attempts) == (jobs.QUEUED, 1)


def no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_fails_the_job_as_storage_and_the_worker_lives_on(engine, store, tmp_path, monkeypatch):
    monkeypatch.setattr(imageio.os, "fsync", no_space)  # where a full disk shows when a PNG is written
    job, messages = run_claim(engine, store, tmp_path)
    assert job.status == jobs.FAILED and job.error["type"] == "storage"
    assert str(tmp_path) in job.error["message"] and "No space left on device" in job.error["message"]
    assert [type(m) for m in ends(messages)] == [workers.Finished]
    assert messages[-1].status == jobs.FAILED  # reported as a job's failure; the worker did not exit
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob("*.png")) == []


def test_an_images_directory_that_cannot_be_made_fails_the_job_as_storage(engine, store, tmp_path):
    (tmp_path / "images").write_text("a file where the directory should be")
    job, messages = run_claim(engine, store, tmp_path / "images")
    assert job.status == jobs.FAILED and job.error["type"] == "storage"
    assert str(tmp_path / "images") in job.error["message"] and "is not a directory" in job.error["message"]
    assert messages[-1].status == jobs.FAILED


def refusing(fault: str, times: int | None = None) -> Any:
    """A store method that fails with `fault` (`times` times, else always), then does nothing."""
    from zturbo.errors import StorageError

    calls = []

    def refuse(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        if times is None or len(calls) <= times:
            if fault == "locked":  # another process held the write lock past the busy timeout
                raise sqlite3.OperationalError("database is locked")
            raise StorageError("cannot write the job store: server closed the connection unexpectedly")
        return True

    return refuse


@pytest.mark.parametrize("fault", ["storage", "locked"])
def test_a_job_end_the_store_refuses_for_a_while_is_recorded_on_a_later_try(
    engine, store, tmp_path, monkeypatch, fault
):
    real = store.succeed
    flaky = refusing(fault, times=2)
    monkeypatch.setattr(store, "succeed", lambda *args: flaky(*args) and real(*args))
    job, messages = run_claim(engine, store, tmp_path / "images", retry_s=(0.0, 0.0))
    assert job.status == jobs.SUCCEEDED and len(job.images) == 1
    assert [m.status for m in messages if isinstance(m, workers.Finished)] == [jobs.SUCCEEDED]


@pytest.mark.parametrize("fault", ["storage", "locked"])
def test_a_job_end_the_store_never_records_runs_again_and_the_worker_lives_on(
    engine, store, tmp_path, monkeypatch, fault
):
    """The writer gives up after its retries: no failure is reported for a job that made its image;
    the supervisor queues it again, its attempt given back, and it runs again."""
    monkeypatch.setattr(store, "succeed", refusing(fault))
    job, messages = run_claim(engine, store, tmp_path / "images", retry_s=(0.0,))  # returns: no exit, no exception
    assert job.status == jobs.RUNNING
    assert not any(isinstance(m, (workers.Finished, workers.Crashed)) for m in messages)
    [unrecorded] = [m for m in messages if isinstance(m, workers.Unrecorded)]
    assert unrecorded.job_id == job.id

    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    sentinel = waitable(process)
    slot = supervisor.slots[0]
    claim = store.get(job.id)
    slot.claims[job.id] = jobs.Claim(job.id, claim.attempts, claim.params)  # the worker's claim, as sent
    slot.running, slot.state = (job.id,), "busy"
    worker_end.send(workers.GpuFree((job.id,), 1))
    worker_end.send(unrecorded)
    supervisor._tick()  # reads the messages
    supervisor._tick()  # queues it again, and sends it to the free worker
    [again] = worker_end.recv()
    assert (again.job_id, again.attempt) == (job.id, 1)  # the unrecorded run cost no attempt
    sentinel.close()


class StandInContext:
    """The supervisor's process context, starting stand-in processes (a restart spawns no worker)."""

    Pipe = staticmethod(mp.Pipe)

    def Process(self, **kwargs: Any) -> StandInProcess:  # multiprocessing's name
        process = StandInProcess()
        process.start = lambda: None  # type: ignore[attr-defined]
        return process


def lora_request(*loras: str) -> GenerateRequest:
    return GenerateRequest.create("a fox", limits=LIMITS, **SMALL, loras=list(loras) or None)


def test_a_worker_is_sent_a_job_of_its_last_lora_set_first_until_it_restarts(store, tmp_path):
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    supervisor._ctx = StandInContext()
    first = store.submit(lora_request("a"))
    tick(supervisor)
    assert [c.job_id for c in worker_end.recv()] == [first.id]
    base, same = store.submit(lora_request()), store.submit(lora_request("a"))  # queued in that order
    stats = {"switches": 1, "switch_seconds": 0.5, "cache_hits": 0, "cache_misses": 1, "cache_bytes": 10}
    worker_end.send(workers.Finished(first.id, jobs.SUCCEEDED, 1.0, loras={**stats, "backup_bytes": 64}))
    tick(supervisor)  # the finish is read; the next dispatch comes with the next tick
    tick(supervisor)
    assert [c.job_id for c in worker_end.recv()] == [same.id]  # its set is merged already: ahead of the older job
    assert supervisor.loras_by_worker()["worker-0"]["backup_bytes"] == 64

    process.alive = False  # the worker dies; its successor starts from the base weights
    tick(supervisor)
    slot = supervisor.slots[0]
    slot.restart_at = 0.0
    tick(supervisor)
    assert slot.state == "starting" and slot.lora_set == jobs.NO_LORAS
    numbers = supervisor.loras_by_worker()["worker-0"]
    assert (numbers["switches"], numbers["cache_misses"]) == (1, 1)  # counters outlive the process
    assert "backup_bytes" not in numbers  # the new process has saved no base weights yet
    assert store.get(base.id).status == jobs.QUEUED


def test_lora_counters_never_go_down_when_a_workers_engine_makes_a_new_merger(store, tmp_path):
    """An out-of-memory or precision recovery replaces the engine's merger, whose counts start again
    from 0 in the same process; then a restart of the process. The counters only add up."""
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path)
    supervisor._ctx = StandInContext()
    reports = [(3, 1.5), (1, 0.25), (2, 0.5)]  # the second comes after a recovery's new merger
    for switches, seconds in reports:
        job = store.submit(lora_request("a"))
        tick(supervisor)
        assert [c.job_id for c in worker_end.recv()] == [job.id]
        stats = {"switches": switches, "switch_seconds": seconds, "cache_hits": 0, "cache_misses": 1}
        worker_end.send(workers.Finished(job.id, jobs.SUCCEEDED, 1.0, loras=stats))
        tick(supervisor)
    numbers = supervisor.loras_by_worker()["worker-0"]
    assert (numbers["switches"], numbers["switch_seconds"], numbers["cache_misses"]) == (3 + 2, 1.5 + 0.5, 1)
    slot = supervisor.slots[0]
    supervisor._spawn(slot)  # a new process: what the old one counted stays
    assert supervisor.loras_by_worker()["worker-0"]["switches"] == 5


def test_a_finished_job_reports_the_workers_lora_numbers(engine, store, tmp_path):
    from loras import write_lora

    path = tmp_path / "style.safetensors"
    write_lora(path, "peft", engine.components.transformer, seed=3)
    store.submit(GenerateRequest.create("a fox", limits=engine.limits, **SMALL, loras=[(str(path), 0.7)]))
    claim = store.claim("worker-0")
    before = workers._lora_stats(engine)
    try:
        messages = run_claims(engine, store, tmp_path, [claim])
    finally:
        engine.merger.restore()  # the session's engine goes back to its base weights
    [finished] = [m for m in messages if isinstance(m, workers.Finished)]
    assert finished.status == jobs.SUCCEEDED
    numbers = finished.loras
    assert numbers["switches"] == before.get("switches", 0) + 1 and numbers["switch_seconds"] > 0
    assert numbers["cache_misses"] == before["cache_misses"] + 1 and numbers["backup_bytes"] > 0


def test_progress_previews_reach_the_events_and_go_when_the_job_ends(store, tmp_path):
    import base64

    events: list[tuple[str, str, dict[str, Any]]] = []
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path)
    supervisor.hooks = workers.Hooks(on_event=lambda job_id, event, data: events.append((job_id, event, data)))
    job = store.submit(lora_request(), preview=True)
    tick(supervisor)
    [claim] = worker_end.recv()
    assert claim.preview
    jpeg = b"\xff\xd8 a small JPEG \xff\xd9"
    worker_end.send(workers.Progress(job.id, 1, 2, jpeg))
    worker_end.send(workers.Progress(job.id, 2, 2))  # a step without a preview keeps the last one
    tick(supervisor)
    progress = [data for _, event, data in events if event == "progress"]
    assert progress == [{"step": 1, "steps": 2, "preview": base64.b64encode(jpeg).decode()}, {"step": 2, "steps": 2}]
    assert supervisor.progress(job.id) == (2, 2) and supervisor.preview(job.id) == jpeg
    worker_end.send(workers.GpuFree((job.id,), 1))
    tick(supervisor)
    assert supervisor.slots[0].state == "ready" and supervisor.workers()[0]["jobs"] == [job.id]  # being written
    worker_end.send(workers.Finished(job.id, jobs.SUCCEEDED, 1.0))
    tick(supervisor)
    assert supervisor.preview(job.id) is None and supervisor.progress(job.id) is None
    assert supervisor.workers()[0]["jobs"] == []


def batch_request(prompt: str) -> GenerateRequest:
    return GenerateRequest.create(prompt, limits=LIMITS, **SMALL)


def running_batch(
    store: jobs.JobStore, tmp_path: Path, prompts: tuple[str, ...], events: list[Any] | None = None
) -> tuple[workers.Supervisor, Any, StandInProcess, list[jobs.Job]]:
    """A supervisor whose worker has begun a batch of one job per prompt; `events` collects its hooks."""
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=0.0)
    supervisor._ctx = StandInContext()
    if events is not None:
        supervisor.hooks = workers.Hooks(
            on_event=lambda job_id, event, data: events.append((job_id, event, data)),
            on_finished=lambda msg: events.append((msg.job_id, "finished", msg.status)),
        )
    queued = [store.submit(batch_request(p)) for p in prompts]
    tick(supervisor)
    sent = worker_end.recv()
    assert [c.job_id for c in sent] == [j.id for j in queued]
    for claim in sent:
        worker_end.send(workers.Started(claim.job_id))
    tick(supervisor)
    return supervisor, worker_end, process, queued


def batch_keys(store: jobs.JobStore, queued: list[jobs.Job]) -> list[str]:
    return [store._db.execute("SELECT batch_key FROM jobs WHERE id = ?", (j.id,)).fetchone()[0] for j in queued]


def test_a_crashed_batch_runs_its_jobs_alone_and_blames_none_of_them(store, tmp_path):
    events: list[Any] = []
    supervisor, worker_end, process, queued = running_batch(store, tmp_path, ("a fox", "a cat", "a heron"), events)
    worker_end.send(workers.Crashed(tuple(j.id for j in queued), "the batch of 3 jobs ...: RuntimeError: CUDA error"))
    process.alive = False
    tick(supervisor)
    assert [(store.get(j.id).status, store.get(j.id).attempts) for j in queued] == [(jobs.QUEUED, 0)] * 3
    assert batch_keys(store, queued) == [jobs.NO_BATCH] * 3
    assert [len(store.claim_batch("worker-1", jobs.NO_LORAS, 4)) for _ in queued] == [1, 1, 1]  # each alone
    requeued = [data["reason"] for _, event, data in events if event == "requeued"]
    assert len(requeued) == 3 and all("CUDA error" in reason for reason in requeued)


def test_a_lone_job_that_crashes_costs_its_attempt(store, tmp_path):
    supervisor, _, process, [job] = running_batch(store, tmp_path, ("a fox",))
    process.alive = False
    tick(supervisor)
    assert (store.get(job.id).status, store.get(job.id).attempts) == (jobs.QUEUED, 1)
    assert batch_keys(store, [job]) != [jobs.NO_BATCH]  # it may batch again


def test_a_batch_past_the_time_limit_runs_its_jobs_alone_and_a_lone_job_fails(store, tmp_path):
    supervisor, _, process, queued = running_batch(store, tmp_path, ("a fox", "a cat"))
    supervisor.slots[0].gpu_since = time.monotonic() - 120  # its GPU work began two minutes ago (limit: 60 s)
    tick(supervisor)
    assert not process.alive and supervisor.slots[0].state == "restarting"
    assert [(store.get(j.id).status, store.get(j.id).attempts) for j in queued] == [(jobs.QUEUED, 1)] * 2
    assert batch_keys(store, queued) == [jobs.NO_BATCH] * 2

    alone = jobs.JobStore(tmp_path / "alone.sqlite3")
    supervisor, _, process, [job] = running_batch(alone, tmp_path, ("a heron",))
    supervisor.slots[0].gpu_since = time.monotonic() - 120
    tick(supervisor)
    failed = alone.get(job.id)
    alone.close()
    assert not process.alive and failed.status == jobs.FAILED and failed.error["type"] == "timeout"


def test_the_time_limit_counts_gpu_work_and_the_writing_has_its_own(store, tmp_path):
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    supervisor.job_timeout = 1.0
    job = store.submit(batch_request("a fox"))
    tick(supervisor)
    [claim] = worker_end.recv()
    time.sleep(1.3)  # the worker waits for its writer before it begins the batch: not the batch's time
    tick(supervisor)
    assert process.alive
    worker_end.send(workers.Started(claim.job_id))
    worker_end.send(workers.GpuFree((claim.job_id,), 1))  # done on the GPU; its images wait for the writer
    tick(supervisor)
    assert process.alive and supervisor.slots[0].claims
    supervisor.slots[0].handed[claim.job_id] = time.monotonic() - 2  # the write is past its own deadline
    tick(supervisor)
    assert not process.alive
    after = store.get(job.id)
    assert (after.status, after.attempts) == (jobs.QUEUED, 1)  # counted: a disk that never takes it ends


def test_a_time_out_first_reads_what_the_worker_finished(store, tmp_path):
    events: list[Any] = []
    supervisor, worker_end, process, [job] = running_batch(store, tmp_path, ("a fox",), events)
    slot = supervisor.slots[0]
    slot.gpu_since = time.monotonic() - 120
    claim = slot.claims[job.id]
    assert store.succeed(claim, [])  # the writer recorded it; its messages wait in the pipe
    worker_end.send(workers.GpuFree((job.id,), 1))
    worker_end.send(workers.Finished(job.id, jobs.SUCCEEDED, 1.0))
    assert worker_end.poll() is False and slot.conn.poll(5)
    supervisor._check(slot)  # the limit is seen before the loop reads the pipe
    assert process.alive and store.get(job.id).status == jobs.SUCCEEDED
    assert (job.id, "finished", jobs.SUCCEEDED) in events


def test_a_failed_send_first_reads_what_the_dead_worker_finished(store, tmp_path):
    events: list[Any] = []
    supervisor, worker_end, _, [done] = running_batch(store, tmp_path, ("a fox",), events)
    claim = supervisor.slots[0].claims[done.id]
    worker_end.send(workers.GpuFree((done.id,), 1))
    tick(supervisor)
    assert store.succeed(claim, [])
    worker_end.send(workers.Finished(done.id, jobs.SUCCEEDED, 1.0))
    worker_end.close()  # the worker is gone, not yet reaped
    waiting = store.submit(batch_request("a cat"))
    supervisor._dispatch()
    assert (done.id, "finished", jobs.SUCCEEDED) in events
    assert (store.get(waiting.id).status, store.get(waiting.id).attempts) == (jobs.QUEUED, 0)


def test_a_window_open_at_shutdown_does_not_spin_the_supervisor(store, tmp_path):
    supervisor, _, _ = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=0.5)
    store.submit(batch_request("a fox"))
    supervisor._dispatch()  # a lone job: the window opens
    supervisor.slots[0].window_until = time.monotonic() - 1  # ... and ends while no job may start
    supervisor.stop_dispatch()
    assert supervisor._wait_s() == 0.25  # the loop waits for messages, not 0 s each round


def test_jobs_a_worker_gives_back_queue_again_in_their_place_and_a_cancelled_one_ends(store, tmp_path):
    events: list[Any] = []
    supervisor, worker_end, _, queued = running_batch(store, tmp_path, ("a fox", "a cat", "a heron"), events)
    first, given, cancelled = queued
    store.cancel(cancelled.id)  # flagged while it runs
    key = jobs.batch_key(batch_request("a fox"))
    worker_end.send(workers.BatchRoom(key, 1, (given.id, cancelled.id)))
    tick(supervisor)
    slot = supervisor.slots[0]
    assert slot.running == (first.id,) and set(slot.claims) == {first.id} and slot.rooms == {key: 1}
    after = store.get(given.id)
    assert (after.status, after.attempts) == (jobs.QUEUED, 0) and batch_keys(store, [given]) == [key]
    assert store.get(cancelled.id).status == jobs.CANCELLED
    assert [e[:2] for e in events if e[1] == "requeued"] == [(given.id, "requeued")]
    assert (cancelled.id, "finished", jobs.CANCELLED) in events
    later = store.submit(batch_request("a wolf"))
    worker_end.send(workers.GpuFree((first.id,), 1))
    tick(supervisor)
    tick(supervisor)
    assert [c.job_id for c in worker_end.recv()] == [given.id]  # in its place, and 1 image on this worker
    assert [c.job_id for c in store.claim_batch("worker-1", jobs.NO_LORAS, 4)] == [later.id]


def test_an_unreachable_store_reads_as_no_cancel_and_the_batch_runs_on(engine, store, tmp_path, monkeypatch, caplog):
    """A brief outage of the store during the cancel checks (at the batch's start and each step)
    neither fails the batch nor floods the log: one line per batch for the steps."""
    monkeypatch.setattr(store, "cancels_requested", refusing("storage"))
    with caplog.at_level("WARNING", logger="zturbo"):
        job, _ = run_claim(engine, store, tmp_path, steps=4)
    assert job.status == jobs.SUCCEEDED and len(job.images) == 1
    assert len([r for r in caplog.records if "cancels of" in r.getMessage()]) == 2  # the start, then the steps


def test_a_store_fault_in_the_supervisors_tick_still_reads_the_workers_messages(store, tmp_path, monkeypatch, caplog):
    """The heartbeat and the claims fail while the store is down; the workers' progress, ends and
    deaths are still read, and the fault is logged once, not at every tick."""
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path)
    sentinel = waitable(process)
    job = store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL))
    tick(supervisor)
    worker_end.recv()
    monkeypatch.setattr(store, "heartbeat", refusing("storage"))
    monkeypatch.setattr(store, "claim_batch", refusing("storage"))
    worker_end.send(workers.Started(job.id))
    worker_end.send(workers.Progress(job.id, 1, 2))
    with caplog.at_level("WARNING", logger="zturbo.workers"):
        supervisor._tick()
        supervisor._tick()
    assert supervisor.progress(job.id) == (1, 2) and job.id in supervisor.slots[0].started
    assert len([r for r in caplog.records if "job store cannot be reached" in r.getMessage()]) == 1
    sentinel.close()
