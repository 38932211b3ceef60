"""`zturbo serve --ray`: the HTTP API on a real Ray cluster (a head and a second worker node, each a
`ray start` process of its own) with tiny-model CPU replicas, on a real PostgreSQL queue.

Marked `ray` and left out of the default run (a cluster takes a minute to start on a small machine):
    pytest -q -m ray tests/test_ray.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import time

import httpx
import pytest
from PIL import Image

from raycluster import SLOT, cluster
from serving import KEY, Server
from test_server import sse_events
from test_server_recovery import images_on_disk
from zturbo.imageio import METADATA_KEY
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
    """Two replicas, one per node, the web UI on."""
    data = tmp_path_factory.mktemp("ray") / "shared"
    fixed = ("--ray-min-replicas", "2", "--ray-max-replicas", "2", "--queue-size", "128",
             "--job-timeout", str(JOB_TIMEOUT_S))  # fmt: skip
    server = deploy(tiny_dir, data, ray_db, ray_cluster[0], *fixed)
    wait_for(lambda: len(server.client.get("/v1/status").json()["workers"]) == 2, 120, server)
    yield server, data
    assert server.stop() == 0, server.tail()


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
        ids = [server.submit(seed=i, steps=8)["id"] for i in range(10)]
        wait_for(lambda: count() == 2, 240, server)  # a new replica imports torch and loads: slow on a busy machine
        assert [server.wait_job(job_id, timeout=240)["status"] for job_id in ids] == ["succeeded"] * 10
        wait_for(lambda: count() == 1, 180, server)
    finally:
        assert server.stop() == 0, server.tail()


def test_the_openai_client_native_api_ui_and_status_pass_against_the_deployment(two_replicas):
    from openai import OpenAI

    server, _ = two_replicas
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.generate(prompt="a red fox in snow", n=2, size="64x48", response_format="b64_json",
                                    extra_body={"seed": 7, "steps": 2})  # fmt: skip
    seeds = []
    for item in result.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as im:
            assert im.size == (64, 48)
            seeds.append(json.loads(im.text[METADATA_KEY])["seed"])
    assert seeds == [7, 8]
    job = server.submit(prompt="a lighthouse at dusk", steps=3, seed=11)
    events = sse_events(server.client, job["id"])
    assert [n for n, _ in events][-1] == "done"
    assert [d for n, d in events if n == "progress"][-1] == {"step": 3, "steps": 3}
    done = server.client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and server.client.get(done["images"][0]["url"]).status_code == 200
    status = server.client.get("/v1/status").json()
    assert all(w["id"].startswith("ray-replica-") and w["state"] in ("ready", "busy") for w in status["workers"])
    assert status["model_source"] == "local"
    assert httpx.get(f"{server.url}/ui/", follow_redirects=True).status_code == 200


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


def test_killing_a_replica_then_the_second_node_leaves_every_job_done_once(two_replicas, ray_cluster, ray_db):
    """The killed replica held a batch of several on its GPU: its jobs run again at once, each alone,
    their attempt not counted (as a `zturbo serve` worker's crashed batch)."""
    server, data = two_replicas
    _, _, worker_node = ray_cluster
    before = finished_counts(server)
    ids = [server.submit(seed=100 + i, steps=12)["id"] for i in range(10)]
    batch = []
    wait_for(lambda: batch.extend(w for w in server.client.get("/v1/status").json()["workers"]
                                  if len(w["jobs"]) > 1) or batch, 60, server)  # fmt: skip
    killed = batch[0]
    os.kill(killed["pid"], signal.SIGKILL)  # a replica's process, mid-batch

    def given_back() -> bool:
        return not any((w or "").startswith(killed["id"]) for _, _, _, w in stored(ray_db, killed["jobs"]).values())

    wait_for(given_back, 20, server)
    # The ingress gave them back (the lease's recovery would have counted the attempt, kept the batch key).
    for status, attempts, key, _ in stored(ray_db, killed["jobs"]).values():
        assert key == "" and attempts == (0 if status == "queued" else 1), (status, attempts, key)
    worker_node.kill()  # then the second node, with whatever replica it holds
    done = [server.wait_job(job_id, timeout=240) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * 10, done
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
