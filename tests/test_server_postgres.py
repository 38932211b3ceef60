"""Two `zturbo serve` processes sharing one PostgreSQL queue and one data directory, as two machines
would: a job submitted to either runs on either, and when one server is killed mid-job the other
runs its job once more, so every accepted job is done exactly once (in the store and on disk)."""

from __future__ import annotations

import signal
import time

import pytest

from serving import Server
from test_server_recovery import gone, images_on_disk
from zturbo.cli import main as cli_main

LEASE_S = 2


@pytest.fixture
def servers(tiny_dir, tmp_path, postgres_db):
    data = tmp_path / "shared"
    args = ("--store", postgres_db, "--node-lease", str(LEASE_S), "--shutdown-grace", "0")
    pair = [Server(tiny_dir, data, *args, step_sleep=0.1) for _ in range(2)]
    yield pair, data
    for server in pair:
        server.stop(signal.SIGKILL)


def running_on(servers: list[Server], job_id: str, timeout: float = 60) -> Server:
    """The server whose worker runs the job (only it knows the job's progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in servers:
            if server.client.get(f"/v1/jobs/{job_id}").json()["progress"]:
                return server
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran\n{servers[0].tail()}\n{servers[1].tail()}")


def test_two_servers_share_the_queue_and_a_killed_ones_job_is_done_once(servers):
    pair, data = servers
    for server in pair:
        server.wait_ready()
    doomed = pair[0].submit(steps=20, seed=7)
    holder = running_on(pair, doomed["id"])
    survivor = pair[1] if holder is pair[0] else pair[0]
    assert survivor.client.get(f"/v1/jobs/{doomed['id']}").json()["status"] == "running"  # one queue
    others = [pair[i % 2].submit(steps=2, seed=100 + i)["id"] for i in range(6)]
    orphan = holder.worker()["pid"]
    holder.stop(signal.SIGKILL)  # the machine is lost: its server and its worker, mid-job
    assert gone(orphan), "the worker outlived its server"

    done = [survivor.wait_job(job_id, timeout=120) for job_id in [doomed["id"], *others]]
    assert [job["status"] for job in done] == ["succeeded"] * 7, done
    assert done[0]["attempts"] == 2  # the lost server's attempt counted, then the survivor's
    for job in done:
        assert [image["seed"] for image in job["images"]] == [job["params"]["seed"]]
        assert images_on_disk(data, job["id"]) == [f"{job['id']}-0.png"]
        assert survivor.client.get(job["images"][0]["url"]).status_code == 200
    history = survivor.client.get("/v1/history", params={"limit": 50}).json()
    assert history["total"] == 7 and len({item["id"] for item in history["items"]}) == 7


def test_a_bad_store_is_refused_before_anything_loads(capsys, tmp_path):
    assert cli_main(["serve", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--store", "mysql://db/z"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--store 'mysql://db/z' is not a job store" in last and "postgresql://" in last


def test_an_unreachable_store_is_one_line_naming_it_without_its_password(capsys, tiny_dir, tmp_path):
    url = "postgresql://zturbo:secret@127.0.0.1:1/zturbo"
    args = ["serve", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--store", url, "--no-ui"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("zturbo: error: ") and "secret" not in err and "Traceback" not in err
    assert "postgresql://zturbo:***@127.0.0.1:1/zturbo" in last or "needs psycopg" in last
