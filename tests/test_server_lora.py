"""LoRAs through `zturbo serve`: jobs name files of --lora-dir, checked at submit; the worker's pixels
equal the engine's in process; the listing, the metrics, and the scheduler's preference for the LoRA
set a worker ran last.

One live server (module scope) on the tiny model serves the HTTP tests; the scheduling tests use the
job store alone, with a fake clock.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from loras import write_flux_lora, write_lora
from serving import SMALL, Server
from zturbo.imageio import METADATA_KEY
from zturbo.request import GenerateRequest, ModelLimits
from zturbo.serving import jobs

A, B = "style_a.safetensors", "sub/style_b.safetensors"
FLUX = "flux.safetensors"
JOB = {"prompt": "a red fox", **SMALL, "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def lora_dir(engine, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("server-loras")
    write_lora(directory / A, "peft", engine.components.transformer, seed=1)
    write_lora(directory / B, "kohya", engine.components.transformer, seed=2)
    write_flux_lora(directory / FLUX)
    return directory


@pytest.fixture(scope="module")
def server(tiny_dir, lora_dir, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve-lora")
    s = Server(tiny_dir, root / "data", "--lora-dir", str(lora_dir), "--max-pixels", str(64 * 64), "--no-ui")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def base_engine(engine) -> Iterator:
    """The session's engine, its base weights back afterwards for the tests that share it."""
    yield engine
    if engine.merger is not None:
        engine.merger.restore()


def png(server: Server, image_id: str) -> tuple[dict, bytes]:
    r = server.client.get(f"/v1/images/{image_id}")
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(r.content)) as im:
        return json.loads(im.text[METADATA_KEY]), im.convert("RGB").tobytes()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_lora_set_makes_the_pixels_of_the_engine_in_process(server, base_engine, lora_dir):
    sets = [
        [],
        [{"name": A, "weight": 0.8}],
        [{"name": A, "weight": 0.8}, {"name": B, "weight": -0.5}],
        [],  # back to the base weights
    ]
    submitted = [server.submit(**JOB, loras=loras) for loras in sets]
    done = [server.wait_job(job["id"]) for job in submitted]
    assert [job["status"] for job in done] == ["succeeded"] * len(sets)
    assert [job["params"]["loras"] for job in done] == sets  # the job view shows the request's LoRAs
    pixels = []
    for loras, job in zip(sets, done, strict=True):
        meta, served = png(server, job["images"][0]["id"])
        assert meta["loras"] == [{**ref, "sha256": sha256(lora_dir / ref["name"])} for ref in loras]
        # The CLI's path: the same request straight to an engine (LoRAs by path: it allows them).
        paths = [(str(lora_dir / ref["name"]), ref["weight"]) for ref in loras]
        request = GenerateRequest.create(
            JOB["prompt"], limits=base_engine.limits, **SMALL, steps=2, seed=7, loras=paths
        )
        [image] = base_engine.generate(request).images
        assert served == image.image.convert("RGB").tobytes(), f"LoRAs {loras}"
        pixels.append(served)
    assert len(set(pixels[:3])) == 3 and pixels[3] == pixels[0]  # each set shows; the base comes back exactly

    metrics = server.client.get("/metrics").text
    value = {name: float(v) for name, v in re.findall(r'^(zturbo_lora_\w+)\{worker="worker-0"\} (\S+)$', metrics, re.M)}
    assert value["zturbo_lora_switches_total"] == 3  # base -> A -> A+B -> base
    assert value["zturbo_lora_switch_seconds_total"] > 0
    assert value["zturbo_lora_cache_misses_total"] == 2 and value["zturbo_lora_cache_hits_total"] == 1
    assert value["zturbo_lora_backup_bytes"] > 0 and value["zturbo_lora_cache_bytes"] > 0


NAMES = [
    ("../x", "it holds a '..' component"),
    ("/abs/path", "it is an absolute path"),
    ("sub/../../x", "it holds a '..' component"),
    ("sub\\..\\x", "it holds a backslash"),
    ("missing", f"no LoRA named 'missing' in the LoRA directory; available: {FLUX}, {A}, {B}"),
]


def submitted(server: Server) -> float:
    """How many jobs the server has accepted so far."""
    return float(re.search(r"^zturbo_jobs_submitted_total (\S+)$", server.client.get("/metrics").text, re.M)[1])


@pytest.mark.parametrize(("name", "problem"), NAMES, ids=[n for n, _ in NAMES])
def test_a_lora_name_outside_the_directory_or_missing_is_400_naming_it(server, name, problem):
    before = submitted(server)
    native = server.client.post("/v1/jobs", json={**JOB, "loras": [{"name": A}, {"name": name, "weight": 0.5}]})
    body = {"prompt": "a fox", "size": "64x64", "loras": [{"name": name}]}
    openai = server.client.post("/v1/images/generations", json=body)
    for r, index in ((native, 1), (openai, 0)):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["field"]) == ("invalid_lora", f"loras.{index}")
        assert problem in error["message"] and repr(name) in error["message"]
    assert submitted(server) == before  # nothing was queued


def test_a_lora_for_another_model_is_400_at_submit(server):
    before = submitted(server)
    r = server.client.post("/v1/jobs", json={**JOB, "loras": [{"name": FLUX}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_lora" and error["field"] == "loras.0"
    assert (
        "looks like a LoRA for FLUX.1" in error["message"]
        and "zturbo applies Z-Image-Turbo LoRAs only" in error["message"]
    )
    assert submitted(server) == before  # refused before the queue: no job to fail later


def test_the_list_route_shows_the_directory_with_hashes_and_what_each_file_is(server, lora_dir):
    items = {item["name"]: item for item in server.client.get("/v1/loras").json()["items"]}
    assert sorted(items) == [FLUX, A, B]
    for name, item in items.items():
        digest = sha256(lora_dir / name)
        assert (item["sha256"], item["short_hash"], item["size"]) == (
            digest,
            digest[:10],
            (lora_dir / name).stat().st_size,
        )
    assert items[A]["usable"] and items[A]["summary"]["ranks"] == [4] and items[A]["error"] is None
    assert items[B]["summary"]["format"] == "kohya" and set(items[B]["summary"]["modules"]) == {
        "attention",
        "feed_forward",
    }
    assert not items[FLUX]["usable"] and items[FLUX]["summary"] is None and "FLUX.1" in items[FLUX]["error"]
    assert server.client.get("/v1/loras", headers={"Authorization": ""}).status_code == 401


class Parsed:
    """What `LoraLibrary.load` gives, as far as the server's check reads it."""

    def summary(self) -> dict:
        return {"format": "test"}


@pytest.mark.parametrize("value", ["inf", "nan", "-1.5"])
def test_a_lora_cache_that_is_not_a_finite_size_is_refused(value):
    from zturbo.cli import build_parser
    from zturbo.errors import InvalidRequestError
    from zturbo.serving import serve

    args = build_parser().parse_args(["serve", "--lora-cache", value])
    with pytest.raises(InvalidRequestError, match=f"--lora-cache {value} must be 0 or more GiB"):
        serve._check_numbers(args)
    serve._check_numbers(build_parser().parse_args(["serve", "--lora-cache", "0.5"]))


def test_one_file_under_two_names_is_refused(tmp_path, monkeypatch):
    """`a`, `a.safetensors`, `./a` and a link to it are one file: twice in a list, its weights would add
    up past the weight limit."""
    from zturbo.request import LoraRef
    from zturbo.serving.loras import LoraFieldError, ServerLoras

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"b")
    (tmp_path / "alias.safetensors").symlink_to(tmp_path / "a.safetensors")
    loras = ServerLoras(tmp_path, lambda: {})
    monkeypatch.setattr(loras.library, "load", lambda file, targets: Parsed())
    loras.check([LoraRef("a", 10.0), LoraRef("sub/b", 10.0)])  # two files
    for alias in ("a.safetensors", "./a", "alias"):
        with pytest.raises(LoraFieldError) as err:
            loras.check([LoraRef("sub/b", 1.0), LoraRef("a", 10.0), LoraRef(alias, 10.0)])
        assert err.value.field == "loras.2"
        assert f"LoRA {alias!r} is the file loras.1 ('a') names" in str(err.value)


def test_concurrent_listings_hash_and_parse_each_new_file_once_and_one_at_a_time(tmp_path, monkeypatch):
    """A parse holds a whole file in memory: listings at once (each web UI page load lists) must not
    each hash and parse every new file side by side."""
    from zturbo.adapters import library
    from zturbo.serving.loras import ServerLoras

    hashed = []

    def slow_sha256(path: Path) -> str:
        hashed.append(path.name)
        time.sleep(0.05)
        return sha256(path)

    monkeypatch.setattr(library, "sha256_file", slow_sha256)
    for i in range(3):
        (tmp_path / f"l{i}.safetensors").write_bytes(f"file {i}".encode())
    loras = ServerLoras(tmp_path, lambda: {})
    lock, active, most, parsed = threading.Lock(), [0], [0], []

    def load(file, targets):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            parsed.append(file.name)
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return Parsed()

    monkeypatch.setattr(loras.library, "load", load)
    threads = [threading.Thread(target=loras.listing) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = ["l0.safetensors", "l1.safetensors", "l2.safetensors"]
    assert sorted(hashed) == names and sorted(parsed) == names and most[0] == 1
    assert [item["summary"] for item in loras.listing()] == [{"format": "test"}] * 3


# --- scheduling: the store's claim with a fake clock ---------------------------------------------------

LIMITS = ModelLimits(spatial_unit=16, max_pixels=64 * 64)


def key(lora: str) -> str:
    """The LoRA set key of a job with this one LoRA at weight 1."""
    return jobs.lora_set_key(GenerateRequest.create("a fox", limits=LIMITS, **SMALL, loras=lora))


def queue(store: jobs.JobStore, clock: list[float], monkeypatch, jobs_at: list[tuple[float, str | None]]) -> list[str]:
    """Submit one job per (time, LoRA name or None), the clock set to each time; their ids."""
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])
    ids = []
    for at, lora in jobs_at:
        clock[0] = at
        loras = [(lora, 1.0)] if lora else None
        ids.append(store.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL, seed=1, loras=loras)).id)
    return ids


def claims(store: jobs.JobStore, prefer: str, n: int) -> list[str]:
    """`n` claims by one worker, each preferring the set of the job it ran before."""
    out = []
    for _ in range(n):
        claim = store.claim("w0", prefer=prefer)
        assert claim is not None
        out.append(claim.job_id)
        prefer = claim.lora_set
    return out


def test_a_worker_takes_a_job_of_its_last_set_ahead_of_older_ones_within_the_window(tmp_path, monkeypatch):
    store = jobs.JobStore(tmp_path / "jobs.sqlite3")
    clock = [0.0]
    x1, y1, x2, base, x3 = queue(store, clock, monkeypatch, [(0, "x"), (1, "y"), (2, "x"), (3, None), (40, "x")])
    clock[0] = 100.0  # how long the jobs have waited does not matter; when they were queued does
    # x1 (its set), x2 (queued 1 s after y1, the oldest then), then y1: x3 came 39 s after y1.
    assert claims(store, key("x"), 3) == [x1, x2, y1]
    assert claims(store, jobs.NO_LORAS, 2) == [base, x3]  # after y1, none of y waits: oldest first
    store.close()


def test_an_old_job_of_another_set_is_not_starved_by_a_stream_of_same_set_jobs(tmp_path, monkeypatch):
    store = jobs.JobStore(tmp_path / "jobs.sqlite3", max_queued=200)
    clock = [0.0]
    old, *stream = queue(store, clock, monkeypatch, [(0, "y"), *((t, "x") for t in range(1, 121))])
    order = claims(store, key("x"), 31)
    # Only the jobs queued within SAME_SET_WINDOW_S of the old one go first; then the old one.
    within = int(jobs.SAME_SET_WINDOW_S)
    assert order == [*stream[:within], old]
    assert claims(store, key("y"), 1) == [stream[within]]
    store.close()


def test_without_a_waiting_job_of_its_set_a_worker_takes_the_oldest(tmp_path, monkeypatch):
    store = jobs.JobStore(tmp_path / "jobs.sqlite3")
    ids = queue(store, [0.0], monkeypatch, [(0, "y"), (1, None), (2, "z")])
    assert [store.claim("w0", prefer=key("x")).job_id for _ in ids] == ids
    assert store.claim("w0", prefer=key("x")) is None
    store.close()
