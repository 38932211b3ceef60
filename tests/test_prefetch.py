"""A busy worker's next batch, sent at its running batch's last denoising step (`WorkerSlot.waiting`),
in this process: the supervisor's slots have stand-in processes and the test plays the worker's loop
(`worker_main`) with the session's tiny engine where pixels matter."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from test_batching import pixels, request
from test_workers import (
    SMALL,
    StandIn,
    StandInContext,
    attach_worker,
    supervisor_with_idle_worker,
    supervisor_with_two_idle_workers,
    tick,
)
from zturbo.request import GenerateRequest
from zturbo.serving import jobs, workers

STEPS = SMALL["steps"]


@pytest.fixture
def store(tmp_path):
    s = jobs.JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def received(worker_end: Any) -> list[str]:
    """The job ids of the batch in a worker's pipe; an empty pipe fails the test at once rather than hang."""
    assert worker_end.poll(), "no batch was sent"
    return [claim.job_id for claim in worker_end.recv()]


def turn(supervisor: workers.Supervisor) -> None:
    """One round of the supervisor's loop once a message wakes it: the messages read, then a dispatch."""
    for slot in supervisor.slots:
        if slot.conn is not None:
            supervisor._drain(slot)
    supervisor._dispatch()


class BesideTheSupervisor(StandIn):
    """The engine, with the supervisor's thread taking a turn after each step (as it runs beside a
    busy worker), then `after_step(i, n)`; the worker's view at each run's last step."""

    def __init__(self, engine: Any, supervisor: workers.Supervisor, after_step: Any) -> None:
        self.engine, self.supervisor, self.after_step = engine, supervisor, after_step
        self.limits, self.device = engine.limits, engine.device
        self.views: list[dict[str, Any]] = []

    def generate(self, request: GenerateRequest, on_step: Any, **callbacks: Any) -> Any:
        def step(i: int, n: int) -> None:
            on_step(i, n)
            turn(self.supervisor)
            if i == n:
                self.views.append(self.supervisor.workers()[0])
            self.after_step(i, n)

        return self.engine.generate(request, on_step=step, **callbacks)


class FreeWatch(workers.Channel):
    """The worker's channel, noting at each GpuFree whether its next batch already waits in its pipe."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.next_in_pipe: list[bool] = []

    def send(self, message: Any) -> None:
        if isinstance(message, workers.GpuFree):
            self.next_in_pipe.append(self.conn.poll())
        super().send(message)


def run_worker(engine: Any, store: jobs.JobStore, worker_end: Any, channel: workers.Channel, writer: Any) -> list[Any]:
    """The worker's loop while its pipe holds a batch: Started for each job, then the batch; the job ids sent."""
    sent = []
    while worker_end.poll():
        claims = worker_end.recv()
        sent.append([claim.job_id for claim in claims])
        for claim in claims:
            channel.send(workers.Started(claim.job_id))
        workers.run_batch(engine, store, claims, channel, writer)
    return sent


def test_a_busy_worker_gets_its_next_batch_at_the_last_step_and_each_image_matches_its_single_run(
    engine, store, tmp_path
):
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path, max_batch=2, batch_window=0.0)
    events: list[tuple[str, str]] = []
    supervisor.hooks = workers.Hooks(
        on_event=lambda job_id, event, data: events.append((event, job_id)),
        on_batch=lambda count, images: events.append(("gpu free", str(count))),
    )
    made = [request(f"a fox number {i}", engine.limits, seed=10 + i, steps=3) for i in range(4)]
    queued = [store.submit(r) for r in made[:2]]

    def arrive(i: int, n: int) -> None:  # a job arrives after each of the first batch's first two steps
        if i < n and len(queued) < 4:
            queued.append(store.submit(made[len(queued)]))

    running = BesideTheSupervisor(engine, supervisor, arrive)
    channel = FreeWatch(worker_end)
    writer = workers.Writer(store, tmp_path, channel)
    tick(supervisor)
    sent = run_worker(running, store, worker_end, channel, writer)
    writer.close()
    tick(supervisor)

    ids = [job.id for job in queued]
    assert sent == [ids[:2], ids[2:]]  # both jobs that arrived while the first batch ran are in the next
    assert channel.next_in_pipe == [True, False]  # in the pipe when the GPU was freed
    assert events.index(("running", ids[2])) < events.index(("gpu free", "2"))
    first_last_step = running.views[0]
    assert (first_last_step["job"], first_last_step["waiting"]) == (ids[0], ids[2:])
    assert set(first_last_step["jobs"]) == set(ids) and running.views[1]["waiting"] == []
    for job, req in zip(queued, made, strict=True):
        done = store.get(job.id)
        assert (done.status, done.attempts, len(done.images)) == (jobs.SUCCEEDED, 1, 1)
        [single] = engine.generate(req).images
        assert np.abs(pixels(tmp_path / done.images[0].file).astype(int) - np.asarray(single.image)).max() <= 1
    assert supervisor.slots[0].claims == {} and supervisor.slots[0].state == "ready"


def waiting_behind(
    store: jobs.JobStore, tmp_path: Any, prompts: tuple[str, ...]
) -> tuple[workers.Supervisor, Any, Any, jobs.Job, list[jobs.Job]]:
    """A supervisor whose worker runs one job that has made its last step, with a batch of one
    job per prompt sent to run next."""
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path, max_batch=2, batch_window=0.0)
    supervisor._ctx = StandInContext()
    first = store.submit(request("a heron"))
    tick(supervisor)
    assert received(worker_end) == [first.id]
    worker_end.send(workers.Started(first.id))
    tick(supervisor)
    waiting = [store.submit(request(p)) for p in prompts]
    tick(supervisor)
    assert not worker_end.poll()  # not before its last step: a job that arrives until then joins the batch
    worker_end.send(workers.Progress(first.id, STEPS, STEPS))
    turn(supervisor)
    return supervisor, worker_end, process, first, waiting


def test_a_worker_killed_with_a_batch_waiting_runs_every_job_once_and_the_waiting_lose_no_attempt(
    engine, store, tmp_path
):
    supervisor, worker_end, process, first, waiting = waiting_behind(store, tmp_path, ("a fox", "a cat"))
    assert received(worker_end) == [job.id for job in waiting]
    slot = supervisor.slots[0]
    assert slot.running == (first.id,) and slot.waiting == tuple(job.id for job in waiting)
    process.alive = False  # kill -9 while it decodes
    tick(supervisor)
    assert (store.get(first.id).status, store.get(first.id).attempts) == (jobs.QUEUED, 1)  # it ran: counted
    for job in waiting:  # never began: uncounted, and still free to batch
        assert (store.get(job.id).status, store.get(job.id).attempts) == (jobs.QUEUED, 0)
        assert store._db.execute("SELECT batch_key FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] != jobs.NO_BATCH
    assert (slot.claims, slot.running, slot.waiting, slot.state) == ({}, (), (), "restarting")

    finished: list[tuple[str, str]] = []
    supervisor.hooks = workers.Hooks(on_finished=lambda msg: finished.append((msg.job_id, msg.status)))
    worker_end, _ = attach_worker(slot)  # the restarted worker
    channel = workers.Channel(worker_end)
    writer = workers.Writer(store, tmp_path, channel)
    everyone = [first, *waiting]
    deadline = time.monotonic() + 60
    while not all(store.get(job.id).finished for job in everyone):
        assert time.monotonic() < deadline, [store.get(job.id).status for job in everyone]
        tick(supervisor)
        if not run_worker(engine, store, worker_end, channel, writer):
            time.sleep(0.01)
    writer.close()
    tick(supervisor)
    assert sorted(finished) == sorted((job.id, jobs.SUCCEEDED) for job in everyone)  # each once
    assert [store.get(job.id).attempts for job in everyone] == [2, 1, 1]
    assert all(len(list(tmp_path.glob(f"{job.id}-*.png"))) == 1 for job in everyone)


class Recording(StandIn):
    """The engine; the prompts of each run."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.limits, self.device = engine, engine.limits, engine.device
        self.runs: list[tuple[str, ...]] = []

    def generate(self, request: GenerateRequest, on_step: Any, **callbacks: Any) -> Any:
        self.runs.append(request.prompts)
        return self.engine.generate(request, on_step=on_step, **callbacks)


def test_a_job_cancelled_while_its_batch_waits_ends_without_running(engine, store, tmp_path):
    supervisor, worker_end, _, first, (keep, drop) = waiting_behind(store, tmp_path, ("a fox", "a cat"))
    assert worker_end.poll()
    claims = worker_end.recv()
    cancelled = store.cancel(drop.id)
    assert (cancelled.status, cancelled.cancel_requested) == (jobs.RUNNING, True)  # claimed: flagged
    worker_end.send(workers.GpuFree((first.id,), 1))
    tick(supervisor)

    recording = Recording(engine)
    channel = workers.Channel(worker_end)
    writer = workers.Writer(store, tmp_path, channel)
    for claim in claims:
        channel.send(workers.Started(claim.job_id))
    workers.run_batch(recording, store, claims, channel, writer)
    writer.close()
    tick(supervisor)
    assert recording.runs == [("a fox",)]  # the cancelled job never reached the GPU
    dropped = store.get(drop.id)
    assert (dropped.status, dropped.images) == (jobs.CANCELLED, ())
    assert store.get(keep.id).status == jobs.SUCCEEDED
    assert list(tmp_path.glob(f"{drop.id}*")) == []


def test_a_waiting_batch_is_not_timed_out_for_its_wait(store, tmp_path):
    supervisor, worker_end, process, first, [then] = waiting_behind(store, tmp_path, ("a fox",))
    supervisor.job_timeout = 0.4
    assert received(worker_end) == [then.id]
    worker_end.send(workers.GpuFree((first.id,), 1))
    worker_end.send(workers.Finished(first.id, jobs.SUCCEEDED, 0.1))  # written: its own limit is met
    tick(supervisor)
    slot = supervisor.slots[0]
    assert slot.running == (then.id,) and slot.gpu_since is None
    time.sleep(0.5)  # the worker waits for its writer first: longer than the limit, and not GPU work
    tick(supervisor)
    assert process.alive
    began = time.monotonic()
    worker_end.send(workers.Started(then.id))
    tick(supervisor)
    assert process.alive and slot.gpu_since is not None and slot.gpu_since >= began  # its own clock
    time.sleep(0.5)
    tick(supervisor)
    assert not process.alive
    failed = store.get(then.id)
    assert (failed.status, failed.error["type"]) == (jobs.FAILED, "timeout")


def test_a_large_waiting_batch_is_held_until_the_gpu_is_free_and_a_stop_sends_no_new_one(store, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "PIPE_ROOM", 0)  # any batch: too large to leave in a busy worker's pipe
    supervisor, worker_end, _, first, [then] = waiting_behind(store, tmp_path, ("a fox",))
    assert not worker_end.poll()  # claimed, held back: the send could block while the worker runs
    assert store.get(then.id).status == jobs.RUNNING and supervisor.workers()[0]["waiting"] == [then.id]
    supervisor.stop_dispatch()  # the server begins to stop: the held batch was claimed before, so it runs
    later = store.submit(request("a cat"))
    worker_end.send(workers.GpuFree((first.id,), 1))
    turn(supervisor)
    assert received(worker_end) == [then.id]
    worker_end.send(workers.Started(then.id))
    worker_end.send(workers.Progress(then.id, STEPS, STEPS))
    turn(supervisor)
    assert not worker_end.poll() and supervisor.slots[0].waiting == ()  # none sent after the stop began
    assert store.get(later.id).status == jobs.QUEUED


def test_an_idle_worker_takes_the_next_job_before_a_busy_one_is_sent_it(store, tmp_path):
    supervisor, busy_end, idle_end = supervisor_with_two_idle_workers(store, tmp_path, max_batch=2, batch_window=30.0)
    running = [store.submit(request(p)) for p in ("a fox", "a cat")]
    tick(supervisor)
    assert received(busy_end) == [job.id for job in running]
    for job in running:
        busy_end.send(workers.Started(job.id))
        busy_end.send(workers.Progress(job.id, STEPS, STEPS))
    turn(supervisor)
    lone = store.submit(request("a heron"))
    turn(supervisor)  # the idle worker waits for a companion: the busy one is not sent the job meanwhile
    assert not busy_end.poll() and not idle_end.poll()
    companion = store.submit(request("a wolf"))
    turn(supervisor)
    assert received(idle_end) == [lone.id, companion.id]
    later = store.submit(request("an owl"))
    turn(supervisor)  # no worker is idle now: the busy one, at its last step, gets it to run next
    assert received(busy_end) == [later.id] and not idle_end.poll()


def test_a_running_batch_given_back_before_its_gpu_free_leaves_the_waiting_batch_next(store, tmp_path):
    supervisor, worker_end, _, first, [then] = waiting_behind(store, tmp_path, ("a fox",))
    assert received(worker_end) == [then.id]
    job = store.release(first.id, 1, "its batch ran out of GPU memory", count_attempt=False, solo=True)
    worker_end.send(workers.Released(first.id, job.status, job.attempts, "its batch ran out of GPU memory"))
    worker_end.send(workers.Finished("an-earlier-job", jobs.SUCCEEDED, 1.0))  # the writer reports an older batch
    other = store.submit(request("a cat"))
    turn(supervisor)
    slot = supervisor.slots[0]
    assert (slot.running, slot.waiting, slot.state) == ((then.id,), (), "busy")  # the worker runs it next
    assert not worker_end.poll() and store.get(other.id).status == jobs.QUEUED


def test_the_last_steps_progress_waits_for_the_device_to_run_it(engine, store, tmp_path, monkeypatch):
    said: list[Any] = []

    class Told(workers.Channel):
        def send(self, message: Any) -> None:
            said.append((type(message).__name__, getattr(message, "step", None)))
            super().send(message)

    monkeypatch.setattr(workers, "_settle", lambda device: said.append(("settled", str(device))))
    store.submit(request("a fox", engine.limits, steps=3))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    _supervisor_end, there = workers.mp.Pipe()  # held open: the worker's sends need a reader
    writer = workers.Writer(store, tmp_path, Told(there))
    workers.run_batch(engine, store, claims, writer.channel, writer)
    writer.close()
    steps = [entry for entry in said if entry[0] in ("Progress", "settled")]
    # Only the last: the supervisor claims the next batch on it, and the host stays ahead until then.
    assert steps == [("Progress", 1), ("Progress", 2), ("settled", "cpu"), ("Progress", 3)]
