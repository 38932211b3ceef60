"""The Ray deployment's pieces that need no cluster: its flags, the replica's message router and the
ingress's dispatcher (on a stand-in handle and store). The deployment itself is tests/test_ray.py's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import pytest

from zturbo.cli import build_parser
from zturbo.cli import main as cli_main
from zturbo.errors import InvalidRequestError
from zturbo.serving import jobs
from zturbo.serving.raydeploy import (
    THROUGHPUT_ENV,
    ProgressGate,
    RayDispatcher,
    Replica,
    Router,
    Running,
    ray_options,
)
from zturbo.serving.workers import BatchRoom, BatchSeconds, Finished, GpuFree, Hooks, Progress, Ready, Released


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", "--ray", "auto", *argv])


def test_the_replica_flags_become_the_deployments_options():
    options = ray_options(serve_args("--ray-min-replicas", "1", "--ray-max-replicas", "4", "--ray-gpus-per-replica",
                                     "2", "--ray-resource", "pool_h100=1", "--ray-max-ongoing", "3"))  # fmt: skip
    assert (options.min_replicas, options.max_replicas, options.gpus_per_replica) == (1, 4, 2.0)
    assert options.resources == {"pool_h100": 1.0} and options.max_ongoing == 3


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--ray-min-replicas", "3", "--ray-max-replicas", "2"), "--ray-min-replicas 3 and --ray-max-replicas 2"),
        (("--ray-min-replicas", "0"), "need 1 <= min <= max"),
        (("--ray-gpus-per-replica", "-1"), "--ray-gpus-per-replica -1.0 must be 0 or more"),
        (("--ray-resource", "pool"), "--ray-resource 'pool' must be NAME=AMOUNT"),
        (("--ray-resource", "pool=0"), "--ray-resource 'pool=0' must be NAME=AMOUNT with AMOUNT above 0"),
        (("--ray-max-ongoing", "0"), "--ray-max-ongoing 0 must be at least 1"),
        (("--ray-scale-delay", "-5"), "--ray-scale-delay -5.0 must be 0..3600 seconds"),
    ],
)
def test_a_bad_replica_flag_is_refused_naming_it(argv, says):
    with pytest.raises(InvalidRequestError, match=says.replace("(", r"\(").replace(".", r"\.")):
        ray_options(serve_args(*argv))


def test_ray_refuses_a_store_only_one_machine_reaches_before_anything_loads(capsys, tmp_path):
    argv = ["serve", "--ray", "auto", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--store", "sqlite"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--ray needs a job store every node reaches: --store 'sqlite'" in err and "postgresql://" in err


def test_the_router_sends_each_message_to_the_stream_that_took_its_job():
    rooms, first, second = [], [], []
    router = Router(rooms.append)
    router.open(["a", "b"], first.append)
    router.open(["c"], second.append)
    router.send(Progress("a", 1, 2))
    router.send(GpuFree(("a", "b", "c"), 3))  # one batch's message reaches each stream once
    router.send(Finished("a", jobs.SUCCEEDED, 1.0))
    router.send(Progress("a", 2, 2))  # the job's stream has ended: nowhere to go
    router.send(Released("c", jobs.QUEUED, 1, "its batch did not fit"))
    router.send(BatchRoom("key", 1, ("b",)))
    assert [type(m).__name__ for m in first] == ["Progress", "GpuFree", "Finished"]
    assert [type(m).__name__ for m in second] == ["GpuFree", "Released"]
    assert rooms == [BatchRoom("key", 1, ("b",))]


class FakeStore:
    """The dispatcher's view of the shared store: queued jobs, live replica leases, some jobs' rows."""

    def __init__(self, queued: int, live: dict[str, float]) -> None:
        self.queued, self.live = queued, live
        self.rows: dict[str, jobs.Job] = {}
        self.recovered: list[jobs.Job] = []  # what the next heartbeat queues again

    def get(self, job_id: str) -> jobs.Job:
        return self.rows[job_id]

    def heartbeat(self) -> list:
        recovered, self.recovered = self.recovered, []
        return recovered

    def depth(self) -> int:
        return self.queued

    def live_nodes(self, prefix: str) -> dict[str, float]:
        return {name: age for name, age in self.live.items() if name.startswith(prefix)}


class FakeHandle:
    """A deployment handle whose run requests stream the scripted messages, each after `release`."""

    def __init__(self, streams: list[list], replica: Replica) -> None:
        self.streams, self.replica, self.release = streams, replica, threading.Event()
        self.calls = 0

    def options(self, stream: bool) -> FakeHandle:
        assert stream
        return self

    @property
    def run(self) -> FakeHandle:
        return self

    def remote(self):
        self.calls += 1
        script = self.streams.pop(0)

        def stream():
            for message in script:
                self.release.wait(10)
                if isinstance(message, Exception):
                    raise message
                yield message

        return stream()


def wait(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_dispatcher_sends_a_request_per_queued_job_and_turns_streams_into_events():
    """Two queued jobs: two run requests. One streams its job to the end; the other's stream breaks
    mid-job without Ray saying its replica died: no restart, and the job is left to the store's lease,
    its end told once the store has it."""
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({"model": "tiny"}, None), "ray-replica-r1/gpu")
    seconds = BatchSeconds(engine=0.4, host=0.01, idle=2.0)
    ok = [replica, Running("j1", 1), Progress("j1", 1, 2), GpuFree(("j1",), 1, None, seconds),
          Finished("j1", jobs.SUCCEEDED, 0.5)]  # fmt: skip
    dead = [replica, Running("j2", 1), RuntimeError("unreachable")]
    handle = FakeHandle([ok, dead], replica)
    events, finished, restarts, batches, accounts = [], [], [], [], []
    hooks = Hooks(on_event=lambda j, e, d: events.append((j, e, d)), on_finished=finished.append,
                  on_restart=lambda w, r: restarts.append(w), on_batch=lambda n, i: batches.append((n, i)),
                  on_seconds=lambda w, s: accounts.append((w, s)))  # fmt: skip
    store = FakeStore(queued=2, live={"ray-replica-r1": 0.5, "other-node": 0.1})
    dispatcher = RayDispatcher(handle, store, hooks)
    dispatcher._tick()
    assert handle.calls == 2 and dispatcher._inflight == 2
    store.queued = 0
    assert [w["id"] for w in dispatcher.workers()] == ["ray-replica-r1"] and dispatcher.ready()
    handle.release.set()
    wait(lambda: dispatcher._inflight == 0)
    assert ("j1", "running", {"worker": "ray-replica-r1", "attempt": 1}) in events
    assert ("j1", "progress", {"step": 1, "steps": 2}) in events
    assert [f.job_id for f in finished] == ["j1"] and batches == [(1, 1)]
    assert accounts == [("ray-replica-r1", seconds)]  # the replica's time, by its name (/metrics)
    assert restarts == [] and dispatcher._unsettled == {"j2": "ray-replica-r1"}
    assert dispatcher.runtime()["model"] == "tiny" and dispatcher.progress("j1") is None
    store.rows["j2"] = job_row("j2", jobs.RUNNING)  # still on the replica's claim: nothing to tell yet
    dispatcher._tick()  # nothing queued: no new request
    assert handle.calls == 2 and dispatcher._unsettled == {"j2": "ray-replica-r1"}
    store.rows["j2"] = job_row("j2", jobs.SUCCEEDED)  # the replica did finish it
    dispatcher._tick()
    assert [f.job_id for f in finished] == ["j1", "j2"] and dispatcher._unsettled == {}


def test_a_wake_sends_its_run_requests_before_the_stores_upkeep():
    """A submission's wake waits for no lease renewal or replica listing; jobs that the lease's
    recovery queues again get their requests at the loop's next turn, not a tick later."""
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({}, None), "ray-replica-r1/gpu")
    handle = FakeHandle([[replica]], replica)  # the request finds its job taken: it ends
    seen: list[str] = []

    class Store(FakeStore):
        def depth(self) -> int:
            seen.append("depth")
            return super().depth()

        def heartbeat(self) -> list:
            seen.append("heartbeat")
            return super().heartbeat()

        def live_nodes(self, prefix: str) -> dict[str, float]:
            seen.append("listing")
            return super().live_nodes(prefix)

    store = Store(queued=1, live={})
    requeued = []
    dispatcher = RayDispatcher(handle, store, Hooks(on_event=lambda j, e, d: requeued.append(j)))
    dispatcher._tick()
    assert seen == ["depth", "heartbeat", "listing"]
    handle.release.set()
    wait(lambda: dispatcher._inflight == 0)
    dispatcher._wake.clear()  # the request's end and the listing woke it
    store.queued, store.recovered = 0, [job_row("j9", jobs.QUEUED)]
    dispatcher._tick()  # no request (nothing queued when it dispatched), no listing due
    assert requeued == ["j9"] and dispatcher._inflight == 0 and dispatcher._wake.is_set()


def test_a_run_stream_sends_a_jobs_newest_progress_at_most_once_per_gap():
    """Each message crosses Ray on its own: a job's plain Progress within the gap of the last one sent
    waits, replaced by newer ones, until the gap has passed or the job's next other message goes."""
    now = [0.0]
    gate = ProgressGate(0.1, clock=lambda: now[0])
    assert gate.admit(Progress("a", 1, 8)) == [Progress("a", 1, 8)] and gate.wait_s() is None  # the first at once
    now[0] = 0.02
    assert gate.admit(Progress("a", 2, 8)) == [] and gate.wait_s() == pytest.approx(0.08)
    now[0] = 0.04
    assert gate.admit(Progress("a", 3, 8)) == []  # step 2 is not worth sending any more
    assert gate.admit(Progress("b", 1, 8)) == [Progress("b", 1, 8)]  # each job has its own gap
    assert gate.due() == []
    now[0] = 0.1
    assert gate.due() == [Progress("a", 3, 8)] and gate.wait_s() is None
    now[0] = 0.12
    assert gate.admit(Progress("a", 4, 8)) == [] and gate.admit(Progress("b", 2, 8)) == []
    free = GpuFree(("a",), 1)
    assert gate.admit(free) == [Progress("a", 4, 8), free]  # a job's held progress goes before its next news
    assert gate.admit(Progress("b", 8, 8)) == [Progress("b", 8, 8)]  # its last step at once, the held one replaced
    assert gate.wait_s() is None and gate.due() == []
    shown = Progress("c", 1, 8, b"jpeg")
    later = Progress("c", 2, 8, b"jpeg")
    assert gate.admit(shown) == [shown] and gate.admit(later) == [later]  # one preview per step (docs/api.md)


def test_a_run_stream_waits_for_a_held_progress_no_longer_than_its_gap():
    from zturbo.serving.raydeploy import _next

    async def take(timeout: float | None):
        queue: asyncio.Queue = asyncio.Queue()
        asyncio.get_running_loop().call_later(0.05, queue.put_nowait, "late")
        return await _next(queue, timeout)

    assert asyncio.run(take(0.01)) is None  # the held progress is due first
    assert asyncio.run(take(None)) == "late" and asyncio.run(take(1.0)) == "late"


def job_row(job_id: str, status: str) -> jobs.Job:
    return jobs.Job(job_id, 1, status, {}, 1, None, False, None, 0.0, None, None)


def test_a_dead_replica_counts_one_restart_however_many_requests_it_held_and_leaves_the_list():
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({}, None), "ray-replica-r1/gpu")
    streams = [[replica, Died("killed")] for _ in range(3)]  # requests waiting at it: none held a job
    handle = FakeHandle(streams, replica)
    handle.release.set()
    restarts = []
    store = FakeStore(queued=0, live={"ray-replica-r1": 0.5})
    dispatcher = RayDispatcher(handle, store, Hooks(on_restart=lambda w, r: restarts.append(w)),
                               died=lambda e, r: isinstance(e, Died))  # fmt: skip
    dispatcher._list_replicas()
    assert [w["id"] for w in dispatcher.workers()] == ["ray-replica-r1"]
    for _ in streams:
        dispatcher._follow()
    assert restarts == ["ray-replica-r1"]
    dispatcher._list_replicas()  # its lease holds a while yet; Ray said it is dead
    assert dispatcher.workers() == [] and dispatcher._parked == {"ray-replica-r1": 0}


def test_while_jobs_wait_behind_a_busy_replica_an_idle_one_gets_a_request():
    """Requests waiting at a busy replica claim nothing until its GPU is free: a replica with nothing
    to do (a new one, say) gets a request of its own while jobs are queued, and only then."""
    dispatcher = RayDispatcher(FakeHandle([], None), FakeStore(queued=0, live={}), Hooks())
    for name in ("r1", "r2"):
        dispatcher._hello(Replica(name, "cuda:0", "node1", 42, Ready({}, None), f"{name}/gpu"))
    dispatcher._live = {"r1": 0.1, "r2": 0.1}
    dispatcher._running = {"j1": "r1"}
    dispatcher._parked, dispatcher._unclaimed = {"r1": 3}, 3  # three requests wait at r1 for 3 jobs
    assert dispatcher._wanted(3) == 1  # for r2
    assert dispatcher._wanted(0) == 0  # nothing queued: an idle replica gets nothing
    dispatcher._unclaimed = 4  # one sent, not yet at a replica: it may well go to r2
    assert dispatcher._wanted(3) == 0
    dispatcher._unclaimed, dispatcher._running = 3, {"j1": "r1", "j5": "r2"}  # r2 busy too
    assert dispatcher._wanted(3) == 0 and dispatcher._wanted(5) == 2  # a request per queued job


class HeldHandle(FakeHandle):
    """A FakeHandle whose first request, once it has claimed its job, holds its batch until `done`."""

    def __init__(self, streams: list[list], replica: Replica) -> None:
        super().__init__(streams, replica)
        self.done = threading.Event()

    def remote(self):
        stream = super().remote()
        if self.calls != 1:
            return stream

        def held():
            for message in stream:
                yield message
                if isinstance(message, Running):
                    self.done.wait(10)

        return held()


def test_a_job_queued_while_a_request_runs_its_batch_gets_a_request_of_its_own():
    """A request that has claimed its batch no longer stands for a queued job: the job queued behind
    it gets a second request at once (for an idle replica), not after the first batch ends."""
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({"model": "tiny"}, None), "ray-replica-r1/gpu")
    handle = HeldHandle([[replica, Running("j1", 1)], [replica, Running("j2", 1)]], replica)
    handle.release.set()
    store = FakeStore(queued=1, live={})
    dispatcher = RayDispatcher(handle, store, Hooks())
    dispatcher._tick()
    wait(lambda: dispatcher._unclaimed == 0)  # j1 claimed, its batch running
    store.queued = 1  # j2 arrives
    dispatcher._tick()
    assert handle.calls == 2  # counted as one still to claim, the running request would have sent none
    wait(lambda: dispatcher._unclaimed == 0)
    store.queued = 0
    dispatcher._tick()
    assert handle.calls == 2
    handle.done.set()
    wait(lambda: dispatcher._inflight == 0)
    assert dispatcher._unclaimed == 0


def test_a_replica_whose_lease_ends_is_gone_and_its_lora_counters_move_to_departed():
    """Ray names every new replica anew: a gone replica's series must not stay for ever, and the
    sums over replicas must not go down when it leaves."""
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({}, None), "ray-replica-r1/gpu")
    gone: list[str] = []
    seconds: list[tuple[str, BatchSeconds]] = []
    store = FakeStore(queued=0, live={"ray-replica-r1": 0.5})
    hooks = Hooks(on_gone=gone.append, on_seconds=lambda w, s: seconds.append((w, s)))
    dispatcher = RayDispatcher(FakeHandle([], replica), store, hooks)
    dispatcher._hello(replica)
    dispatcher._loras = {"ray-replica-r1": {"switches": 3.0, "cache_hits": 2.0, "backup_bytes": 1e9}}
    dispatcher._list_replicas()
    assert gone == [] and "ray-replica-r1" in dispatcher.loras_by_worker()
    store.live = {}  # its lease lapsed
    dispatcher._list_replicas()
    assert gone == ["ray-replica-r1"]
    loras = dispatcher.loras_by_worker()
    assert list(loras) == ["departed"] and loras["departed"]["switches"] == 3.0
    assert "backup_bytes" not in loras["departed"]  # a gauge: a departed replica holds nothing
    dispatcher._list_replicas()
    assert gone == ["ray-replica-r1"]  # told once
    # What it still reports (a stream that ends after its lease) is the departed's, by its growth.
    late = Finished("j9", jobs.SUCCEEDED, 0.5, memory={"allocated_bytes": 5}, loras={"switches": 4.0})
    dispatcher._handle(replica, late)
    dispatcher._handle(replica, GpuFree(("j9",), 1, None, BatchSeconds(engine=1.0, host=0.0, idle=0.0)))
    assert dispatcher.loras_by_worker() == {"departed": {"switches": 4.0, "cache_hits": 2.0}}
    assert dispatcher.memory_by_worker() == {}
    assert [w for w, _ in seconds] == ["departed"]


def test_ray_ready_says_what_zturbo_serves_ready_says_and_is_warm_at_ready():
    """load_serve.py and operators read the same /ready fields from both; a replica warms every part
    before it is ready, so it is fully warm then."""
    startup = {"phases": {"imports_s": 3.0, "weights_s": 7.0}, "warmup_parts": {"prompt_s": 6.0},
               "deferred_warmup_parts": {"small_call_s": 2.9}, "compile_cache": "hit"}  # fmt: skip
    replica = Replica("ray-replica-r1", "cuda:0", "node1", 42, Ready({}, None, 30.5, startup), "ray-replica-r1/gpu")
    dispatcher = RayDispatcher(FakeHandle([], replica), FakeStore(queued=0, live={}), Hooks())
    assert dispatcher.startup() == {}
    dispatcher._hello(replica)
    assert dispatcher.startup() == {
        "ready_s": 30.5, "compile_cache": "hit", "worker_ready_s": 30.5,
        "worker_phases": {"imports_s": 3.0, "weights_s": 7.0}, "worker_warmup_parts": {"prompt_s": 6.0},
        "warm_s": 30.5, "worker_warm_s": 30.5, "deferred_warmup_parts": {"small_call_s": 2.9},
    }  # fmt: skip


def test_worker_counters_move_a_departed_workers_counts_and_keep_the_sums():
    from prometheus_client import CollectorRegistry, generate_latest

    from zturbo.serving.metrics import WorkerCounters

    counters = WorkerCounters("zturbo_worker_seconds", "seconds", ["worker", "phase"])
    for worker in ("r1", "r2", "r3"):
        counters.inc((worker, "engine"), 2.0)
        counters.inc((worker, "idle"), 1.0)
    counters.depart("r1")
    counters.depart("r2")
    counters.depart("departed")  # never moves onto itself

    class Collector:
        def collect(self):
            yield counters.family()

    registry = CollectorRegistry()
    registry.register(Collector())
    lines = sorted(line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#"))
    assert lines == [
        'zturbo_worker_seconds_total{phase="engine",worker="departed"} 4.0',
        'zturbo_worker_seconds_total{phase="engine",worker="r3"} 2.0',
        'zturbo_worker_seconds_total{phase="idle",worker="departed"} 2.0',
        'zturbo_worker_seconds_total{phase="idle",worker="r3"} 1.0',
    ]


def test_the_replicas_get_this_shells_settings_but_never_a_secret(monkeypatch):
    from zturbo.serving.raydeploy import _forwarded_env

    monkeypatch.setenv("ZTURBO_LORA_DIR", "/mnt/zturbo/loras")
    monkeypatch.setenv("ZTURBO_API_KEY", "k")
    monkeypatch.setenv("PGSSLMODE", "require")
    monkeypatch.setenv("PGPASSWORD", "secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    forwarded = _forwarded_env()
    assert forwarded["ZTURBO_LORA_DIR"] == "/mnt/zturbo/loras" and forwarded["PGSSLMODE"] == "require"
    assert not {"ZTURBO_API_KEY", "PGPASSWORD", "HF_TOKEN"} & set(forwarded)


def test_the_kuberay_manifest_deploys_this_app_with_flags_zturbo_serve_accepts():
    import importlib
    import shlex
    from pathlib import Path

    import yaml

    from zturbo.cli import serve_options
    from zturbo.serving.raydeploy import check_store

    manifest = yaml.safe_load((Path(__file__).parents[1] / "docs/kuberay/rayservice.yaml").read_text())
    [application] = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    args, _ = serve_options(shlex.split(application["args"]["argv"]))
    options = ray_options(args)
    check_store(args.store)
    assert (options.gpus_per_replica, options.resources) == (1.0, {"zturbo_gpu": 1.0})
    [pool] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # KubeRay passes the string to `ray start --resources` as a shell word: quoted JSON.
    assert json.loads(json.loads(pool["rayStartParams"]["resources"])) == options.resources
    # Every pod starts Ray in the mode docs/ray.md asks for (the Ray tests' mode too).
    [head] = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert THROUGHPUT_ENV.items() <= {item["name"]: item.get("value") for item in head["env"]}.items()


def test_replica_leases_list_live_replicas_and_a_leaving_one_gives_its_jobs_back_at_once(postgres_db, tmp_path):
    """What the ingress lists (`live_nodes`), and a replica's graceful stop (`leave`): its running
    job is queued again at another node's next heartbeat, long before the 600 s lease."""
    from serving import LIMITS
    from zturbo.request import GenerateRequest
    from zturbo.serving.pgstore import PostgresJobStore

    inputs = tmp_path / "inputs"
    ingress = PostgresJobStore(postgres_db, inputs_dir=inputs, lease_s=600)
    replica = PostgresJobStore(postgres_db, inputs_dir=inputs, lease_s=600, node="ray-replica-r1")
    try:
        ingress.heartbeat()
        replica.heartbeat()
        assert set(ingress.live_nodes("ray-replica-")) == {"ray-replica-r1"}
        job = ingress.submit(GenerateRequest.create("a fox", limits=LIMITS, width=64, height=64, steps=2))
        claim = replica.claim("gpu")
        assert claim is not None and claim.job_id == job.id
        replica.leave()
        assert ingress.live_nodes("ray-replica-") == {}
        ingress._beat_at = 0.0  # the next tick's heartbeat, now
        assert [j.id for j in ingress.heartbeat()] == [job.id]
        assert ingress.get(job.id).status == "queued" and not replica.succeed(claim, [])
    finally:
        ingress.close()
        replica.close()


def test_serve_runs_builder_makes_the_ingress_and_a_gpu_deployment_with_the_flags_options(tiny_dir, tmp_path):
    pytest.importorskip("ray", reason="needs pip install 'zturbo[ray]'")
    from ray.serve._private.build_app import build_app

    from zturbo.serving.ray_app import app

    argv = (f"--model {tiny_dir} --store postgresql://zturbo@db/zturbo --data-dir {tmp_path} "
            "--ray-gpus-per-replica 0.5 --ray-min-replicas 2 --ray-max-replicas 3 --ray-max-ongoing 5 "
            "--ray-resource pool_h100=1")  # fmt: skip
    deployments = {d.name: d for d in build_app(app({"argv": argv}), name="zturbo").deployments}
    gpu, http = deployments["zturbo-gpu"], deployments["zturbo-http"]
    scaling = gpu._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, gpu._deployment_config.max_ongoing_requests) == (2, 3, 5)
    assert gpu.ray_actor_options == {"num_gpus": 0.5, "num_cpus": 1.0, "resources": {"pool_h100": 1.0}}
    assert http._deployment_config.num_replicas == 1
    with pytest.raises(ValueError, match="unknown application argument"):
        app({"argv": argv, "model": "x"})
    with pytest.raises(InvalidRequestError, match="--ray needs a job store every node reaches"):
        app({"argv": f"--model {tiny_dir} --data-dir {tmp_path} --store sqlite"})


# --- a replica's work on the real batch code and a real store (no Ray) ----------------------------------


def replica_work(engine, db, data_dir, name: str = "ray-replica-t1", *, exits: list | None = None, **settings):
    """A replica's `ReplicaWork` on the tiny CPU engine; its process's end goes to `exits`."""
    from serving import LIMITS
    from zturbo.config import RuntimeConfig
    from zturbo.serving.raydeploy import ReplicaWork
    from zturbo.serving.service import ServeSettings

    plan = ServeSettings(config=RuntimeConfig(), data_dir=data_dir, devices=["ray"], limits=LIMITS, store=db,
                         node_lease_s=600, **settings)  # fmt: skip
    exit_process = exits.append if exits is not None else lambda code: pytest.fail(f"the replica exited ({code})")
    return ReplicaWork(engine, Ready({}, None), plan, name=name, device="cpu", node="n1", exit_process=exit_process)


def one_run(work) -> list:
    """The messages of one `run` request, to the end of its stream."""

    async def collect():
        return [message async for message in work.run()]

    return asyncio.run(collect())


def tiny_job(store, prompt: str = "a fox", steps: int = 2):
    from serving import LIMITS
    from zturbo.request import GenerateRequest

    return store.submit(GenerateRequest.create(prompt, limits=LIMITS, width=64, height=64, steps=steps))


@pytest.fixture
def ingress_store(postgres_db, tmp_path):
    from zturbo.serving.pgstore import PostgresJobStore

    store = PostgresJobStore(postgres_db, inputs_dir=tmp_path / "inputs", lease_s=600)
    yield store
    store.close()


def test_a_replica_reports_its_time_with_each_batch(engine, ingress_store, postgres_db, tmp_path):
    work = replica_work(engine, postgres_db, tmp_path)
    try:
        time.sleep(0.3)  # the replica waits for its first request
        job = tiny_job(ingress_store)
        messages = one_run(work)
        [free] = [m for m in messages if isinstance(m, GpuFree)]
        assert free.job_ids == (job.id,) and free.seconds is not None
        steps = [m.step for m in messages if isinstance(m, Progress)]
        assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 2  # the first and last at once
        assert free.seconds.idle >= 0.3 and free.seconds.engine > 0 and free.seconds.host >= 0
        assert ingress_store.get(job.id).status == jobs.SUCCEEDED
        second = tiny_job(ingress_store, "a cat")
        [free] = [m for m in one_run(work) if isinstance(m, GpuFree)]
        assert free.job_ids == (second.id,) and free.seconds.idle < 0.3  # each account starts at the last
    finally:
        work.close()


def test_a_replica_claims_batches_within_the_servers_pixel_budget(engine, ingress_store, postgres_db, tmp_path):
    work = replica_work(engine, postgres_db, tmp_path, max_batch=8, max_batch_pixels=2 * 64 * 64)
    try:
        queued = [tiny_job(ingress_store, p) for p in ("a fox", "a cat", "a heron")]
        [free] = [m for m in one_run(work) if isinstance(m, GpuFree)]
        assert free.job_ids == tuple(j.id for j in queued[:2])  # two 64² images fill the budget, not 8
    finally:
        work.close()


def test_a_lone_job_past_the_time_limit_fails_once_and_the_replica_ends_its_process(
    engine, ingress_store, postgres_db, tmp_path, monkeypatch
):
    from zturbo.serving.raydeploy import TIMED_OUT_EXIT

    monkeypatch.setenv("ZTURBO_TEST_STEP_SLEEP", "0.5")
    exits = []
    work = replica_work(engine, postgres_db, tmp_path, exits=exits, job_timeout=1.0)
    job = tiny_job(ingress_store, steps=8)  # 4 s on the GPU
    messages = one_run(work)  # ends once the hung batch does, well after the time limit
    assert exits == [TIMED_OUT_EXIT]
    ended = [m for m in messages if isinstance(m, Finished)]
    assert [(m.job_id, m.status) for m in ended] == [(job.id, jobs.FAILED)]
    done = ingress_store.get(job.id)
    assert done.status == jobs.FAILED and done.attempts == 1 and not done.images
    assert done.error == {"type": "timeout", "message": "the job ran longer than the time limit of 1 s and was stopped"}
    assert "ray-replica-t1" not in ingress_store.live_nodes("ray-replica-")  # its lease ended with it


def test_a_batch_past_the_time_limit_runs_again_each_job_alone_its_attempt_counted(
    engine, ingress_store, postgres_db, tmp_path, monkeypatch
):
    monkeypatch.setenv("ZTURBO_TEST_STEP_SLEEP", "0.5")
    exits = []
    work = replica_work(engine, postgres_db, tmp_path, exits=exits, job_timeout=1.0)
    first, second = (tiny_job(ingress_store, prompt, steps=8) for prompt in ("a fox", "a cat"))
    messages = one_run(work)
    assert len(exits) == 1
    assert {(m.job_id, m.status) for m in messages if isinstance(m, Released)} == {
        (first.id, jobs.QUEUED),
        (second.id, jobs.QUEUED),
    }
    again = [ingress_store.get(job.id) for job in (first, second)]
    assert [(job.status, job.attempts) for job in again] == [(jobs.QUEUED, 1)] * 2
    # Alone from now on: a claim of room for both takes one.
    assert [len(ingress_store.claim_batch("w", jobs.NO_LORAS, 4)) for _ in range(2)] == [1, 1]


class Died(Exception):
    """A stand-in for Ray's ActorDiedError."""


def test_the_ingress_gives_a_dead_replicas_jobs_back_at_once_a_batch_of_several_to_run_alone_uncounted(
    ingress_store, postgres_db, tmp_path
):
    """As the Supervisor does for a dead worker: a batch of several on the GPU runs again job by job,
    its attempts given back; a job being written counts its attempt. A stream that broke without
    Ray saying the replica died leaves its job to the replica's lease."""
    from zturbo.serving.pgstore import PostgresJobStore

    gone = PostgresJobStore(postgres_db, inputs_dir=tmp_path / "inputs", lease_s=600, node="ray-replica-r1")
    try:
        ids = [tiny_job(ingress_store, f"a fox {i}").id for i in range(4)]
        batch = gone.claim_batch("gpu", jobs.NO_LORAS, 2)
        written, cut_off = (gone.claim_batch("gpu", jobs.NO_LORAS, 1)[0] for _ in range(2))
    finally:
        gone.close()
    assert [c.job_id for c in batch] == ids[:2] and (written.job_id, cut_off.job_id) == tuple(ids[2:])
    replica = Replica("ray-replica-r1", "cpu", "node1", 42, Ready({}, None), batch[0].worker)
    streams = [
        [replica, *(Running(c.job_id, c.attempt) for c in batch), Progress(ids[0], 1, 2), Died("killed")],
        [replica, Running(written.job_id, 1), GpuFree((written.job_id,), 1), Died("killed")],
        [replica, Running(cut_off.job_id, 1), RuntimeError("unreachable")],
    ]
    handle = FakeHandle(streams, replica)
    handle.release.set()
    events = []
    hooks = Hooks(on_event=lambda j, e, d: events.append((j, e, d)))
    dispatcher = RayDispatcher(handle, ingress_store, hooks, died=lambda e, r: isinstance(e, Died))
    for _ in streams:
        dispatcher._follow()
    got = {job_id: (ingress_store.get(job_id).status, ingress_store.get(job_id).attempts) for job_id in ids}
    assert got == {ids[0]: (jobs.QUEUED, 0), ids[1]: (jobs.QUEUED, 0), ids[2]: (jobs.QUEUED, 1),
                   ids[3]: (jobs.RUNNING, 1)}  # fmt: skip
    requeued = {j: d for j, e, d in events if e == "requeued"}
    assert set(requeued) == set(ids[:3]) and requeued[ids[2]]["attempts"] == 1
    assert requeued[ids[0]]["reason"] == "its replica ray-replica-r1 died (Died: killed)"
    # The batch's jobs run alone next.
    claims = [ingress_store.claim_batch("w", jobs.NO_LORAS, 4) for _ in range(2)]
    assert [[c.job_id for c in claim] for claim in claims] == [[ids[0]], [ids[1]]]


def test_a_replica_is_gone_when_ray_says_it_died_or_its_unreachable_actor_has_left_rays_registry(monkeypatch):
    """Serve's gRPC transport reports a killed replica as ActorUnavailableError, as it does a
    connection lost for a while: only the actor's name gone from Ray's registry tells them apart."""
    ray = pytest.importorskip("ray", reason="needs pip install 'zturbo[ray]'")
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from zturbo.serving.raydeploy import SERVE_NAMESPACE, replica_died

    @ray.remote(num_cpus=0)
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    def named(name: str) -> Replica:
        return Replica("ray-replica-r1", "cpu", "node1", 42, Ready({}, None), "ray-replica-r1/gpu", name)

    unavailable = ActorUnavailableError("unreachable", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # else Ray saves a token in ~/.ray for later clusters
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        replica = {"namespace": SERVE_NAMESPACE, "lifetime": "detached"}  # as Serve makes its replicas
        alive = Actor.options(name="SERVE_REPLICA::t#a", **replica).remote()
        killed = Actor.options(name="SERVE_REPLICA::t#b", **replica).remote()
        os.kill(ray.get(killed.pid.remote()), signal.SIGKILL)
        ray.get(alive.pid.remote())
        started = time.monotonic()
        assert not replica_died(unavailable, named("SERVE_REPLICA::t#a"))  # reachable again: the lease decides
        assert time.monotonic() - started >= 4  # it waited for Ray to drop the actor, then gave up
        assert replica_died(unavailable, named("SERVE_REPLICA::t#b"))
        assert not replica_died(unavailable, named(""))  # not a Ray actor: nothing to look up
    finally:
        ray.shutdown()
    assert replica_died(ActorDiedError(), named(""))
    assert not replica_died(RuntimeError("ActorDiedError"), named("SERVE_REPLICA::t#b"))
