"""`zturbo serve` end to end: a real server process with real worker processes on the tiny model.

One server (module scope) serves the API tests; the crash tests run servers of their own.
ZTURBO_TEST_STEP_SLEEP (a test hook) slows each denoising step so that kills and cancels land mid-job.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from serving import AUTH, KEY, SMALL, Server
from zturbo.cli import main as cli_main
from zturbo.imageio import METADATA_KEY
from zturbo.serving.ui import status_text


def sse_events(client: httpx.Client, job_id: str, on_event=None) -> list[tuple[str, dict]]:
    """Read a job's event stream to its end."""
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if on_event is not None:
                    on_event(*events[-1])
    return events


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    s = Server(tiny_dir, root / "data", "--queue-size", "20", "--max-pixels", str(128 * 128), step_sleep=0.2)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


# --- the OpenAI-compatible API ------------------------------------------------------------------


def test_openai_client_generates_b64_json_and_url(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.generate(
        model="z-image-turbo", prompt="a red fox in snow", n=2, size="64x48", response_format="b64_json",
        extra_body={"seed": 7, "steps": 2},
    )  # fmt: skip
    assert len(result.data) == 2
    seeds = []
    for item in result.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as im:
            assert im.size == (64, 48)
            meta = json.loads(im.text[METADATA_KEY])
            seeds.append(meta["seed"])
            assert (meta["prompt"], meta["steps"]) == ("a red fox in snow", 2)
    assert seeds == [7, 8]

    result = client.images.generate(prompt="a red fox in snow", size="64x64", response_format="url",
                                    extra_body={"seed": 7, "steps": 2})  # fmt: skip
    [item] = result.data
    assert item.url.startswith(f"{server.url}/v1/images/")
    r = httpx.get(item.url)  # a signed URL: no key needed
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert json.loads(im.text[METADATA_KEY])["seed"] == 7
    tampered = item.url.replace("sig=", "sig=0")
    assert httpx.get(tampered).status_code == 401


def test_openai_client_sees_errors_as_api_errors(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a fox", size="1000x1000")
    assert info.value.body["field"] == "size"
    assert "1000 is not a multiple of 16" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="dall-e-3"):
        client.images.generate(prompt="a fox", model="dall-e-3", size="64x64")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="a fox")


# --- the native job API ---------------------------------------------------------------------------


def test_a_prompt_past_the_token_limit_runs_and_its_job_says_what_was_dropped(server):
    # diffusers' semantics (the text encoder reads 512 tokens) with nothing silent: the job, and the
    # OpenAI answer, carry the warning the CLI prints.
    long = "red fox " * 450  # about 900 tokens, under the 4000-character limit
    done = server.wait_job(server.submit(prompt=long, steps=1, seed=3)["id"])
    assert done["status"] == "succeeded"
    [warning] = done["warnings"]
    assert warning.startswith("prompt 'red fox") and "the model takes 512" in warning and "dropped" in warning
    plain = server.wait_job(server.submit(prompt="a red fox", steps=1, seed=3)["id"])
    assert plain["warnings"] == []
    r = server.client.post("/v1/images/generations", json={"prompt": long, "size": "64x64", "steps": 1})
    assert r.status_code == 200 and r.json()["zturbo"]["warnings"] == [warning]


def test_native_job_round_trip_with_sse_progress(server):
    job = server.submit(prompt="a lighthouse at dusk", n=2, steps=3, seed=11)
    assert job["status"] == "queued" and job["params"]["seed"] == 11 and job["attempts"] == 0
    events = sse_events(server.client, job["id"])
    names = [n for n, _ in events]
    assert names[-1] == "done"
    progress = [d for n, d in events if n == "progress"]
    assert progress and progress[-1] == {"step": 3, "steps": 3}
    assert all(d["steps"] == 3 and 1 <= d["step"] <= 3 for d in progress)
    done = events[-1][1]
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert [im["seed"] for im in done["images"]] == [11, 12]
    r = server.client.get(done["images"][1]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert json.loads(im.text[METADATA_KEY])["seed"] == 12
    # A client that connects after the end gets the final event at once.
    assert sse_events(server.client, job["id"]) == [("done", server.client.get(f"/v1/jobs/{job['id']}").json())]
    # History has it, newest first, searchable by prompt.
    history = server.client.get("/v1/history", params={"q": "LIGHTHOUSE"}).json()
    assert history["total"] == 1 and history["items"][0]["id"] == job["id"]


def _png(server, image: dict) -> tuple[dict, bytes]:
    r = server.client.get(image["url"])
    assert r.status_code == 200
    with Image.open(io.BytesIO(r.content)) as im:
        return json.loads(im.text[METADATA_KEY]), im.convert("RGB").tobytes()


EXPLORE = {"seed": 5, "n": 2, "variation_seed": 40, "variation_strength": 0.5, "variety": 0.6, "variety_until": 0.5}


def test_exploration_options_round_trip_into_the_pngs_and_repeat_exactly(server):
    first, again, plain = (server.submit(**body) for body in (EXPLORE, EXPLORE, {"seed": 5, "n": 2}))
    first, again, plain = (server.wait_job(job["id"]) for job in (first, again, plain))
    assert first["status"] == again["status"] == plain["status"] == "succeeded"
    assert {k: first["params"][k] for k in EXPLORE} == EXPLORE  # stored and shown as given
    # A1111's convention: with a variation strength the seed stays and the variation seed counts up.
    assert [(im["seed"], im["variation_seed"]) for im in first["images"]] == [(5, 40), (5, 41)]
    pngs = [[_png(server, im) for im in job["images"]] for job in (first, again, plain)]
    for k, (meta, _) in enumerate(pngs[0]):
        assert (meta["seed"], meta["variation_seed"], meta["variation_strength"]) == (5, 40 + k, 0.5)
        assert (meta["variety"], meta["variety_until"]) == (0.6, 0.5)
    assert [pixels for _, pixels in pngs[0]] == [pixels for _, pixels in pngs[1]]  # same params, same pixels
    assert [pixels for _, pixels in pngs[0]] != [pixels for _, pixels in pngs[2]]  # and the options took effect
    assert [im["variation_seed"] for im in plain["images"]] == [None, None]


def test_random_variation_seed_is_resolved_when_the_job_is_accepted(server):
    job = server.submit(variation_strength=0.2, steps=1)
    assert isinstance(job["params"]["variation_seed"], int)  # fixed now, so a re-run makes the same pixels
    done = server.wait_job(job["id"])
    meta, _ = _png(server, done["images"][0])
    assert meta["variation_seed"] == job["params"]["variation_seed"]


def test_a_seed_list_makes_one_image_per_seed(server):
    job = server.submit(seeds=[9, 3, 9], variation_seed=7, variation_strength=0.1, steps=1)
    assert (job["params"]["n"], job["params"]["seed"], job["params"]["seeds"]) == (3, None, [9, 3, 9])
    done = server.wait_job(job["id"])
    assert [(im["seed"], im["variation_seed"]) for im in done["images"]] == [(9, 7), (3, 7), (9, 7)]
    r = server.client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "steps": 1,
                                                           "seeds": [4, 2], "variety": 0.3})  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and r.json()["zturbo"]["seeds"] == [4, 2]
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][1]["b64_json"]))) as im:
        meta = json.loads(im.text[METADATA_KEY])
    assert (meta["seed"], meta["variety"]) == (2, 0.3)


def test_cancel_a_running_job_between_steps_and_a_queued_one_at_once(server):
    running = server.submit(steps=40)
    queued = server.submit(steps=2)
    cancelled = {}

    def on_event(name, data):
        if name == "progress" and not cancelled:
            cancelled["running"] = server.client.delete(f"/v1/jobs/{running['id']}").json()
            cancelled["queued"] = server.client.delete(f"/v1/jobs/{queued['id']}").json()

    events = sse_events(server.client, running["id"], on_event)
    assert cancelled["running"]["cancel_requested"] is True
    assert cancelled["queued"]["status"] == "cancelled"  # at once
    assert events[-1][0] == "cancelled"
    last_step = max(d["step"] for n, d in events if n == "progress")
    assert last_step < 40  # stopped between steps, long before the end
    assert events[-1][1]["images"] == []
    r = server.client.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"


def test_a_client_that_hangs_up_on_a_waiting_openai_request_cancels_its_job(server):
    # A real uvicorn connection closed mid-wait: the job stops between steps instead of running
    # its 40 steps for no one.
    body = {"prompt": "nobody waits for this", "size": "64x64", "steps": 40}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=2.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        history = server.client.get("/v1/history", params={"q": "nobody waits"}).json()
        if history["items"]:
            break
        time.sleep(0.2)
    (job,) = history["items"]
    assert job["status"] == "cancelled" and job["cancel_requested"] is True


def test_sse_reports_queue_position(server):
    blocker = server.submit(steps=10)
    waiting = server.submit(steps=1)
    events = sse_events(server.client, waiting["id"])
    queued = [d for n, d in events if n == "queued"]
    assert queued and queued[0]["position"] >= 0
    assert events[-1][0] == "done"
    assert server.wait_job(blocker["id"])["status"] == "succeeded"


def test_delete_history_removes_job_and_image(server):
    job = server.wait_job(server.submit(steps=1)["id"])
    image_url = job["images"][0]["url"]
    assert server.client.delete(f"/v1/history/{job['id']}").status_code == 204
    assert server.client.get(image_url).status_code == 404
    assert server.client.get(f"/v1/jobs/{job['id']}").status_code == 404


# --- the edge: auth, validation, one error body -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/history"), ("POST", "/v1/jobs"), ("GET", "/v1/status"), ("GET", "/metrics"),
     ("GET", "/v1/jobs/x"), ("GET", "/v1/images/x"), ("POST", "/v1/images/generations")],
)  # fmt: skip
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + KEY, KEY, f"Bearer {KEY}x"])
def test_missing_or_wrong_key_is_401(server, method, path, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"})
    assert r.status_code == 401
    assert r.json() == {"error": {"type": "unauthorized", "message": r.json()["error"]["message"], "field": None}}
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_and_ready_need_no_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200
    phases = ready.json()["worker_phases"]  # a real worker's start-up, phase by phase
    assert {"imports_s", "weights_s"} <= set(phases) and all(v >= 0 for v in phases.values())
    deadline = time.monotonic() + 30
    while "warm_s" not in (body := httpx.get(server.url + "/ready").json()) and time.monotonic() < deadline:
        time.sleep(0.1)
    # After ready, the worker's small-size call (the first-call costs; nothing compiles here) ran between jobs.
    assert set(body["deferred_warmup_parts"]) == {"small_call_s"} and body["warm_s"] >= body["ready_s"]


BAD_JOBS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"width": 1000}, "width"),
    ({"width": 8}, "width"),
    ({"width": 256, "height": 256}, "width"),  # above --max-pixels
    ({"n": 65}, "n"),
    ({"n": 0}, "n"),
    ({"steps": 101}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": "8"}, "steps"),
    ({"guidance_scale": 31}, "guidance_scale"),
    ({"guidance_scale": -0.5}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"sampler": "dpm"}, "sampler"),
    ({"variation_strength": 1.5}, "variation_strength"),
    ({"variation_strength": -0.1}, "variation_strength"),
    ({"variation_strength": "0.2x"}, "variation_strength"),
    ({"variation_seed": -1}, "variation_seed"),
    ({"variation_seed": 1.5}, "variation_seed"),
    ({"variety": 2}, "variety"),
    ({"variety": True}, "variety"),
    ({"guidance_scale": True}, "guidance_scale"),
    ({"variety_until": 0}, "variety_until"),
    ({"variety_until": 1.01}, "variety_until"),
    ({"seeds": []}, "seeds"),
    ({"seeds": list(range(65))}, "seeds"),
    ({"seeds": [1, -2]}, "seeds.1"),
    ({"seeds": "1-8"}, "seeds"),
    ({"seeds": [1, 2], "seed": 3}, "seeds"),
    ({"seeds": [1, 2], "n": 3}, "n"),
]


@pytest.mark.parametrize(("body", "field"), BAD_JOBS)
def test_bad_job_parameters_are_400_naming_the_field(server, body, field):
    r = server.client.post("/v1/jobs", json={"prompt": "a fox", **SMALL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == field
    assert field in error["message"]


@pytest.mark.parametrize(("body", "field"), [({"variety": 1.5}, "variety"), ({"seeds": [1], "n": 2}, "n")])
def test_bad_openai_extension_fields_are_400_naming_the_field(server, body, field):
    r = server.client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field and field in r.json()["error"]["message"]


def test_unknown_routes_ids_and_bodies_use_the_error_body(server):
    for r, status in [
        (server.client.get("/v1/jobs/nope"), 404),
        (server.client.get("/v1/images/nope"), 404),
        (server.client.get("/v1/nothing"), 404),
        (server.client.put("/v1/jobs"), 405),
        (server.client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (server.client.get("/v1/history", params={"limit": 0}), 400),
    ]:
        assert r.status_code == status
        assert set(r.json()["error"]) == {"type", "message", "field"}


def test_metrics_and_status(server):
    text = server.client.get("/metrics").text
    for name in ("zturbo_queue_depth", 'zturbo_jobs{state="succeeded"}', "zturbo_job_run_seconds_bucket",
                 "zturbo_job_latency_seconds_count", "zturbo_worker_restarts", "zturbo_fallbacks_total",
                 'zturbo_workers{state="ready"}'):  # fmt: skip
        assert name in text
    status = server.client.get("/v1/status").json()
    assert status["dtypes"] == {"transformer": "float32", "text_encoder": "float32", "vae": "float32"}
    assert status["device"] == "cpu" and status["workers"][0]["state"] in ("ready", "busy")
    assert status["model_source"] == "local" and status["transformer_weights"] is None
    assert "(turbo profile, local directory) on cpu" in status_text(status)  # the web UI's status line
    assert status["limits"] == {"spatial_unit": 16, "max_pixels": 128 * 128, "max_images": 64, "max_steps": 100,
                                "max_guidance": 30.0, "max_prompt_chars": 4000, "max_seed": 2**63 - 1,
                                "profile": {"name": "turbo", "steps": 8, "guidance_scale": 0.0, "steps_range": [8, 9],
                                            "guidance_range": [0.0, 0.0], "negative_prompt": False, "shift": 3.0,
                                            "cfg_normalization": 0.0, "cfg_truncation": 1.0,
                                            "sizes": status["limits"]["profile"]["sizes"]}}  # fmt: skip
    assert status["limits"]["profile"]["sizes"][:2] == ["1024x1024", "1152x896"]


# --- load: a bounded queue under 200 concurrent submissions ------------------------------------------


def test_200_concurrent_submissions_fill_the_queue_exactly(server):
    blocker = server.submit(steps=50)  # the worker is busy, so nothing leaves the queue during the burst
    deadline = time.monotonic() + 30
    while server.client.get(f"/v1/jobs/{blocker['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    results: list[httpx.Response] = []
    lock = threading.Lock()
    body = {"prompt": "burst", **SMALL, "steps": 1}

    def submit():
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            r = c.post("/v1/jobs", json=body)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=submit) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 200
    accepted = [r.json()["id"] for r in results if r.status_code == 202]
    refused = [r for r in results if r.status_code == 429]
    assert len(accepted) == 20 and len(refused) == 180
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "queue_full" for r in refused)
    server.client.delete(f"/v1/jobs/{blocker['id']}")
    assert [server.wait_job(j)["status"] for j in accepted] == ["succeeded"] * 20
    assert "zturbo_jobs_rejected_total 180.0" in server.client.get("/metrics").text


# --- binding safety -------------------------------------------------------------------------------------


def test_non_loopback_bind_without_key_is_refused(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ZTURBO_API_KEY", raising=False)
    code = cli_main(["serve", "--model", str(tiny_dir), "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "refusing to bind 0.0.0.0 without an API key" in capsys.readouterr().err


def test_bind_rules():
    from zturbo.serving.serve import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind("0.0.0.0", "key", insecure=False)
    check_bind("0.0.0.0", None, insecure=True)
    check_bind("127.0.0.1", None, insecure=False)
