"""The worker's job loop and the supervisor's dispatch, in this process: no worker is spawned.

`_run_claim` runs with the session's tiny engine; the supervisor gets slots whose "process" is a
stand-in, so a dead worker and its pipe can be arranged exactly.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from zturbo.request import GenerateRequest
from zturbo.serving import jobs, workers

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 1}


@pytest.fixture
def store(tmp_path):
    s = jobs.JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def run_claim(engine: Any, store: jobs.JobStore, images_dir: Path) -> tuple[jobs.Job, list[Any]]:
    """Queue one small job, run it as a worker would; the job as stored and the messages sent."""
    store.submit(GenerateRequest.create("a fox", limits=engine.limits, **SMALL))
    claim = store.claim("worker-0")
    here, there = mp.Pipe()
    workers._run_claim(engine, store, images_dir, claim, there)
    messages = []
    while here.poll():
        messages.append(here.recv())
    return store.get(claim.job_id), messages


class CancelDuringLastStep:
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
