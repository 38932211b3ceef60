"""Crashes: a worker killed mid-job, a job past its time limit, a server stopped or killed with jobs queued.

Every accepted job must complete exactly once, with its input images. One data directory is carried
through three servers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import time

import numpy as np
from PIL import Image

from serving import Server
from zturbo.imageio import METADATA_KEY


def noise_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_running(server: Server, job_id: str, timeout: float = 30) -> dict:
    """Until the job is running and has made at least one step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran: {job}\n{server.tail()}")


def images_on_disk(data_dir, job_id: str) -> list[str]:
    return sorted(p.name for p in (data_dir / "images").iterdir() if p.name.startswith(job_id))


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_crashes_lose_no_job_and_run_none_twice(tiny_dir, tmp_path):
    data = tmp_path / "data"
    # The API only: mounting the web UI costs each of the three starts seconds (test_ui_e2e serves it).
    args = ("--job-timeout", "4", "--shutdown-grace", "0", "--no-ui")
    server = Server(tiny_dir, data, *args, step_sleep=0.2)
    server.wait_ready()

    # 1. kill -9 of the worker mid-job: the job is re-run on the restarted worker and completes once.
    job = server.submit(steps=8, seed=3)
    wait_running(server, job["id"])
    first_pid = server.worker()["pid"]
    os.kill(first_pid, signal.SIGKILL)
    done = server.wait_job(job["id"], timeout=90)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert len(done["images"]) == 1 and images_on_disk(data, job["id"]) == [f"{job['id']}-0.png"]
    worker = server.worker()
    assert worker["restarts"] == 1 and worker["pid"] != first_pid and "SIGKILL" in worker["last_error"]
    assert server.client.get("/ready").status_code == 200
    assert 'zturbo_worker_restarts_total{worker="worker-0"} 1.0' in server.client.get("/metrics").text

    # 2. A job past the time limit is failed with the reason (not retried); the worker comes back.
    slow = server.submit(steps=40)
    failed = server.wait_job(slow["id"], timeout=60)
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["error"]["type"] == "timeout" and "time limit of 4 s" in failed["error"]["message"]
    server.wait_ready()
    assert server.worker()["restarts"] == 2

    # 3. Graceful stop with jobs queued and one running: the running one goes back to the queue.
    queued = [server.submit(steps=4, seed=100 + i)["id"] for i in range(4)]
    wait_running(server, queued[0])
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown

    server = Server(tiny_dir, data, *args, step_sleep=0.2)
    server.wait_ready()
    results = [server.wait_job(j, timeout=90) for j in queued]
    assert [r["status"] for r in results] == ["succeeded"] * 4
    assert [r["attempts"] for r in results] == [1] * 4  # the interrupted run was given back, not counted
    assert [r["images"][0]["seed"] for r in results] == [100, 101, 102, 103]
    # Finished jobs were not run again.
    again = server.client.get(f"/v1/jobs/{job['id']}").json()
    assert (again["attempts"], again["finished_at"]) == (done["attempts"], done["finished_at"])

    # 4. kill -9 of the whole server mid-job: its worker dies with it; the next server re-runs the job,
    # its input image read back from the data directory's store.
    image = noise_png()
    last = server.submit(steps=10, seed=9, image=base64.b64encode(image).decode())
    wait_running(server, last["id"])
    orphan = server.worker()["pid"]
    server.stop(signal.SIGKILL)
    assert gone(orphan), "the worker outlived its server"
    server = Server(tiny_dir, data, *args, step_sleep=0.0)
    try:
        server.wait_ready()
        rerun = server.wait_job(last["id"], timeout=60)
        assert rerun["status"] == "succeeded" and rerun["attempts"] == 2
        png = server.client.get(rerun["images"][0]["url"]).content
        with Image.open(io.BytesIO(png)) as made:
            inputs = json.loads(made.text[METADATA_KEY])["inputs"]
        assert (inputs["mode"], inputs["images"]) == ("img2img", {"image": hashlib.sha256(image).hexdigest()})
        history = server.client.get("/v1/history", params={"limit": 200}).json()
        ids = [item["id"] for item in history["items"]]
        assert len(ids) == len(set(ids)) == history["total"] == 7
        assert all(
            len(item["images"]) == item["params"]["n"] for item in history["items"] if item["status"] == "succeeded"
        )
    finally:
        server.stop()
