"""`zturbo serve` on a PostgreSQL queue shared with another node, and its refusals of a bad or
unreachable store. (The queue's own rules on PostgreSQL, several claimers and leases included,
are tests/test_jobs.py's.)"""

from __future__ import annotations

import threading

from serving import LIMITS, Server
from test_server_recovery import images_on_disk
from zturbo.cli import main as cli_main
from zturbo.request import GenerateRequest
from zturbo.serving.stores import open_store

LEASE_S = 5  # seconds; the beating thread renews every 1.7 s, slack for a loaded CI machine


def beating(store, stop: threading.Event) -> threading.Thread:
    """A node that is alive: it renews its lease until `stop` is set (then it is lost)."""

    def beat() -> None:
        while not stop.wait(0.2):
            store.heartbeat()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def test_a_server_on_a_shared_queue_takes_back_a_lost_nodes_job_and_does_each_once(tiny_dir, tmp_path, postgres_db):
    """Another node (this test's process) claims a job and stays alive while the server starts: the
    server leaves the job alone. Once that node stops renewing its lease, the server queues the job
    again and runs it; the lost node's ticket can no longer record it. Jobs go in through the lost
    node's store and through the server's API alike; each is done once, its image in the shared
    directory."""
    data = tmp_path / "shared"
    other = open_store(postgres_db, data, lease_s=LEASE_S)
    other.heartbeat()
    request = GenerateRequest.create("a red fox", limits=LIMITS, width=64, height=64, steps=2, seed=7)
    lost = other.submit(request)
    claim = other.claim("worker-0")
    stop = threading.Event()
    thread = beating(other, stop)
    server = Server(tiny_dir, data, "--store", postgres_db, "--node-lease", str(LEASE_S), "--no-ui")
    try:
        server.wait_ready()
        ids = [other.submit(request).id, server.submit(seed=8)["id"]]
        done = [server.wait_job(job_id) for job_id in ids]
        assert server.client.get(f"/v1/jobs/{lost.id}").json()["status"] == "running"  # alive: still its own
        stop.set()
        thread.join()
        done.append(server.wait_job(lost.id, timeout=60))
        assert [job["status"] for job in done] == ["succeeded"] * 3, done
        assert [job["attempts"] for job in done] == [1, 1, 2]  # the lost node's attempt counted
        assert not other.succeed(claim, [])  # its ticket is void
        for job in done:
            assert images_on_disk(data, job["id"]) == [f"{job['id']}-0.png"]
            assert server.client.get(job["images"][0]["url"]).status_code == 200
        assert other.counts() == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0, "cancelled": 0}
    finally:
        stop.set()
        server.stop()
        other.close()


def test_a_bad_store_is_refused_before_anything_loads(capsys, tmp_path):
    assert cli_main(["serve", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--store", "mysql://db/z"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--store 'mysql://db/z' is not a job store" in last and "postgresql://" in last
    assert cli_main(["serve", "--model", "/nonexistent", "--data-dir", str(tmp_path), "--node-lease", "0"]) == 2
    assert "--node-lease 0.0 must be 1..3600 seconds" in capsys.readouterr().err


def test_an_unreachable_store_is_one_line_naming_it_without_its_password(capsys, tiny_dir, tmp_path):
    url = "postgresql://zturbo:secret@127.0.0.1:1/zturbo"
    args = ["serve", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--store", url, "--no-ui"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("zturbo: error: ") and "secret" not in err and "Traceback" not in err
    assert "postgresql://zturbo:***@127.0.0.1:1/zturbo" in last or "needs psycopg" in last
