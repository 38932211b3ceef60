"""`zturbo serve --ray`: the HTTP API on a real Ray cluster (a head and a second worker node, each a
`ray start` process of its own) with tiny-model CPU replicas, on a real PostgreSQL queue.

Marked `ray` and left out of the default run (a cluster takes a minute to start on a small machine):
    pytest -q -m ray tests/test_ray.py
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest

import test_a1111
import test_server
import test_server_images
from raycluster import SLOT, cluster
from serving import Server
from test_server import sse_events
from test_server_recovery import images_on_disk
from zturbo.serving.jobs import MAX_ATTEMPTS
from zturbo.serving.stores import open_store

pytestmark = pytest.mark.ray

LEASE_S = 3  # the replicas' node lease: a lost one's jobs come back within it
STEP_SLEEP_S = 0.25  # each denoising step: long enough to kill a replica mid-job
JOB_TIMEOUT_S = 8  # the shared deployment's --job-timeout: well over its other jobs' seconds
REPLICA = ("--ray-gpus-per-replica", "0", "--ray-cpus-per-replica", "1", "--ray-resource", f"{SLOT}=1")


@pytest.fixture(scope="module")
def ray_cluster():
    with cluster() as c:
        yield c


@pytest.fixture(scope="module")
def ray_db(postgres_server):
    from pgserver import fresh_database

    with fresh_database(postgres_server) as url:
        yield url


def deploy(tiny_dir, data, db, address, *args: str) -> Server:
    server = Server(tiny_dir, data, "--ray", address, "--store", db, "--node-lease", str(LEASE_S), *REPLICA, *args,
                    step_sleep=STEP_SLEEP_S)  # fmt: skip
    server.wait_ready(timeout=300)
    return server


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, ray_db, tiny_dir, tmp_path_factory):
    """Two replicas, one per node, the web UI on; the size bound and the A1111 policy of the native
    and A1111 API tests' own servers (test_server.py, test_a1111.py), whose tests run on it too."""
    data = tmp_path_factory.mktemp("ray") / "shared"
    fixed = ("--ray-min-replicas", "2", "--ray-max-replicas", "2", "--queue-size", "128",
             "--job-timeout", str(JOB_TIMEOUT_S), "--max-pixels", str(128 * 128),
             "--client-defaults", "turbo")  # fmt: skip
    server = deploy(tiny_dir, data, ray_db, ray_cluster[0], *fixed)
    server.model_name = Path(tiny_dir).name  # type: ignore[attr-defined]  # what test_a1111's server says
    wait_for(lambda: len(server.client.get("/v1/status").json()["workers"]) == 2, 120, server)
    yield server, data
    assert server.stop() == 0, server.tail()


@pytest.fixture(scope="module")
def server(two_replicas) -> Server:
    """The shared deployment, under the name the reused API tests ask for."""
    return two_replicas[0]


@pytest.fixture(scope="module")
def live(server) -> SimpleNamespace:
    """The shared deployment, as test_server_images.py's image tests ask for theirs."""
    return SimpleNamespace(server=server)


def wait_for(check, timeout: float, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout} s; status: {server.client.get('/v1/status').json()}\n{server.tail()}")


def claimers(db: str, data, ids: list[str]) -> dict[str, str]:
    """The node (replica) each job was last claimed by, from the store."""
    store = open_store(db, data, check=False)
    try:
        return {job_id: store.get(job_id).worker.split("/")[0] for job_id in ids}
    finally:
        store.close()


def load_until(server: Server, done, timeout: float, depth: int = 6) -> list[str]:
    """Keep `depth` jobs waiting until `done()`: the autoscaler averages ongoing requests over its
    look-back period, so a burst that one batch clears in seconds may never count as load. Each job
    has steps of its own, so no two share a batch. The ids of every job submitted."""
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout} s\n{server.tail()}"
        while server.client.get("/v1/status").json()["queue_depth"] < depth:
            ids.append(server.submit(seed=len(ids), steps=4 + len(ids) % 16)["id"])
        time.sleep(0.3)
    return ids


def test_autoscaling_goes_from_one_replica_to_two_under_load_and_back(ray_cluster, ray_db, tiny_dir, tmp_path):
    """A deployment of its own, first in the module: its second replica needs the worker node's slot,
    which the kill test below takes away."""
    address, _, _ = ray_cluster
    args = ("--ray-min-replicas", "1", "--ray-max-replicas", "2", "--ray-target-ongoing", "1",
            "--ray-scale-delay", "3", "--no-ui")  # fmt: skip
    server = deploy(tiny_dir, tmp_path / "shared", ray_db, address, *args)
    try:
        count = lambda: len(server.client.get("/v1/status").json()["workers"])  # noqa: E731
        wait_for(lambda: count() == 1, 60, server)
        ids = load_until(server, lambda: count() == 2, 240)  # a new replica imports torch and loads: slow when busy
        assert [server.wait_job(job_id, timeout=240)["status"] for job_id in ids] == ["succeeded"] * len(ids)
        # The new replica took jobs from the queue while the first one's waiting requests held it.
        assert len(set(claimers(ray_db, tmp_path / "shared", ids[-6:]).values())) == 2
        wait_for(lambda: count() == 1, 180, server)
    finally:
        assert server.stop() == 0, server.tail()


def test_status_lists_the_replicas_and_the_ui_answers(server):
    described = lambda: {w["device"] for w in server.client.get("/v1/status").json()["workers"]} == {"cpu"}  # noqa: E731
    wait_for(described, 30, server)  # a replica is listed once its lease holds, described once it answers
    status = server.client.get("/v1/status").json()
    assert all(w["id"].startswith("ray-replica-") and w["state"] in ("ready", "busy") for w in status["workers"])
    assert status["model_source"] == "local" and status["device"] == "ray"
    assert {w["device"] for w in status["workers"]} == {"cpu"} and len({w["node"] for w in status["workers"]}) == 2
    assert status["dtypes"] == {"transformer": "float32", "text_encoder": "float32", "vae": "float32"}
    assert status["limits"]["max_pixels"] == 128 * 128 and status["limits"]["profile"]["name"] == "turbo"
    metrics = server.client.get("/metrics").text
    assert all(name in metrics for name in ("zturbo_queue_depth", "zturbo_job_run_seconds_bucket", "zturbo_workers"))
    assert httpx.get(f"{server.url}/ui/", follow_redirects=True).status_code == 200


def test_a_second_server_on_another_port_is_refused_and_the_running_one_keeps_serving(
    server, ray_cluster, ray_db, tiny_dir, tmp_path
):
    # Serve keeps the HTTP entry of the instance already running; a server announced on another
    # port would answer nowhere, and deploying its app would replace the running one's.
    other = Server(tiny_dir, tmp_path / "data", "--ray", ray_cluster[0], "--store", ray_db, *REPLICA)
    code = other.proc.wait(120)
    other.stop()  # it has exited: this closes its client and log
    message = other.log_path.read_text(errors="replace")
    assert code == 2, message
    assert f"--host 127.0.0.1 --port {other.port}: Ray Serve already runs on this cluster" in message
    assert f"HTTP entry on 127.0.0.1:{server.port}" in message
    assert server.client.get("/ready").status_code == 200 and len(replica_names(server)) == 2


# The API tests of `zturbo serve`, run as they are against the deployment (the `server` fixture above):
# the official openai client, the native jobs with SSE, history, the edge's 401s and 400s naming the
# field, and the A1111 routes through the real webuiapi client. Their slow jobs stay under the time limit.
test_openai_client_generates_b64_json_and_url = test_server.test_openai_client_generates_b64_json_and_url
test_openai_client_sees_errors_as_api_errors = test_server.test_openai_client_sees_errors_as_api_errors
test_native_job_round_trip_with_sse_progress = test_server.test_native_job_round_trip_with_sse_progress
test_delete_history_removes_job_and_image = test_server.test_delete_history_removes_job_and_image
test_missing_or_wrong_key_is_401 = test_server.test_missing_or_wrong_key_is_401
test_bad_job_parameters_are_400_naming_the_field = test_server.test_bad_job_parameters_are_400_naming_the_field
test_bad_openai_extension_fields_are_400_naming_the_field = (
    test_server.test_bad_openai_extension_fields_are_400_naming_the_field
)
test_unknown_routes_ids_and_bodies_use_the_error_body = (
    test_server.test_unknown_routes_ids_and_bodies_use_the_error_body
)
test_exploration_options_round_trip_into_the_pngs_and_repeat_exactly = (
    test_server.test_exploration_options_round_trip_into_the_pngs_and_repeat_exactly
)
test_a_seed_list_makes_one_image_per_seed = test_server.test_a_seed_list_makes_one_image_per_seed
test_a_prompt_past_the_token_limit_runs_and_its_job_says_what_was_dropped = (
    test_server.test_a_prompt_past_the_token_limit_runs_and_its_job_says_what_was_dropped
)
# Image inputs: the files a job names are stored under the shared --data-dir, where the replica that
# runs it, on either node, reads them.
test_openai_edit_of_an_opaque_image_is_img2img_at_its_size = (
    test_server_images.test_openai_edit_of_an_opaque_image_is_img2img_at_its_size
)
test_openai_edit_repaints_the_masks_transparent_area = (
    test_server_images.test_openai_edit_repaints_the_masks_transparent_area
)
test_native_json_and_multipart_jobs_make_the_same_pixels = (
    test_server_images.test_native_json_and_multipart_jobs_make_the_same_pixels
)
test_turbo_maps_the_sd_defaults_and_says_so = test_a1111.test_turbo_maps_the_sd_defaults_and_says_so
test_options_models_and_samplers = test_a1111.test_options_models_and_samplers
test_progress_and_interrupt = test_a1111.test_progress_and_interrupt
test_the_a1111_routes_need_the_key = test_a1111.test_the_a1111_routes_need_the_key

BLOCKER_STEPS = 20  # 5 s of steps: under the time limit, over the wait for the second replica


def running_on_each_replica(server: Server) -> list[str]:
    """One long job running on each replica, of sizes of their own so that no replica claims both as a
    batch. The second, queued while the first runs, starts at once on the idle replica: not behind the
    first on its replica, as when the ingress counted a request running its batch as one still to claim."""
    first = server.submit(steps=BLOCKER_STEPS, width=64, height=48)["id"]
    wait_for(lambda: server.client.get(f"/v1/jobs/{first}").json()["status"] == "running", 60, server)
    second = server.submit(steps=BLOCKER_STEPS, width=64, height=64)["id"]
    wait_for(lambda: server.client.get(f"/v1/jobs/{second}").json()["status"] == "running", 3, server)
    assert server.client.get(f"/v1/jobs/{first}").json()["status"] == "running"  # both at once
    return [first, second]


def test_cancel_a_queued_job_at_once_and_running_ones_between_steps(server):
    """Unlike `zturbo serve`'s test, both replicas are made busy first: else the other one claims the
    "queued" job before the cancel lands."""
    blockers = running_on_each_replica(server)
    queued = server.submit(prompt="a queued heron", steps=2)
    assert queued["status"] == "queued"
    cancelled = server.client.delete(f"/v1/jobs/{queued['id']}").json()
    assert (cancelled["status"], cancelled["images"]) == ("cancelled", [])  # at once: no replica had it
    assert sse_events(server.client, queued["id"])[-1][0] == "cancelled"
    [listed] = server.history("queued heron")
    assert (listed["id"], listed["status"]) == (queued["id"], "cancelled")
    for job_id in blockers:
        assert server.client.delete(f"/v1/jobs/{job_id}").json()["cancel_requested"] is True
    for job_id in blockers:
        events = sse_events(server.client, job_id)
        assert events[-1][0] == "cancelled" and events[-1][1]["images"] == [], events[-1]
        assert max((d["step"] for n, d in events if n == "progress"), default=0) < BLOCKER_STEPS
    job = server.client.get(f"/v1/jobs/{queued['id']}").json()
    assert (job["status"], job["attempts"], job["images"]) == ("cancelled", 0, [])  # never run after


def test_jobs_spread_over_both_replicas_and_metrics_count_them_all(two_replicas, ray_db):
    server, data = two_replicas
    before = finished_counts(server)
    ids = [server.submit(seed=i, steps=2)["id"] for i in range(100)]
    done = [server.wait_job(job_id, timeout=300) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * 100
    by = claimers(ray_db, data, ids)
    assert len(set(by.values())) == 2, by  # both replicas ran some
    assert_each_ended_once(server, before, len(ids))  # /metrics: every replica's jobs, at the one ingress
    engine_s = re.findall(r'^zturbo_worker_seconds_total\{phase="engine",worker="(ray-replica-[^"]+)"\} (\S+)$',
                          server.client.get("/metrics").text, re.M)  # fmt: skip
    assert len(engine_s) >= 2 and all(float(s) > 0 for _, s in engine_s), engine_s  # each replica's time account


def finished_counts(server: Server) -> dict[str, float]:
    """`zturbo_jobs_finished_total` by status, as the ingress counts every replica's job ends."""
    text = server.client.get("/metrics").text
    found = re.findall(r'^zturbo_jobs_finished_total\{status="([^"]+)"\} (\S+)$', text, re.M)
    return {status: float(value) for status, value in found}


def finished_since(server: Server, before: dict[str, float]) -> dict[str, float]:
    """The job ends counted since `before`, by status; a series `before` lacked counts from 0."""
    now = finished_counts(server)
    return {status: n - before.get(status, 0.0) for status, n in now.items() if n != before.get(status, 0.0)}


def assert_each_ended_once(server: Server, before: dict[str, float], count: int) -> None:
    """Since `before`, the ingress counted exactly `count` job ends, all succeeded. A job run to its
    end twice (a second claim, or a replica's finish after its claim went stale) counts twice. A
    job's end reaches the ingress just after the store has it: waited for, then a lease's length
    more for a late second end to show."""
    wait_for(lambda: sum(finished_since(server, before).values()) >= count, 30, server)
    time.sleep(LEASE_S)
    assert finished_since(server, before) == {"succeeded": count}


def replica_names(server: Server) -> set[str]:
    return {w["id"] for w in server.client.get("/v1/status").json()["workers"]}


def test_a_job_past_the_time_limit_fails_once_and_its_replica_comes_back(two_replicas):
    server, _ = two_replicas
    before = replica_names(server)
    job = server.submit(prompt="a slow fox", steps=60)  # 15 s of steps, alone on its replica
    done = server.wait_job(job["id"], timeout=120)
    assert (done["status"], done["attempts"]) == ("failed", 1), done
    assert done["error"]["type"] == "timeout" and f"time limit of {JOB_TIMEOUT_S} s" in done["error"]["message"]
    # The replica ended its process; Ray Serve starts another, under a name of its own.
    wait_for(lambda: len(replica_names(server)) == 2 and replica_names(server) != before, 240, server)
    assert server.wait_job(server.submit(seed=3)["id"], timeout=120)["status"] == "succeeded"
    assert server.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"  # not run again


def stored(db: str, ids: list[str]) -> dict[str, tuple]:
    """Each job's status, attempts, batch key and claimer, read from the store's table."""
    import psycopg

    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT id, status, attempts, batch_key, worker FROM jobs WHERE id = ANY(%s)", (ids,))
        return {row[0]: row[1:] for row in rows}


def ended(db: str, ids: list[str]) -> dict[str, tuple]:
    """Each job's status, attempts, end time and image rows, read from the store's tables."""
    import psycopg

    query = """SELECT id, status, attempts, finished_at, (SELECT count(*) FROM images WHERE job_id = jobs.id)
               FROM jobs WHERE id = ANY(%s)"""
    with psycopg.connect(db) as conn:
        return {row[0]: row[1:] for row in conn.execute(query, (ids,))}


def on_node(node, pid: int) -> bool:
    """Whether process `pid` runs on `node` (one of its `ray start` process's descendants)."""
    return pid in {p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)}


def keep_busy_until(server: Server, check, seed: int, timeout: float = 180) -> list[str]:
    """Keep jobs waiting until a replica in /v1/status satisfies `check`; the ids of the jobs added."""
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        status = server.client.get("/v1/status").json()
        if any(check(w) for w in status["workers"]):
            return ids
        assert time.monotonic() < deadline, f"not within {timeout} s; status: {status}\n{server.tail()}"
        if status["queue_depth"] < 3:
            ids.append(server.submit(seed=seed + len(ids), steps=12)["id"])
        time.sleep(0.3)


def replica_where(server: Server, check) -> dict:
    """The first replica in /v1/status for which `check(worker)` holds, waiting up to 60 s for one."""
    found: list[dict] = []
    wait_for(lambda: found.extend(w for w in server.client.get("/v1/status").json()["workers"] if check(w)) or found,
             60, server)  # fmt: skip
    return found[0]


def test_killing_a_replica_then_the_second_node_leaves_every_job_done_once(two_replicas, ray_cluster, ray_db):
    """The killed replica held a batch of several on its GPU: its jobs run again at once, each alone,
    their attempt not counted (as a `zturbo serve` worker's crashed batch). Then the second node goes
    while its replica (restarted there, if it was the one killed) runs a job."""
    server, data = two_replicas
    _, _, worker_node = ray_cluster
    before = finished_counts(server)
    ids = [server.submit(seed=100 + i, steps=12)["id"] for i in range(10)]
    killed = replica_where(server, lambda w: len(w["jobs"]) > 1)
    os.kill(killed["pid"], signal.SIGKILL)  # a replica's process, mid-batch

    def given_back() -> bool:
        return not any((w or "").startswith(killed["id"]) for _, _, _, w in stored(ray_db, killed["jobs"]).values())

    wait_for(given_back, 20, server)
    # The ingress gave them back (the lease's recovery would have counted the attempt, kept the batch key).
    for status, attempts, key, _ in stored(ray_db, killed["jobs"]).values():
        assert key == "" and attempts == (0 if status == "queued" else 1), (status, attempts, key)
    ids += keep_busy_until(server, lambda w: w["jobs"] and on_node(worker_node, w["pid"]), seed=200)
    worker_node.kill()  # then the second node, its replica mid-job
    done = [server.wait_job(job_id, timeout=240) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * len(ids), done
    # Done once: one end each at the ingress, within the attempts allowed, one image row each, and
    # the one file on disk not rewritten after its job's recorded end (a re-run reuses its name).
    assert_each_ended_once(server, before, len(ids))
    rows = ended(ray_db, ids)
    assert rows.keys() == set(ids)
    for job_id, (status, attempts, finished_at, image_rows) in rows.items():
        assert (status, image_rows) == ("succeeded", 1) and 1 <= attempts <= MAX_ATTEMPTS, (job_id, attempts)
        assert images_on_disk(data, job_id) == [f"{job_id}-0.png"]
        assert (data / "images" / f"{job_id}-0.png").stat().st_mtime <= finished_at + 0.5, job_id
    store = open_store(ray_db, data, check=False)
    try:
        assert store.counts()["running"] == store.counts()["queued"] == 0
    finally:
        store.close()
