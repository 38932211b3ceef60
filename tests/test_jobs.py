"""The job queue on its own: ordering, bounds, claims as tokens, recovery, history.

The queue's tests run on both stores, SQLite and PostgreSQL (`queue`); those about SQLite's file
(damage, upgrades, a full disk) on SQLite alone. The PostgreSQL ones skip when no server can be
started (tests/pgserver.py says how to get one)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serving import SMALL, in_process_app
from zturbo.cli import main as cli_main
from zturbo.errors import InvalidRequestError, StorageError
from zturbo.request import REQUEST_FORMAT, GenerateRequest, ModelLimits
from zturbo.serving import jobs
from zturbo.serving.jobs import JobStore
from zturbo.serving.schemas import job_params
from zturbo.serving.stores import open_store

LIMITS = ModelLimits(spatial_unit=16, max_pixels=128 * 128)


def params(prompt: str = "a fox") -> GenerateRequest:
    return GenerateRequest.create(prompt, limits=LIMITS, width=64, height=64, steps=2, seed=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request, tmp_path):
    """Opens stores on one queue of the backend under test (each its own connection, as the server's
    processes, or several machines, have): an SQLite file in tmp_path, or a new PostgreSQL database."""
    location = "sqlite" if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    opened = []

    def open_queue(**options):
        opened.append(open_store(location, tmp_path, **options))
        return opened[-1]

    yield open_queue
    for s in opened:
        s.close()


@pytest.fixture
def store(queue):
    return queue(max_queued=3)


def test_jobs_are_claimed_oldest_first_with_positions(store):
    a, b, c = (store.submit(params(p)) for p in "abc")
    assert [store.position(j) for j in (a, b, c)] == [0, 1, 2]
    claim = store.claim("w0")
    assert claim.job_id == a.id and claim.attempt == 1
    assert store.get(a.id).status == jobs.RUNNING
    assert store.position(store.get(b.id)) == 0
    assert store.claim("w1").job_id == b.id


def test_a_full_queue_refuses_and_running_jobs_do_not_count(store):
    for p in "abc":
        store.submit(params(p))
    with pytest.raises(jobs.QueueFullError, match="3 of 3"):
        store.submit(params("d"))
    store.claim("w0")
    store.submit(params("d"))  # a claimed job left the queue


def test_concurrent_submissions_accept_exactly_the_bound(queue):
    """100 submissions through 4 connections (4 servers' worth) at once: exactly the bound is taken."""
    stores = [queue(max_queued=20) for _ in range(4)]
    results: list[str] = []
    lock = threading.Lock()

    def submit(store) -> None:
        try:
            store.submit(params())
            outcome = "ok"
        except jobs.QueueFullError:
            outcome = "full"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=submit, args=(stores[i % 4],)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 20 and results.count("full") == 80
    assert stores[0].depth() == 20


def test_concurrent_claims_take_each_job_once(queue):
    """Eight claimers on four connections empty the queue: every job is claimed once, on its first attempt."""
    stores = [queue(max_queued=60) for _ in range(4)]
    submitted = {stores[0].submit(params(f"job {i}")).id for i in range(60)}
    claims: list[jobs.Claim] = []
    lock = threading.Lock()

    def claim_all(store, worker: str) -> None:
        while batch := store.claim_batch(worker, jobs.NO_LORAS, 2):
            with lock:
                claims.extend(batch)

    threads = [threading.Thread(target=claim_all, args=(stores[i % 4], f"w{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.job_id for c in claims) == sorted(submitted)  # each once
    assert {c.attempt for c in claims} == {1} and stores[0].counts()[jobs.RUNNING] == 60


def test_a_stale_claim_cannot_finish_a_job(store):
    job = store.submit(params())
    first = store.claim("w0")
    assert store.release(first.job_id, first.attempt, "killed").status == jobs.QUEUED
    second = store.claim("w0")
    assert second.attempt == 2
    image = jobs.ImageRef("img1", 0, 1, f"{job.id}-0.png")
    assert not store.succeed(first, [image])  # the dead worker's claim is void
    assert store.succeed(second, [image])
    assert not store.succeed(second, [image])  # and a job finishes once
    done = store.get(job.id)
    assert done.status == jobs.SUCCEEDED and done.attempts == 2 and len(done.images) == 1


def test_a_succeeded_job_keeps_the_warnings_of_its_run(store):
    plain, warned = store.submit(params("a fox")), store.submit(params("a cat"))
    for job in (plain, warned):
        claim = store.claim("w0")
        image = jobs.ImageRef(f"img-{job.id}", 0, 1, f"{job.id}-0.png")
        said = ["prompt 'a cat' is 600 tokens; the last 88 are dropped"] if job is warned else []
        assert store.succeed(claim, [image], said)
    assert store.get(plain.id).warnings == ()
    assert store.get(warned.id).warnings == ("prompt 'a cat' is 600 tokens; the last 88 are dropped",)
    assert [j.warnings for j in store.history(limit=5, offset=0)[0]] == [store.get(warned.id).warnings, ()]


def test_a_claim_given_back_uncounted_is_void_once_another_worker_claims_it(store):
    """An uncounted release lets the next claim take the same attempt number: the claimer is what
    tells the two tickets apart, and a release for one claimer leaves another's claim alone."""
    job = store.submit(params())
    first = store.claim("w0")
    assert store.release(first.job_id, first.attempt, "its batch crashed", count_attempt=False).attempts == 0
    second = store.claim("w1")
    assert (second.attempt, second.worker) == (first.attempt, store.claimer("w1")) and first.worker != second.worker
    image = jobs.ImageRef("img1", 0, 1, f"{job.id}-0.png")
    assert not store.end(first, jobs.FAILED) and not store.succeed(first, [image])
    assert store.release(job.id, second.attempt, "w0 died", claimer=first.worker) is None
    assert store.get(job.id).status == jobs.RUNNING
    assert store.succeed(second, [image]) and store.get(job.id).status == jobs.SUCCEEDED


def test_a_job_fails_with_the_reason_after_max_attempts(store):
    job = store.submit(params())
    for _ in range(jobs.MAX_ATTEMPTS):
        claim = store.claim("w0")
        released = store.release(claim.job_id, claim.attempt, "the worker died (killed by SIGSEGV)")
    assert released.status == jobs.FAILED
    assert released.error["type"] == "worker_died"
    assert "SIGSEGV" in released.error["message"] and f"{jobs.MAX_ATTEMPTS} attempts" in released.error["message"]
    assert store.claim("w0") is None
    assert store.get(job.id).finished_at is not None


def test_shutdown_release_gives_the_attempt_back(store):
    store.submit(params())
    claim = store.claim("w0")
    job = store.release(claim.job_id, claim.attempt, "shutdown", count_attempt=False)
    assert job.status == jobs.QUEUED and job.attempts == 0


def test_recover_requeues_jobs_a_dead_server_left_running(queue):
    first = queue()
    job = first.submit(params())
    first.claim("w0")
    first.close()  # the server died with the job running
    second = queue()
    [recovered] = second.recover()
    assert recovered.id == job.id and recovered.status == jobs.QUEUED and recovered.attempts == 1
    assert second.claim("w0").attempt == 2


def test_cancel_queued_running_and_finished(store):
    store.submit(params("first"))
    running = store.submit(params("r"))
    store.claim("w0")  # takes the oldest
    claim = store.claim("w0")
    assert claim.job_id == running.id
    third = store.submit(params("t"))
    assert store.cancel(third.id).status == jobs.CANCELLED
    flagged = store.cancel(running.id)
    assert flagged.status == jobs.RUNNING and flagged.cancel_requested and store.cancel_requested(running.id)
    assert store.end(claim, jobs.CANCELLED)
    with pytest.raises(jobs.JobConflictError, match="already cancelled"):
        store.cancel(running.id)
    with pytest.raises(jobs.JobNotFoundError):
        store.cancel("nope")


def test_history_is_finished_jobs_newest_first_paged_and_searchable(queue):
    store = queue()
    ids = []
    for prompt in ("A Red Fox", "a blue whale", "RED panda", "still queued"):
        ids.append(store.submit(params(prompt)).id)
    for _ in range(3):
        claim = store.claim("w0")
        store.succeed(claim, [jobs.ImageRef(jobs.new_id(), 0, 1, f"{claim.job_id}-0.png")])
    items, total = store.history(limit=2, offset=0)
    assert total == 3 and [job_params(j.params)["prompt"] for j in items] == ["RED panda", "a blue whale"]
    items, _ = store.history(limit=2, offset=2)
    assert [job_params(j.params)["prompt"] for j in items] == ["A Red Fox"]
    items, total = store.history(limit=10, offset=0, query="red")
    assert total == 2 and {job_params(j.params)["prompt"] for j in items} == {"A Red Fox", "RED panda"}


def test_delete_removes_a_finished_job_and_its_files(queue, tmp_path):
    store = queue()
    job = store.submit(params())
    claim = store.claim("w0")
    (tmp_path / f"{job.id}-0.png").write_bytes(b"png")
    ref = jobs.ImageRef("img", 0, 1, f"{job.id}-0.png")
    store.succeed(claim, [ref])
    store.delete(job.id, tmp_path)
    assert not (tmp_path / f"{job.id}-0.png").exists()
    with pytest.raises(jobs.JobNotFoundError):
        store.get(job.id)
    with pytest.raises(jobs.JobNotFoundError):
        store.image("img")
    queued = store.submit(params())
    with pytest.raises(jobs.JobConflictError, match="queued"):
        store.delete(queued.id, tmp_path)


def test_a_job_stores_its_request_and_runs_it_as_validated(store):
    request = GenerateRequest.create("a fox", limits=LIMITS, width=64, height=48, seeds=[9, 3], variation_strength=0.2)
    job = store.submit(request)
    claim = store.claim("w0")
    assert jobs.stored_request(claim.params, LIMITS) == request  # random variation seed included
    # Trusted: a stored request is not validated again, so a tighter limit later does not refuse it.
    assert jobs.stored_request(claim.params, ModelLimits(16, 16 * 16)) == request
    view = job_params(job.params)
    assert (view["n"], view["seed"], view["seeds"], view["width"]) == (2, None, [9, 3], 64)
    assert view["variation_seed"] == request.variation_seed is not None


def _queue_plain_params(path, params: dict) -> None:
    """A job as an earlier version queued it: the plain parameter dict."""
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO jobs (id, status, params, prompt, created_at) VALUES (?, ?, ?, ?, 0)",
            ("old", jobs.QUEUED, json.dumps(params), params["prompt"]),
        )


def test_a_job_queued_by_an_earlier_version_still_runs(tmp_path):
    path = tmp_path / "j.sqlite3"
    JobStore(path).close()
    old = {"prompt": "a fox", "negative_prompt": "", "n": 2, "width": 64, "height": 64, "steps": 2,
           "guidance_scale": 0.0, "seed": 5, "seeds": None, "variation_seed": 40,
           "variation_strength": 0.5}  # fmt: skip
    _queue_plain_params(path, old)
    store = JobStore(path)
    claim = store.claim("w0")
    request = jobs.stored_request(claim.params, LIMITS)
    assert [(s.seed, s.variation_seed) for s in request.images] == [(5, 40), (5, 41)]
    assert (request.steps, request.width, request.variety_until) == (2, 64, 0.25)
    assert job_params(store.get("old").params) == old  # the view shows it as stored
    # Such a job is validated once, when it runs: against this server's limits.
    with pytest.raises(InvalidRequestError, match="above the limit of 256"):
        jobs.stored_request(claim.params, ModelLimits(16, 16 * 16))
    store.close()


def fill_the_disk(store: JobStore) -> None:
    """SQLite sees a full disk: the database may not grow by a page."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_refuses_a_submission_as_storage_and_the_store_goes_on(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    fill_the_disk(store)
    with pytest.raises(StorageError, match="disk is full") as refused:
        store.submit(params("a fox " * 600))
    assert str(store.path) in str(refused.value) and refused.value.http_status == 507
    store._db.execute("PRAGMA max_page_count = 1000000")  # space again: nothing was left half-done
    assert store.submit(params()).status == jobs.QUEUED and store.depth() == 1


def test_post_jobs_on_a_full_disk_answers_507_storage(tmp_path):
    app = in_process_app(tmp_path)
    fill_the_disk(app.state.service.store)
    r = TestClient(app, base_url="http://127.0.0.1").post("/v1/jobs", json={"prompt": "a fox " * 600, **SMALL})
    assert r.status_code == 507, r.text
    assert r.json()["error"]["type"] == "storage" and "disk is full" in r.json()["error"]["message"]


def _queue_raw(store, job_id: str, params_text: str, status: str = jobs.QUEUED) -> None:
    """A row whose stored parameters are `params_text`, as a damaged or hand-edited database holds it."""
    attempts = 1 if status == jobs.RUNNING else 0
    with store._tx() as db:
        db.execute(
            "INSERT INTO jobs (id, status, params, prompt, attempts, created_at) VALUES (?, ?, ?, 'p', ?, 0)",
            (job_id, status, params_text, attempts),
        )


UNREADABLE = {
    "not JSON": "{oops",
    "not an object": "[1, 2]",
    "a request missing its fields": json.dumps({"format": REQUEST_FORMAT, "images": []}),
    "a plain dict without a prompt": json.dumps({"n": 1}),
}


@pytest.mark.parametrize("text", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_job_whose_parameters_cannot_be_read_fails_alone_with_the_reason(queue, text):
    store = queue()
    _queue_raw(store, "bad", text)
    good = store.submit(params())
    assert store.get("bad").status == jobs.QUEUED  # readable as a row, if not as a request
    assert store.claim("w0").job_id == good.id  # the bad one is passed over, not handed out
    bad = store.get("bad")
    assert (bad.status, bad.attempts, bad.error["type"]) == (jobs.FAILED, 0, "invalid_request")
    assert "job bad" in bad.error["message"] and "cannot be read" in bad.error["message"]


def test_a_row_that_cannot_be_read_never_stops_the_server_starting(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    _queue_raw(store, "bad", "{oops", status=jobs.RUNNING)  # a server died while it ran
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET error = 'not json' WHERE id = 'bad'")
    with TestClient(
        in_process_app(tmp_path), base_url="http://127.0.0.1"
    ) as client:  # starting recovers the jobs left running
        r = client.get("/v1/jobs/bad")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "failed" and "cannot be read" in r.json()["error"]["message"]
        assert client.get("/v1/history").json()["total"] == 1


def _foreign_with_a_jobs_table(path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (name TEXT, done INTEGER)")
        db.execute("INSERT INTO jobs VALUES ('backup', 1)")
    sqlite3.connect(path).close()


def _damaged(path) -> None:
    store = JobStore(path)
    for p in "ab":
        store.submit(params(p))
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : 2 * page] = bytes(range(256)) * (page // 256)  # the jobs table's first page
    path.write_bytes(bytes(data))


DAMAGED = {
    "not a database": (lambda p: p.write_bytes(b"this is not a database\n" * 200), "not an SQLite database"),
    "a foreign database": (_foreign_with_a_jobs_table, "not a zturbo job database"),
    "zero-length": (lambda p: p.write_bytes(b""), "is empty"),
    "damaged pages": (_damaged, "damaged"),
}


@pytest.mark.parametrize(("make", "why"), DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_database_is_refused_unchanged_with_one_line_naming_it(tmp_path, make, why):
    path = tmp_path / "jobs.sqlite3"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StorageError, match=why) as refused:
        JobStore(path)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message and f"mv {path} {path}.damaged" in message
    assert path.read_bytes() == before  # nothing written before the refusal
    for name in ("", "-wal", "-shm"):  # the way out the message gives
        if (tmp_path / f"jobs.sqlite3{name}").exists():
            (tmp_path / f"jobs.sqlite3{name}").rename(tmp_path / f"jobs.sqlite3.damaged{name}")
    store = JobStore(path)
    assert store.depth() == 0
    store.close()


def test_serve_refuses_a_damaged_database_with_one_line(capsys, tiny_dir, tmp_path):
    (tmp_path / "jobs.sqlite3").write_bytes(b"garbage" * 100)
    assert cli_main(["serve", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-ui"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("zturbo: error: ") and str(tmp_path / "jobs.sqlite3") in last and "Traceback" not in err


def test_the_startup_check_leaves_a_database_and_its_log_unchanged(tmp_path):
    import hashlib
    import shutil
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    store = jobs.JobStore(path)
    store.submit(GenerateRequest.create("a fox", limits=LIMITS, width=64, height=64, seed=1))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):  # as a crash leaves them
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, copy / name)
    store.close()
    # The data and its log; the -shm file is only SQLite's index of the log, rebuilt by any reader.
    data = [copy / "jobs.sqlite3", copy / "jobs.sqlite3-wal"]
    assert data[1].stat().st_size > 0
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in data]
    jobs.check_database(copy / "jobs.sqlite3")
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in data if f.exists()] == before
    with sqlite3.connect(copy / "jobs.sqlite3") as db:  # the job in the log is still there
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_a_database_from_before_lora_sets_is_upgraded_and_its_jobs_run(tmp_path):
    """A queue made before the `lora_set` column: opened, it gains the column, and its waiting jobs
    (which had no LoRAs) run with the base weights' key."""
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(jobs.SCHEMA.replace("    lora_set TEXT NOT NULL DEFAULT '',\n", ""))
        request = params("from before")
        db.execute(
            "INSERT INTO jobs (id, status, params, prompt, created_at) VALUES (?, ?, ?, ?, 0)",
            ("old", jobs.QUEUED, json.dumps(request.to_dict()), "from before"),
        )
    db.close()
    jobs.check_database(path)  # the missing column is an upgrade, not a foreign database
    store = JobStore(path)
    with sqlite3.connect(path) as db:
        assert "lora_set" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    claim = store.claim("w0", prefer=jobs.lora_set_key(params("x")))
    assert (claim.job_id, claim.lora_set) == ("old", jobs.NO_LORAS)
    assert job_params(store.get("old").params)["loras"] == []
    store.close()
    JobStore(path).close()  # an upgraded database opens as it is


def test_a_job_stores_its_lora_set_and_shows_its_loras(store):
    request = GenerateRequest.create(
        "a fox", limits=LIMITS, width=64, height=64, seed=1, loras=[{"name": "a.safetensors", "weight": 0.5}, "b"]
    )
    job = store.submit(request)
    assert job_params(job.params)["loras"] == [{"name": "a.safetensors", "weight": 0.5}, {"name": "b", "weight": 1.0}]
    claim = store.claim("w0")
    assert claim.lora_set == jobs.lora_set_key(request) != jobs.NO_LORAS
    assert jobs.stored_request(claim.params, LIMITS).loras == request.loras
    assert jobs.lora_set_key(params()) == jobs.NO_LORAS


def test_a_batch_takes_compatible_jobs_in_queue_order_up_to_its_images(queue):
    store = queue()
    first = store.submit(params("a"))
    other = store.submit(GenerateRequest.create("b", limits=LIMITS, width=64, height=64, steps=3, seed=1))
    pair = store.submit(GenerateRequest.create("c", limits=LIMITS, width=64, height=64, steps=2, seed=1, batch=2))
    big = store.submit(GenerateRequest.create("d", limits=LIMITS, width=64, height=64, steps=2, seed=1, batch=3))
    last = store.submit(params("e"))
    claims = store.claim_batch("w0", jobs.NO_LORAS, 4)
    # `big` does not fit the 1 image left, and `last` does not overtake it; `other` has another step count.
    assert [(c.job_id, c.images) for c in claims] == [(first.id, 1), (pair.id, 2)]
    assert all(store.get(c.job_id).status == jobs.RUNNING and c.attempt == 1 for c in claims)
    assert [store.get(j.id).status for j in (other, big, last)] == [jobs.QUEUED] * 3
    # The oldest waiting job goes first whatever its size; a job larger than a batch still runs.
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 2)] == [other.id]
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 2)] == [big.id]


def test_a_batch_holds_at_most_its_pixel_budget_so_small_images_batch_deeper(queue):
    store = queue()

    def submit(size: int, n: int, batch: int = 1) -> list[str]:
        made = [GenerateRequest.create(f"p{i}", limits=LIMITS, width=size, height=size, seed=i, batch=batch)
                for i in range(n)]  # fmt: skip
        return [store.submit(r).id for r in made]

    small, large = submit(32, 5), submit(64, 3)
    # 4 x 32² pixels: four 32² images, one 64²; --max-batch (8 here) is not reached.
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 8, max_pixels=4 * 32 * 32)] == small[:4]
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 8, max_pixels=4 * 32 * 32)] == small[4:]
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 8, max_pixels=4 * 32 * 32)] == large[:1]
    # The image count still bounds it, and a job larger than the budget runs alone rather than never.
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 1, max_pixels=10**9)] == large[1:2]
    [huge] = submit(64, 1, batch=3)
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 8, max_pixels=32 * 32)] == large[2:]
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 8, max_pixels=32 * 32)] == [huge]
    assert jobs.pixel_room({"width": 512, "height": 512}, 4 * 1024 * 1024) == 16
    assert jobs.pixel_room({"width": 768, "height": 768}, 4 * 1024 * 1024) == 7
    assert jobs.pixel_room({"width": 2048, "height": 2048}, 4 * 1024 * 1024) == 1
    assert jobs.pixel_room({"width": 512, "height": 512}, None) > 10**6


def test_a_job_from_before_batching_runs_alone_and_keeps_its_preview_flag(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        schema = jobs.SCHEMA
        for column in ("batch_key", "image_count", "preview", "warnings"):
            schema = re.sub(rf"    {column} [^\n]*\n", "", schema)
        db.executescript(schema)
        for job_id in ("old-a", "old-b"):
            db.execute(
                "INSERT INTO jobs (id, status, params, prompt, created_at) VALUES (?, ?, ?, ?, 0)",
                (job_id, jobs.QUEUED, json.dumps(params().to_dict()), "a fox"),
            )
    db.close()
    jobs.check_database(path)
    store = JobStore(path)
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 4)] == ["old-a"]  # no key: alone
    new = store.submit(params(), preview=True)
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 4)] == ["old-b"]
    [claim] = store.claim_batch("w0", jobs.NO_LORAS, 4)
    assert claim.job_id == new.id and claim.preview and store.get(new.id).preview
    assert store.succeed(claim, [jobs.ImageRef("img", 0, 1, "x.png")], ["a warning"])
    assert store.get(new.id).warnings == ("a warning",) and store.get("old-a").warnings == ()
    store.close()


def test_a_solo_release_runs_the_job_alone_from_then_on(store):
    *_, c = (store.submit(params(p)) for p in ("a fox", "a cat", "a heron"))
    claims = store.claim_batch("w", jobs.NO_LORAS, 4)
    assert len(claims) == 3
    for claim in claims:
        job = store.release(
            claim.job_id, claim.attempt, "its batch crashed", count_attempt=False, solo=claim != claims[2]
        )
        assert (job.status, job.attempts) == (jobs.QUEUED, 0)
    assert [len(store.claim_batch("w", jobs.NO_LORAS, 4)) for _ in range(2)] == [1, 1]  # a, b alone ...
    assert [x.job_id for x in store.claim_batch("w", jobs.NO_LORAS, 4)] == [c.id]  # ... and c, now the only one


def test_cancels_are_read_for_a_whole_batch_at_once(store):
    ids = [store.submit(params(p)).id for p in ("a fox", "a cat", "a heron")]
    for _ in ids:
        store.claim("w")
    store.cancel(ids[1])
    assert store.cancels_requested(ids) == {ids[1]} and store.cancels_requested([]) == set()


def test_a_batch_asks_for_no_more_images_than_the_workers_room_for_its_key(queue):
    store = queue()
    queued = [store.submit(params(p)) for p in ("a", "b", "c", "d")]
    other = GenerateRequest.create("e", limits=LIMITS, width=64, height=64, steps=3, seed=1)
    key = jobs.batch_key(params())
    rooms = {key: 2, jobs.batch_key(other): 1}
    claims = store.claim_batch("w0", jobs.NO_LORAS, 4, rooms)
    assert [c.job_id for c in claims] == [j.id for j in queued[:2]]  # 2 of the 4 that fit --max-batch
    assert {c.batch_key for c in claims} == {key}
    assert [c.job_id for c in store.claim_batch("w0", jobs.NO_LORAS, 4, {"another key": 1})] == [
        j.id for j in queued[2:]
    ]
    big = store.submit(GenerateRequest.create("f", limits=LIMITS, width=64, height=64, steps=2, seed=1, batch=3))
    store.submit(params("g"))
    [alone] = store.claim_batch("w0", jobs.NO_LORAS, 4, rooms)  # the first job is taken whatever its size
    assert alone.job_id == big.id and alone.images == 3


def test_a_shared_store_leaves_a_live_nodes_jobs_and_takes_back_a_lost_ones(postgres_db, tmp_path):
    """Servers sharing a PostgreSQL queue: one's startup recovery or heartbeat never takes the running
    jobs of another that renews its lease; once that one stops, its jobs are queued again (the
    attempt counted) and its claims can no longer finish them."""
    lease = 0.5
    a, b = (open_store(postgres_db, tmp_path, lease_s=lease) for _ in range(2))
    a.heartbeat()
    job = a.submit(params())
    claim = a.claim("worker-0")
    assert a.get(job.id).worker == f"{a.node}/worker-0" and a.node != b.node
    assert b.recover() == [] and b.heartbeat() == []  # a is alive: its job stays its own
    assert b.get(job.id).status == jobs.RUNNING
    deadline = time.monotonic() + 30
    while not (taken := b.heartbeat()) and time.monotonic() < deadline:  # a beats no more
        time.sleep(lease / 5)
    assert [(j.id, j.status, j.attempts) for j in taken] == [(job.id, jobs.QUEUED, 1)]
    assert not a.succeed(claim, [jobs.ImageRef("img", 0, 1, f"{job.id}-0.png")])  # its ticket is void
    again = b.claim("worker-0")
    assert (again.job_id, again.attempt) == (job.id, 2)
    assert b.succeed(again, [jobs.ImageRef("img", 0, 1, f"{job.id}-0.png")])
    a.close()
    b.close()


def test_a_server_with_a_shorter_lease_never_takes_a_live_servers_job(postgres_db, tmp_path):
    """Each node is judged by the lease it declared: a server on a 2 s lease leaves the job of one on
    a 30 s lease that last renewed 2.5 s ago."""
    long, short = open_store(postgres_db, tmp_path, lease_s=30), open_store(postgres_db, tmp_path, lease_s=2)
    long.heartbeat()
    job = long.submit(params())
    long.claim("worker-0")
    time.sleep(2.5)
    assert short.heartbeat() == [] and short.recover() == []
    assert (short.get(job.id).status, short.get(job.id).attempts) == (jobs.RUNNING, 1)
    left = short._db.execute("SELECT expires_at - seen_at FROM nodes WHERE name = ?", (long.node,)).fetchone()
    assert left is not None and left[0] == pytest.approx(30, abs=1)  # not pruned by the short lease either
    long.close()
    short.close()


def test_a_node_that_renews_its_lease_while_its_job_is_being_taken_keeps_it(postgres_db, tmp_path, monkeypatch):
    """`recover` reads the lost jobs, then releases each: a lease renewed in between is seen under
    the row's lock, and the job stays its node's."""
    a, b = (open_store(postgres_db, tmp_path, lease_s=0.5) for _ in range(2))
    a.heartbeat()
    job = a.submit(params())
    claim = a.claim("worker-0")
    time.sleep(0.7)  # a's lease ran out
    orphans = b._orphans

    def renewed_meanwhile(db):
        found = orphans(db)
        a._beat_at = 0.0
        a.heartbeat()
        return found

    monkeypatch.setattr(b, "_orphans", renewed_meanwhile)
    assert b.recover() == []
    assert (b.get(job.id).status, b.get(job.id).attempts) == (jobs.RUNNING, 1)
    assert a.succeed(claim, [jobs.ImageRef("img", 0, 1, f"{job.id}-0.png")])  # its ticket still holds
    a.close()
    b.close()


def test_a_statement_blocked_by_a_lock_fails_with_one_line_within_the_lock_timeout(postgres_db, tmp_path):
    import psycopg

    from zturbo.serving import pgstore

    store = open_store(postgres_db, tmp_path)
    settings = {name: store._db.execute(f"SHOW {name}").fetchone()[0] for name in pgstore.SESSION_LIMITS_MS}
    assert settings == {"statement_timeout": "15s", "lock_timeout": "5s", "idle_in_transaction_session_timeout": "1min"}
    assert store._db._conn.info.get_parameters()["tcp_user_timeout"] == str(pgstore.TCP_USER_TIMEOUT_MS)
    store.close()
    # The same store with the URL's own, shorter lock timeout (which wins: the next test): the
    # submission waits on the lock twice (it reads back after a failed write), 1 s here, not 10.
    store = open_store(f"{postgres_db}?options=-c%20lock_timeout%3D500", tmp_path)
    outcome: list[BaseException] = []

    def submit() -> None:
        try:
            store.submit(params())
        except StorageError as e:
            outcome.append(e)

    with psycopg.connect(postgres_db) as admin:  # a session holding the table, as a stuck migration would
        admin.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        submitting = threading.Thread(target=submit)
        submitting.start()
        submitting.join(0.5 + 10)
        assert not submitting.is_alive(), "the submission hangs on the lock"
    message = str(outcome[0])
    assert message.startswith("cannot write the job store postgresql://") and "lock timeout" in message
    assert "\n" not in message
    store.close()


def test_a_store_urls_own_session_settings_win(postgres_db, tmp_path):
    store = open_store(f"{postgres_db}?options=-c%20lock_timeout%3D200&keepalives_idle=30", tmp_path)
    assert store._db.execute("SHOW lock_timeout").fetchone()[0] == "200ms"
    assert store._db.execute("SHOW statement_timeout").fetchone()[0] == "15s"
    assert store._db._conn.info.get_parameters()["keepalives_idle"] == "30"
    store.close()


def test_an_ambiguous_commit_answers_the_stored_job_and_makes_no_second_one(queue, monkeypatch):
    """A connection lost at COMMIT leaves the outcome unknown: the row is read again, and a stored
    job is answered as stored (a client retrying a failure would queue it twice)."""
    from contextlib import contextmanager

    store = queue()
    real_tx = store._tx

    @contextmanager
    def lost_after(commit: bool):
        if not commit:
            raise StorageError("cannot write the job store: server closed the connection unexpectedly")
        with real_tx() as db:
            yield db
        raise StorageError("cannot write the job store: server closed the connection unexpectedly")

    monkeypatch.setattr(store, "_tx", lambda: lost_after(True))
    job = store.submit(params())
    assert job.status == jobs.QUEUED and store.counts()[jobs.QUEUED] == 1
    monkeypatch.setattr(store, "_tx", lambda: lost_after(False))
    with pytest.raises(StorageError, match="closed the connection"):
        store.submit(params())
    assert store.counts()[jobs.QUEUED] == 1


def test_an_earlier_zturbos_postgres_tables_are_upgraded_in_place(postgres_db, tmp_path):
    """Tables made before the batching columns and the nodes' own expiry get them, their rows kept."""
    import psycopg

    with psycopg.connect(postgres_db, autocommit=True) as db:
        db.execute(
            "CREATE TABLE jobs (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
            "status TEXT NOT NULL, params TEXT NOT NULL, prompt TEXT NOT NULL, client TEXT, attempts INTEGER NOT "
            "NULL DEFAULT 0, worker TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, created_at "
            "DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION)"
        )
        db.execute("CREATE TABLE nodes (name TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL)")
        old = json.dumps({"prompt": "a fox", "n": 1, "width": 64, "height": 64, "steps": 2, "seed": 1})
        db.execute("INSERT INTO jobs (id, status, params, prompt, created_at) VALUES ('old', 'queued', %s, 'a fox', 1)",
                   (old,))  # fmt: skip
    store = open_store(postgres_db, tmp_path, lease_s=1)
    store.heartbeat()
    claim = store.claim("w0")
    assert (claim.job_id, claim.batch_key, claim.images) == ("old", jobs.NO_BATCH, 1)
    assert store._db.execute("SELECT expires_at > seen_at FROM nodes").fetchone()[0]
    store.close()


def test_a_shared_store_sweeps_stray_input_files_at_its_heartbeats(postgres_db, tmp_path):
    """A refused submission's input files outlive it by `keep_s` (another machine may be committing a
    job that uses them): the running server removes them later, not only at its next start."""
    store = open_store(postgres_db, tmp_path, lease_s=0.3)
    store.inputs.keep_s = 0.2
    stray = store.inputs.path("ab" * 32)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"an upload whose job was refused")
    os.utime(stray, (time.time() - 1, time.time() - 1))
    time.sleep(0.3)
    store.heartbeat()
    assert not stray.exists()
    store.close()


def test_a_lost_connection_is_a_storage_error_naming_the_server_and_the_next_call_reconnects(postgres_db, tmp_path):
    import psycopg

    store = open_store(postgres_db, tmp_path)
    job = store.submit(params())
    with psycopg.connect(postgres_db, autocommit=True) as admin:  # as a server restart or failover does
        pid = store._db.execute("SELECT pg_backend_pid()").fetchone()[0]
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StorageError, match="cannot read the job store postgresql://") as lost:
        store.get(job.id)
    assert lost.value.http_status == 507 and "\n" not in str(lost.value)
    assert store.get(job.id).status == jobs.QUEUED and store.claim("w0").job_id == job.id
    store.close()


def test_a_store_url_password_never_shows(tmp_path):
    from zturbo.serving.pgstore import redact

    assert redact("postgresql://zt:s3cret@db:5432/q?sslmode=require") == "postgresql://zt:***@db:5432/q?sslmode=require"
    assert redact("postgresql://zt@db/q") == "postgresql://zt@db/q"
    assert (
        redact("postgresql://zt@db/q?sslmode=require&PassWord=s3cret")
        == "postgresql://zt@db/q?sslmode=require&PassWord=***"
    )
    assert redact("postgresql://db/q?password=s3cret") == "postgresql://db/q?password=***"
    with pytest.raises(InvalidRequestError, match=r"--store 'sqlite:///x' is not a job store.*postgresql://"):
        open_store("sqlite:///x", tmp_path)


def test_sqlite_reads_after_close_are_refused_and_leave_no_connection_open(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.submit(params())
    with store._read() as in_flight:  # a read under way while the server closes the store
        store.get(job.id)  # a second reader, pooled when it ends
        store.close()
    assert store._idle_readers == []
    with pytest.raises(sqlite3.ProgrammingError):
        in_flight.execute("SELECT 1")  # closed when its read ended, not put back
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.get(job.id)


def _one_job_no_idle_reader(tmp_path):
    """A SQLite store holding one job, whose next read opens a connection of its own."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job = store.submit(params())
    while store._idle_readers:
        store._idle_readers.pop().close()
    return path, store, job


def test_a_database_moved_away_under_the_server_is_not_made_again_empty(tmp_path):
    # A new read connection must not create an empty jobs.sqlite3 where the file was, which the
    # next start would then refuse as empty (its jobs lost).
    path, store, job = _one_job_no_idle_reader(tmp_path)
    path.rename(tmp_path / "moved.sqlite3")
    with pytest.raises(StorageError, match="cannot be opened"):
        store.get(job.id)
    assert not path.exists()
    store.close()


def test_a_sqlite_read_of_a_damaged_file_is_a_storage_error_naming_it(tmp_path):
    path, store, job = _one_job_no_idle_reader(tmp_path)
    path.write_bytes(b"not a database at all " * 512)
    with pytest.raises(StorageError, match=rf"cannot read the job database {re.escape(str(path))}: the file is"):
        store.get(job.id)
