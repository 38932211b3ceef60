"""Batching and the writer, in this process with the session's tiny engine: jobs claimed together
make the pixels of their single runs, a cancel stays per job, a worker death releases every job it
holds, a lone job waits no longer than the batching window, and a job is `succeeded` only once its
file is written."""

from __future__ import annotations

import io
import re
import sqlite3
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from test_workers import LIMITS, SMALL, StandIn, StandInContext, run_claims, supervisor_with_idle_worker, tick
from zturbo import imageio
from zturbo.request import GenerateRequest
from zturbo.serving import jobs, workers


@pytest.fixture
def store(tmp_path):
    s = jobs.JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def request(prompt: str, limits: Any = LIMITS, **fields: Any) -> GenerateRequest:
    return GenerateRequest.create(prompt, limits=limits, **(SMALL | fields))


def pixels(path: Any) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_batch_of_jobs_makes_the_images_of_their_single_runs(engine, store, tmp_path):
    made = [request("a fox", engine.limits, seed=1), request("a cat", engine.limits, seed=7, batch=2),
            request("a heron", engine.limits, seed=3)]  # fmt: skip
    queued = [store.submit(r) for r in made]
    other = store.submit(request("a fox", engine.limits, steps=1))  # another step count: not in this batch
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    assert [c.job_id for c in claims] == [j.id for j in queued] and [c.images for c in claims] == [1, 2, 1]
    assert store.get(other.id).status == jobs.QUEUED

    messages = run_claims(engine, store, tmp_path, claims)
    for job, req in zip(queued, made, strict=True):
        done = store.get(job.id)
        assert done.status == jobs.SUCCEEDED and len(done.images) == req.num_images
        for ref, single in zip(done.images, engine.generate(req).images, strict=True):
            # The engine's batch == singles invariant (test_engine): CPU matmuls of another batch
            # size may round differently, by at most one level.
            diff = pixels(tmp_path / ref.file).astype(int) - np.asarray(single.image).astype(int)
            assert np.abs(diff).max() <= 1
            meta = imageio.read_metadata(tmp_path / ref.file)
            assert (meta["prompt"], meta["seed"], ref.seed) == (single.prompt, single.seed, single.seed)
    free = [m for m in messages if isinstance(m, workers.GpuFree)]
    assert [set(m.job_ids) for m in free] == [{j.id for j in queued}]  # one run on the GPU for all three


class CancelInBatch(StandIn):
    """The engine, with cancel requests for `victims` arriving during the first step; counts the steps."""

    def __init__(self, engine: Any, store: jobs.JobStore, victims: list[str]) -> None:
        self.engine, self.store, self.victims = engine, store, victims
        self.limits, self.device = engine.limits, engine.device
        self.steps = 0

    def generate(self, request: GenerateRequest, on_step: Any) -> Any:
        def step(i: int, n: int) -> None:
            self.steps += 1
            if i == 1:
                for job_id in self.victims:
                    self.store.cancel(job_id)
            on_step(i, n)

        return self.engine.generate(request, on_step=step)


def test_a_cancelled_job_leaves_its_batch_and_the_others_finish(engine, store, tmp_path):
    keep, drop = (store.submit(request(p, engine.limits, steps=3)) for p in ("a fox", "a cat"))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    assert len(claims) == 2
    run_claims(CancelInBatch(engine, store, [drop.id]), store, tmp_path, claims)
    kept, dropped = store.get(keep.id), store.get(drop.id)
    assert kept.status == jobs.SUCCEEDED and len(kept.images) == 1 and (tmp_path / kept.images[0].file).is_file()
    assert dropped.status == jobs.CANCELLED and dropped.images == ()
    assert sorted(p.name for p in tmp_path.glob(f"{drop.id}*")) == []


def test_a_batch_whose_jobs_are_all_cancelled_stops(engine, store, tmp_path):
    a, b = (store.submit(request(p, engine.limits, steps=4)) for p in ("a fox", "a cat"))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    cancelling = CancelInBatch(engine, store, [a.id, b.id])
    run_claims(cancelling, store, tmp_path, claims)
    assert cancelling.steps == 1  # stopped after the step the cancels arrived in, not after all 4
    assert [store.get(j.id).status for j in (a, b)] == [jobs.CANCELLED] * 2


def test_the_supervisor_sends_batches_within_its_pixel_budget(engine, store, tmp_path):
    budget = 2 * 32 * 32
    supervisor, worker_end, _ = supervisor_with_idle_worker(
        store, tmp_path, max_batch=8, max_batch_pixels=budget, batch_window=0.0
    )
    queued = [store.submit(request(p, engine.limits, width=32, height=32)) for p in ("a", "b", "c")]
    tick(supervisor)
    assert [c.job_id for c in worker_end.recv()] == [j.id for j in queued[:2]]  # 2 x 32² fill the budget


def test_a_worker_killed_mid_batch_releases_every_job_it_holds(store, tmp_path):
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=0.0)
    supervisor._ctx = StandInContext()
    written = store.submit(request("being written"))
    tick(supervisor)
    [first] = worker_end.recv()
    worker_end.send(workers.Started(first.job_id))
    worker_end.send(workers.GpuFree((first.job_id,), 1))  # its images are with the writer
    batch = [store.submit(request(p)) for p in ("a fox", "a cat", "a heron")]
    unsent = store.submit(request("a fox", steps=1))  # incompatible: stays queued
    tick(supervisor)
    tick(supervisor)
    sent = worker_end.recv()
    assert [c.job_id for c in sent] == [j.id for j in batch]
    for claim in sent:
        worker_end.send(workers.Started(claim.job_id))
    tick(supervisor)
    assert set(supervisor.workers()[0]["jobs"]) == {written.id, *(j.id for j in batch)}
    process.alive = False  # kill -9 mid-batch
    tick(supervisor)
    after = store.get(written.id)
    assert (after.status, after.attempts) == (jobs.QUEUED, 1)  # it had run alone
    for job in batch:  # which of them broke the batch is unknown: each runs alone next, uncounted
        after = store.get(job.id)
        assert (after.status, after.attempts) == (jobs.QUEUED, 0), job.id
    keys = [store._db.execute("SELECT batch_key FROM jobs WHERE id = ?", (j.id,)).fetchone()[0] for j in batch]
    assert keys == [jobs.NO_BATCH] * 3
    assert store.get(unsent.id).attempts == 0
    assert supervisor.slots[0].claims == {} and supervisor.slots[0].state == "restarting"


def dispatch_delay(
    supervisor: workers.Supervisor, worker_end: Any, limit: float = 5.0
) -> tuple[float, float, list[Any]]:
    """Seconds from now until the supervisor sends a batch, the longest gap between two of the
    dispatches that led to it (how late the polling here could notice a window's end), and the batch."""
    start = last = time.perf_counter()
    gap = 0.0
    while not worker_end.poll():
        assert time.perf_counter() - start < limit, "nothing was dispatched"
        supervisor._dispatch()
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
        time.sleep(0.001)
    return last - start, gap, worker_end.recv()


def test_a_lone_job_waits_at_most_the_batching_window(store, tmp_path):
    window = 0.1
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=window)
    lone = store.submit(request("a fox"))
    delay, gap, [claim] = dispatch_delay(supervisor, worker_end)
    assert claim.job_id == lone.id
    # It waited for a companion, and was sent by the first dispatch after the window ended: at most
    # one polling gap late (a few ms here, more on a loaded machine, and counted as it happened).
    assert window <= delay <= window + gap + 0.005, (delay, gap)
    # The server's loop wakes by the window's end, not on its usual quarter-second tick.
    store.submit(request("a heron"))
    supervisor.slots[0].state, supervisor.slots[0].running = "ready", ()
    opened = time.monotonic()
    supervisor._dispatch()  # the window opens
    assert not worker_end.poll()
    ends = supervisor.slots[0].window_until
    assert ends is not None and opened + window <= ends <= time.monotonic() + window
    assert 0.0 < supervisor._wait_s() <= window
    supervisor.slots[0].window_until = time.monotonic()  # ... and ends
    supervisor._dispatch()
    assert worker_end.poll()

    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=0.0)
    store.submit(request("a cat"))
    supervisor._dispatch()
    assert worker_end.poll()  # no window: sent by the first dispatch


def test_a_companion_arriving_within_the_window_joins_the_batch(store, tmp_path):
    supervisor, worker_end, _ = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=30.0)
    first = store.submit(request("a fox"))
    supervisor._dispatch()  # the window opens
    assert not worker_end.poll()
    second = store.submit(request("a cat"))
    supervisor._dispatch()  # two jobs waiting: sent without waiting out the window
    assert [c.job_id for c in worker_end.recv()] == [first.id, second.id]


def test_a_job_succeeds_only_once_its_file_is_written(engine, store, tmp_path, monkeypatch):
    release = threading.Event()
    save = workers._save_images

    def slow_save(*args: Any) -> Any:
        assert release.wait(30)
        return save(*args)

    monkeypatch.setattr(workers, "_save_images", slow_save)
    job = store.submit(request("a fox", engine.limits))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    here, there = workers.mp.Pipe()
    channel = workers.Channel(there)
    writer = workers.Writer(store, tmp_path, channel)
    workers.run_batch(engine, store, claims, channel, writer)  # returns while the writer waits
    messages = []
    while here.poll():
        messages.append(here.recv())
    assert isinstance(messages[-1], workers.GpuFree)  # the GPU is free for the next batch ...
    assert store.get(job.id).status == jobs.RUNNING and list(tmp_path.glob("*.png")) == []  # ... not yet done
    release.set()
    writer.close()
    done = store.get(job.id)
    assert done.status == jobs.SUCCEEDED and (tmp_path / done.images[0].file).is_file()
    assert here.recv().status == jobs.SUCCEEDED


def test_a_failing_encoder_fails_its_job_and_the_writer_goes_on(engine, store, tmp_path, monkeypatch):
    save = workers._save_images
    calls = []

    def broken_once(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise ValueError("the encoder failed")
        return save(*args)

    monkeypatch.setattr(workers, "_save_images", broken_once)
    bad, good = (store.submit(request(p, engine.limits)) for p in ("a fox", "a cat"))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    run_claims(engine, store, tmp_path, claims)
    failed, done = store.get(bad.id), store.get(good.id)
    assert failed.status == jobs.FAILED and "the encoder failed" in failed.error["message"]
    assert done.status == jobs.SUCCEEDED and (tmp_path / done.images[0].file).is_file()


def test_the_writer_holds_at_most_its_depth_and_then_blocks(store, tmp_path):
    writer, gate, here = stuck_writer(store, tmp_path)  # one result being written, one waiting
    batch = workers.BatchDone([workers.Outcome(jobs.Claim("j", 1, {}), jobs.SUCCEEDED)], time.perf_counter())
    third = threading.Thread(target=writer.put, args=(batch,), daemon=True)
    third.start()
    third.join(0.2)
    assert third.is_alive()  # a third result blocks the worker rather than grow memory
    gate.set()
    third.join(5)
    writer.close(5)
    assert [here.recv().status for _ in range(3)] == [jobs.SUCCEEDED] * 3


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--max-batch", "0"], "--max-batch 0 must be at least 1"),
        (["--max-batch-pixels", "0"], "--max-batch-pixels 0 must be at least 1 pixel"),
        (["--batch-window-ms", "-1"], "0..1000 milliseconds"),
    ],
)
def test_bad_batching_flags_are_refused_before_the_server_starts(flag, message, capsys):
    from zturbo.cli import main

    assert main(["serve", "--model", "tiny-random", *flag]) != 0
    assert message in capsys.readouterr().err


class PreviewingEngine(StandIn):
    """The engine, with `on_preview` (contract C3) giving each batch row a flat image of its own colour."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.limits, self.device = engine, engine.limits, engine.device

    def generate(self, request: GenerateRequest, on_step: Any, on_preview: Any = None) -> Any:
        def step(i: int, n: int) -> None:
            on_step(i, n)
            if on_preview is not None:
                on_preview(i, n, [Image.new("RGB", (16, 16), (40 * row, 0, 0)) for row in range(request.num_images)])

        return self.engine.generate(request, on_step=step)


def test_previews_go_to_the_jobs_that_asked_each_from_its_own_rows(engine, store, tmp_path):
    pytest.importorskip("zturbo.preview")  # the PREVIEW side of contract C3
    quiet = store.submit(request("a fox", engine.limits, batch=2))
    watched = store.submit(request("a cat", engine.limits), preview=True)
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    messages = run_claims(PreviewingEngine(engine), store, tmp_path, claims)
    progress = [m for m in messages if isinstance(m, workers.Progress)]
    assert [m.step for m in progress if m.job_id == quiet.id] == [1, 2]
    assert all(m.preview is None for m in progress if m.job_id == quiet.id)
    previews = [m.preview for m in progress if m.job_id == watched.id]
    assert len(previews) == 2 and all(previews)
    with Image.open(io.BytesIO(previews[-1])) as shown:
        assert abs(shown.convert("RGB").getpixel((8, 8))[0] - 80) <= 8  # row 2: the watched job's image


def test_a_live_server_batches_waiting_jobs_and_each_image_matches_its_single_run(tiny_dir, tmp_path):
    from serving import Server

    server = Server(tiny_dir, tmp_path / "data", "--max-batch", "3", "--no-ui", step_sleep=0.2)  # the API only
    try:
        server.wait_ready()
        head = server.submit(seed=1)  # holds the worker while the next three queue
        while server.client.get(f"/v1/jobs/{head['id']}").json()["status"] == "queued":
            time.sleep(0.02)
        waiting = [server.submit(prompt=f"a fox number {i}", seed=10 + i) for i in range(3)]
        done = [server.wait_job(job["id"]) for job in (head, *waiting)]
        assert [job["status"] for job in done] == ["succeeded"] * 4
        # Counted when the supervisor reads each batch's GpuFree, which the worker sends before its
        # writer records the jobs: the last one may be read a moment after they read `succeeded`.
        deadline = time.monotonic() + 10
        while "zturbo_batch_jobs_count 2.0" not in (metrics := server.client.get("/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert 'zturbo_batch_jobs_bucket{le="1.0"} 1.0' in metrics  # the head ran alone ...
        assert "zturbo_batch_jobs_count 2.0" in metrics and "zturbo_batch_jobs_sum 4.0" in metrics  # ... then 3 as one
        # Each batch slept 0.2 s per step inside the engine's call: the account puts that there.
        seconds = {phase: worker_seconds(metrics, phase) for phase in ("engine", "host", "idle")}
        assert seconds["engine"] >= 2 * 2 * 0.2, seconds  # two batches of 2 steps (`Server.submit`)
        assert 0 < seconds["host"] < seconds["engine"] and seconds["idle"] > 0, seconds
        # ... and by the engine's own stages, which sum to at most its calls' time.
        stages = dict(re.findall(r'^zturbo_engine_stage_seconds_total\{stage="(\w+)",worker="worker-0"\} (\S+)$',
                                 metrics, re.M))  # fmt: skip
        assert {"encode_s", "denoise_decode_s"} <= set(stages), metrics
        assert float(stages["denoise_decode_s"]) >= 2 * 2 * 0.2
        assert sum(map(float, stages.values())) <= seconds["engine"] + 1e-3
        alone = server.wait_job(server.submit(prompt="a fox number 1", seed=11)["id"])
        batched = Image.open(io.BytesIO(server.client.get(done[2]["images"][0]["url"]).content))
        single = Image.open(io.BytesIO(server.client.get(alone["images"][0]["url"]).content))
        diff = np.asarray(batched.convert("RGB")).astype(int) - np.asarray(single.convert("RGB")).astype(int)
        assert np.abs(diff).max() <= 1
    finally:
        server.stop()


class Broken(StandIn):
    """An engine whose run fails with an error that may have broken the device."""

    def __init__(self, engine: Any) -> None:
        self.limits, self.device = engine.limits, engine.device

    def generate(self, request: GenerateRequest, on_step: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_crashing_worker_records_the_results_it_made_before_it_exits(engine, store, tmp_path, monkeypatch):
    def exit_(code: int) -> None:
        raise SystemExit(code)

    save = workers._save_images
    writing = threading.Event()

    def slow_save(*args: Any) -> Any:
        writing.set()
        time.sleep(0.5)  # still writing when the next batch fails
        return save(*args)

    monkeypatch.setattr(workers.os, "_exit", exit_)
    monkeypatch.setattr(workers, "_save_images", slow_save)
    earlier = store.submit(request("a fox", engine.limits))
    here, there = workers.mp.Pipe()
    channel = workers.Channel(there)
    writer = workers.Writer(store, tmp_path, channel)
    workers.run_batch(engine, store, store.claim_batch("worker-0", jobs.NO_LORAS, 1), channel, writer)
    assert writing.wait(30)
    failing = [store.submit(request(p, engine.limits)) for p in ("a cat", "a heron")]
    with pytest.raises(SystemExit):
        workers.run_batch(Broken(engine), store, store.claim_batch("worker-0", jobs.NO_LORAS, 4), channel, writer)
    messages = []
    while here.poll():
        messages.append(here.recv())
    assert store.get(earlier.id).status == jobs.SUCCEEDED  # written before the exit
    assert [store.get(j.id).status for j in failing] == [jobs.RUNNING] * 2  # the supervisor releases them
    crashed = messages[-1]
    assert isinstance(crashed, workers.Crashed) and "illegal memory access" in crashed.reason
    assert crashed.job_ids == tuple(j.id for j in failing)  # the batch is named, not its first job
    assert all(j.id in crashed.reason for j in failing)


class OutOfMemory(StandIn):
    """An engine that runs out of GPU memory (after its own leaner retry) on any batch of `over` images or more."""

    def __init__(self, engine: Any, over: int) -> None:
        self.engine, self.over, self.limits, self.device = engine, over, engine.limits, engine.device

    def generate(self, request: GenerateRequest, on_step: Any) -> Any:
        from zturbo.errors import GPUMemoryError

        if request.num_images >= self.over:
            raise GPUMemoryError("CUDA out of memory even with the leanest plan")
        return self.engine.generate(request, on_step=on_step)


def test_a_batch_that_runs_out_of_memory_runs_its_jobs_alone(engine, store, tmp_path):
    a, b = (store.submit(request(p, engine.limits)) for p in ("a fox", "a cat"))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    assert len(claims) == 2
    messages = run_claims(OutOfMemory(engine, over=2), store, tmp_path, claims)
    assert [type(m) for m in messages] == [workers.Released, workers.Released, workers.GpuFree]  # before the GPU frees
    assert [(m.job_id, m.status, m.attempts) for m in messages[:2]] == [(a.id, jobs.QUEUED, 0), (b.id, jobs.QUEUED, 0)]
    assert "ran out of GPU memory" in messages[0].reason
    for job in (a, b):
        [alone] = store.claim_batch("worker-0", jobs.NO_LORAS, 4)  # each alone now, though they could batch
        assert alone.job_id == job.id
        run_claims(OutOfMemory(engine, over=2), store, tmp_path, [alone])
        assert store.get(job.id).status == jobs.SUCCEEDED

    lone = store.submit(request("a heron", engine.limits, batch=2))  # one job too big: its own failure
    messages = run_claims(OutOfMemory(engine, over=2), store, tmp_path, store.claim_batch("worker-0", "", 4))
    failed = store.get(lone.id)
    assert failed.status == jobs.FAILED and failed.error["type"] == "out_of_memory"
    assert not any(isinstance(m, workers.Released) for m in messages)


def test_a_failing_writer_exits_the_worker_naming_the_jobs_it_held(store, tmp_path, monkeypatch):
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)  # and the thread ends, as the process would

    monkeypatch.setattr(workers.os, "_exit", exit_)
    here, there = workers.mp.Pipe()
    writer = workers.Writer(store, tmp_path, workers.Channel(there))

    def broken(outcome: Any) -> str:
        raise sqlite3.OperationalError("disk I/O error in a place nobody expected")

    writer._finish = broken  # type: ignore[method-assign]
    claims = [jobs.Claim("j1", 1, {}), jobs.Claim("j2", 1, {})]
    writer.put(workers.BatchDone([workers.Outcome(c, jobs.SUCCEEDED) for c in claims], time.perf_counter()))
    writer._thread.join(10)
    assert exits == [3]  # the process exits: the supervisor releases what it held, nothing hangs on `put`
    assert here.poll(5)
    crashed = here.recv()
    assert isinstance(crashed, workers.Crashed) and crashed.job_ids == ("j1", "j2")
    assert "disk I/O error" in crashed.reason


def stuck_writer(store: jobs.JobStore, tmp_path: Any) -> tuple[workers.Writer, threading.Event, Any]:
    """A writer whose one slot is full and whose write never ends until the event is set."""
    here, there = workers.mp.Pipe()
    writer = workers.Writer(store, tmp_path, workers.Channel(there), depth=1)
    gate = threading.Event()
    writer._finish = lambda outcome: gate.wait(60) and jobs.SUCCEEDED  # type: ignore[method-assign]
    batch = workers.BatchDone([workers.Outcome(jobs.Claim("j", 1, {}), jobs.SUCCEEDED)], time.perf_counter())
    writer.put(batch)  # being written
    deadline = time.monotonic() + 10
    while writer._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.put(batch)  # waiting: the queue is full
    return writer, gate, here


def test_a_crash_drains_the_writer_for_at_most_its_bound(engine, store, tmp_path, monkeypatch):
    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(workers.os, "_exit", exit_)
    monkeypatch.setattr(workers, "CRASH_DRAIN_S", 0.2)
    writer, gate, here = stuck_writer(store, tmp_path)
    claim = jobs.Claim("failing", 1, {})

    def crash_() -> None:
        with pytest.raises(SystemExit):
            workers._crash([claim], RuntimeError("CUDA error"), writer)

    crash = threading.Thread(target=crash_, daemon=True)
    crash.start()
    crash.join(10)
    try:
        assert not crash.is_alive()  # exited though the writer is still stuck
        assert here.poll(5)
        crashed = here.recv()  # nothing else: the stuck writer never reported
        assert isinstance(crashed, workers.Crashed) and crashed.job_ids == ("failing",)
    finally:
        gate.set()
        writer.close(10)  # while the pipe is open: a writer that cannot report exits the process


def test_the_gpu_is_free_before_the_worker_waits_for_its_writer(engine, store, tmp_path):
    writer, gate, here = stuck_writer(store, tmp_path)
    job = store.submit(request("a fox", engine.limits))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    channel = writer.channel
    running = threading.Thread(target=workers.run_batch, args=(engine, store, claims, channel, writer), daemon=True)
    running.start()
    try:
        free = None
        while free is None and here.poll(60):
            message = here.recv()
            free = message if isinstance(message, workers.GpuFree) else None
        assert free is not None and free.job_ids == (job.id,)
        assert running.is_alive()  # still blocked on the full writer: the GPU's clock has stopped already
    finally:
        gate.set()
    running.join(30)
    writer.close(30)
    assert store.get(job.id).status == jobs.RUNNING  # `_finish` stood in: nothing recorded


def test_a_batch_checks_its_cancels_with_one_query_per_step(engine, store, tmp_path, monkeypatch):
    asked: list[list[str]] = []
    ask = store.cancels_requested

    def counted(job_ids: Any) -> set[str]:
        asked.append(list(job_ids))
        return ask(asked[-1])

    monkeypatch.setattr(store, "cancels_requested", counted)
    monkeypatch.setattr(store, "cancel_requested", lambda job_id: pytest.fail("one query per job"))
    keep, drop = (store.submit(request(p, engine.limits, steps=3)) for p in ("a fox", "a cat"))
    run_claims(CancelInBatch(engine, store, [drop.id]), store, tmp_path, store.claim_batch("worker-0", "", 4))
    # Before the batch begins, then after steps 1 and 2; a cancelled job is not asked again.
    assert asked == [[keep.id, drop.id], [keep.id, drop.id], [keep.id]]
    assert (store.get(keep.id).status, store.get(drop.id).status) == (jobs.SUCCEEDED, jobs.CANCELLED)


class RoomFor(StandIn):
    """The engine, on a device whose free memory holds `images` images per batch; records each run's size."""

    def __init__(self, engine: Any, images: int) -> None:
        self.engine, self.images, self.limits, self.device = engine, images, engine.limits, engine.device
        self.runs: list[int] = []

    def batch_room(self, request: GenerateRequest) -> int:
        return self.images

    def generate(self, request: GenerateRequest, on_step: Any, **callbacks: Any) -> Any:
        self.runs.append(request.num_images)
        return self.engine.generate(request, on_step=on_step, **callbacks)


def test_a_batch_holds_no_more_images_than_its_workers_memory_and_the_rest_keep_their_place(engine, store, tmp_path):
    events: list[Any] = []
    supervisor, worker_end, process = supervisor_with_idle_worker(store, tmp_path, max_batch=4, batch_window=0.0)
    supervisor.hooks = workers.Hooks(
        on_event=lambda job_id, event, data: events.append((job_id, event)),
        on_finished=lambda msg: events.append((msg.job_id, msg.status)),
        on_batch=lambda count, images: events.append(("batch", count, images)),
    )
    made = [request(f"a fox number {i}", engine.limits, seed=10 + i) for i in range(6)]
    queued = [store.submit(r) for r in made]
    roomy = RoomFor(engine, 2)
    channel = workers.Channel(worker_end)
    writer = workers.Writer(store, tmp_path, channel)
    sent: list[list[str]] = []
    deadline = time.monotonic() + 120
    while not all(store.get(job.id).finished for job in queued):
        assert time.monotonic() < deadline, [store.get(job.id).status for job in queued]
        tick(supervisor)
        if not worker_end.poll():
            time.sleep(0.01)
            continue
        claims = worker_end.recv()  # the worker's loop (`worker_main`)
        sent.append([claim.job_id for claim in claims])
        for claim in claims:
            worker_end.send(workers.Started(claim.job_id))
        workers.run_batch(roomy, store, claims, channel, writer)
    writer.close()
    tick(supervisor)

    ids = [job.id for job in queued]
    # 4 sent (--max-batch), 2 run, 2 given back that head the next batch, which asks for 2 only.
    assert sent == [ids[:4], ids[2:4], ids[4:]] and roomy.runs == [2, 2, 2]
    assert [e for e in events if e[0] == "batch"] == [("batch", 2, 2)] * 3  # the metrics count what ran
    assert [e for e in events if e[1] == "requeued"] == [(ids[2], "requeued"), (ids[3], "requeued")]
    assert sorted(e for e in events if e[1] == jobs.SUCCEEDED) == sorted((i, jobs.SUCCEEDED) for i in ids)
    for job, req in zip(queued, made, strict=True):
        done = store.get(job.id)
        assert (done.status, done.attempts, len(done.images)) == (jobs.SUCCEEDED, 1, 1)  # the give-back is uncounted
        [single] = engine.generate(req).images
        diff = pixels(tmp_path / done.images[0].file).astype(int) - np.asarray(single.image).astype(int)
        assert np.abs(diff).max() <= 1
    slot = supervisor.slots[0]
    assert slot.rooms == {jobs.batch_key(made[0]): 2} and slot.claims == {}

    supervisor._ctx = StandInContext()
    process.alive = False  # a new process measures its memory anew
    tick(supervisor)
    slot.restart_at = 0.0
    tick(supervisor)
    assert slot.state == "starting" and slot.rooms == {}


def test_a_batch_keeps_its_first_jobs_that_fit_and_never_skips_one(engine, store, tmp_path):
    def kept(sizes: list[int], room: int) -> tuple[list[int], list[Any]]:
        runnable = []
        for i, size in enumerate(sizes):
            req = request(f"a fox {i}", engine.limits, batch=size)
            runnable.append((jobs.Claim(f"j{i}", 1, {}, images=size, batch_key="k"), req))
        here, there = workers.mp.Pipe()
        left, returned = workers._within_room(RoomFor(engine, room), runnable, workers.Channel(there))
        assert set(returned) == {claim.job_id for claim, _ in runnable[len(left) :]}
        return [claim.images for claim, _ in left], [here.recv() for _ in range(int(here.poll()))]

    assert kept([1, 1, 1], 3) == ([1, 1, 1], [])  # it fits: nothing said
    assert kept([1, 2, 1], 2) == ([1], [workers.BatchRoom("k", 2, ("j1", "j2"))])  # the 1 after the 2 waits too
    assert kept([2, 1, 1], 3) == ([2, 1], [workers.BatchRoom("k", 3, ("j2",))])
    assert kept([3], 2) == ([3], [workers.BatchRoom("k", 2, ())])  # a lone job runs whatever its size


def test_a_worker_reports_a_larger_room_once_memory_frees_up(engine):
    runnable = [(jobs.Claim(f"j{i}", 1, {}, batch_key="k"), request(f"a fox {i}", engine.limits)) for i in range(2)]
    here, there = workers.mp.Pipe()
    reported: dict[str, int] = {}

    def said(room: int) -> list[Any]:
        workers._within_room(RoomFor(engine, room), runnable, workers.Channel(there), reported)
        return [here.recv() for _ in range(int(here.poll()))]

    assert said(1) == [workers.BatchRoom("k", 1, ("j1",))]  # memory was short: capped at 1
    assert said(1) == [workers.BatchRoom("k", 1, ("j1",))]
    assert said(3) == [workers.BatchRoom("k", 3, ())]  # freed: the cap rises, nothing given back
    assert said(3) == [] and said(2) == [] and reported == {"k": 3}  # said once; a fitting batch never lowers it


def test_the_batch_metrics_count_only_the_jobs_that_ran_on_the_gpu(engine, store, tmp_path):
    kept = store.submit(request("a fox", engine.limits))
    dropped = store.submit(request("a cat", engine.limits))
    claims = store.claim_batch("worker-0", jobs.NO_LORAS, 4)
    store.cancel(dropped.id)  # while its batch waited for the GPU
    here, there = workers.mp.Pipe()
    channel = workers.Channel(there)
    writer = workers.Writer(store, tmp_path, channel)
    workers.run_batch(engine, store, claims, channel, writer)
    writer.close()
    free = [m for m in iter(lambda: here.recv() if here.poll() else None, None) if isinstance(m, workers.GpuFree)]
    assert [(set(m.job_ids), m.images, m.ran) for m in free] == [({kept.id, dropped.id}, 1, 1)]


def worker_seconds(metrics: str, phase: str) -> float:
    """The sum over workers of zturbo_worker_seconds_total for `phase` in a /metrics text."""
    lines = [line for line in metrics.splitlines() if line.startswith("zturbo_worker_seconds_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if f'phase="{phase}"' in line)


def test_a_workers_clock_splits_its_time_into_engine_host_and_idle():
    from zturbo.serving.workers import BatchClock

    class SlowPipe:
        def recv(self):
            time.sleep(0.05)
            return ["batch"]

    clock = BatchClock()
    assert clock.wait(SlowPipe()) == ["batch"]
    time.sleep(0.03)  # the worker's own work, some of it in the engine
    first = clock.take(engine_s=0.01)
    assert first.idle >= 0.05 and first.engine == 0.01
    assert 0.015 <= first.host < 0.05  # 0.03 of the worker's time, less the engine's 0.01
    second = clock.take(engine_s=0.0)  # starts from the first take: nothing left over
    assert second.idle == 0 and second.host < 0.01 and second.warmup == 0
    clock.warming(lambda: time.sleep(0.04))  # a deferred warm-up part between batches
    third = clock.take(engine_s=0.0)
    assert third.warmup >= 0.04 and third.host < 0.01 and third.idle == 0
