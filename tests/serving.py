"""A `zturbo serve` subprocess for the tests: the API tests, the crash tests and the web UI's e2e tests.

ZTURBO_TEST_STEP_SLEEP (a test hook) slows each denoising step so that kills and cancels land mid-job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import zturbo
from zturbo.config import RuntimeConfig
from zturbo.request import ModelLimits

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `zturbo serve` subprocess on a free port."""

    def __init__(self, model: str | Path, data_dir: Path, *args: str, step_sleep: float = 0.0, key: str | None = KEY):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        env = dict(os.environ)
        src = str(Path(zturbo.__file__).parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        env["ZTURBO_TEST_STEP_SLEEP"] = str(step_sleep)
        env.pop("ZTURBO_API_KEY", None)
        if key:
            env["ZTURBO_API_KEY"] = key
        cmd = [sys.executable, "-m", "zturbo.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--data-dir", str(data_dir), "--compile", "off", "--log-level", "warning", *args]  # fmt: skip
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.client.close()
        self.log.close()
        return code

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def submit(self, **body) -> dict:
        r = self.client.post("/v1/jobs", json={"prompt": "a red fox", **SMALL, "steps": 2, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish: {job}\n{self.tail()}")

    def history(self, q: str) -> list[dict]:
        return self.client.get("/v1/history", params={"q": q, "limit": 50}).json()["items"]

    def worker(self) -> dict:
        [worker] = self.client.get("/v1/status").json()["workers"]
        return worker


LIMITS = ModelLimits(spatial_unit=16, max_pixels=2048 * 2048)


def in_process_app(data_dir: Path, limits: ModelLimits = LIMITS, config: RuntimeConfig | None = None, **settings):
    """The HTTP API app in this process, with no workers (accepted jobs wait in the queue) and no key."""
    from zturbo.serving.app import create_app
    from zturbo.serving.service import ServeSettings

    config = config or RuntimeConfig(model="unloaded", device="cpu")
    settings.setdefault("allowed_hosts", ("testserver",))  # TestClient's Host; a keyless server checks Host
    return create_app(ServeSettings(config=config, data_dir=data_dir, devices=[], limits=limits, **settings))
