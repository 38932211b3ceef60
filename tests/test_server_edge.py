"""The HTTP edge, in process: what a request may hold (headers, body), which Host a keyless server
answers, the error body in its corners, and what the open routes show."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import zturbo
from serving import SMALL, in_process_app
from zturbo.errors import JobFailedError, OutputExistsError, StoreBusyError, ZTurboError
from zturbo.serving.jobs import JobConflictError
from zturbo.serving.service import ServeSettings

MAX_BODY_BYTES = ServeSettings.max_body_bytes
MAX_HEADER_BYTES = ServeSettings.max_header_bytes


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(in_process_app(tmp_path_factory.mktemp("edge"), sync_timeout=0.2)) as client:
        yield client


def assert_error(r, status: int, kind: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["field"]) == (kind, field), error
    return error


# --- limits on headers and bodies -----------------------------------------------------------


def test_a_body_over_the_limit_is_413_from_its_content_length(api):
    prompt = "x" * MAX_BODY_BYTES
    error = assert_error(api.post("/v1/jobs", json={"prompt": prompt, **SMALL}), 413, "too_large")
    assert str(MAX_BODY_BYTES) in error["message"]


def test_a_streamed_body_is_cut_off_at_the_limit(api):
    """Sent without Content-Length (chunked), a body is read only until it passes the limit (on a route
    that takes no images; those take larger bodies, tests/test_server_images.py)."""
    chunk, read, sent = 64 << 10, [], []

    async def receive() -> dict:
        read.append(chunk)
        return {"type": "http.request", "body": b" " * chunk, "more_body": len(read) < 64}  # 4 MiB in all

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/history", "raw_path": b"/v1/history", "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80)}  # fmt: skip
    asyncio.run(api.app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "too_large"
    assert sum(read) <= MAX_BODY_BYTES + chunk


def test_a_body_within_the_limit_still_works(api):
    r = api.post("/v1/jobs", json={"prompt": "y" * 4000, "negative_prompt": "\u00e9" * 4000, **SMALL})
    assert r.status_code == 202, r.text


def test_oversized_headers_are_431(api):
    r = api.get("/health", headers={"X-Big": "a" * (MAX_HEADER_BYTES + 1)})
    assert_error(r, 431, "too_large")
    assert api.get("/health", headers={"X-Small": "a" * 1000}).status_code == 200


def test_zero_width_prompts_and_unicode_sizes_are_400(api):
    r = api.post("/v1/jobs", json={"prompt": "\u200b\u200d\ufeff", **SMALL})
    assert_error(r, 400, "invalid_request", "prompt")
    for size in ("64x64\n", "\uff16\uff14x64", "\u0666\u0664x64"):
        r = api.post("/v1/images/generations", json={"prompt": "a fox", "size": size})
        assert_error(r, 400, "invalid_request", "size")


# --- the error body in its corners ------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SERVING = Path(zturbo.__file__).parent / "serving"


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"prompt": "a fox",,}', "application/json", "the body is not valid JSON: Expecting property name"),
        (b"", "application/json", 'the body is empty; send a JSON object with at least "prompt"'),
        (b"", None, "the body is empty"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "the body's JSON nests too deeply"),
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "application/json", "a number of more than 4300 digits"),
        (b'{"prompt": "a \xff\xfe fox"}', "application/json", "the body is not UTF-8 text: byte 15 is 0xff"),
        (b"[1]", "application/json", "the body must be a JSON object sent as Content-Type: application/json, got an"),
        (b"null", "application/json", "got null"),
        (b'{"prompt": "a fox"}', "text/plain", "got text"),
    ],
)
def test_a_body_that_is_no_json_object_is_a_documented_400(api, body, content_type, message):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/jobs", "/v1/images/generations"):
        error = assert_error(api.post(path, content=body, headers=headers), 400, "invalid_request", None)
        assert error["message"].startswith(message) or message in error["message"], error


def test_a_bad_field_still_names_the_field(api):
    error = assert_error(api.post("/v1/jobs", json={"prompt": "a fox", "steps": "8"}), 400, "invalid_request", "steps")
    assert error["message"].startswith('steps "8"')


def test_a_cancelled_synchronous_request_gets_a_documented_error(tmp_path, monkeypatch):
    from zturbo.serving import jobs

    monkeypatch.setattr(jobs, "new_id", lambda: "job-to-cancel")
    with TestClient(in_process_app(tmp_path, sync_timeout=30)) as client:
        answers = []
        waiter = threading.Thread(
            target=lambda: answers.append(client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64"}))
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while client.delete("/v1/jobs/job-to-cancel").status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiter.join(10)
    error = assert_error(answers[0], 409, "cancelled")
    assert error["message"] == "job job-to-cancel was cancelled"
    assert "cancelled" in documented_types()


def documented_types() -> set[str]:
    """The first column of the error tables in docs/api.md's Errors section."""
    section = DOCS.read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    return {kind for row in re.findall(r"^\| (`.+?) \|", section, flags=re.M) for kind in re.findall(r"`(\w+)`", row)}


def produced_types() -> set[str]:
    """Every error type the server can answer with: the error classes' kinds, the job errors the
    queue and workers store, and the types the app gives Starlette's own errors."""
    from zturbo.serving import app

    kinds = set()
    classes = [ZTurboError]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        # JobFailedError carries its job's error type, collected below; the worker always replaces
        # its own files, so only the CLI refuses to overwrite one.
        if cls not in (JobFailedError, OutputExistsError):
            kinds.add(cls.kind)
    for source in SERVING.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Dict) and any(getattr(k, "value", None) == "message" for k in node.keys):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant):
                        kinds.add(value.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "error_response":
                kinds.update(a.value for a in node.args[1:2] if isinstance(a, ast.Constant))
    return kinds | set(app._HTTP_KINDS.values()) | {app._fallback_kind(400), app._fallback_kind(500)}


def test_every_error_type_is_documented():
    produced = produced_types()
    assert {"cancelled", "worker_died", "too_large", "not_found"} <= produced
    assert produced - documented_types() == set()


# --- which Host a keyless server answers --------------------------------------------------------


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:7860", "127.0.0.1.nip.io", "10.0.0.1"])
def test_a_keyless_server_refuses_other_host_names(api, host):
    r = api.get("/v1/history", headers={"Host": host})
    error = assert_error(r, 403, "host_not_allowed")
    assert host in error["message"] and "--allowed-hosts" in error["message"]
    assert "items" not in r.text


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.:7860", "127.0.0.1:7860", "127.1.2.3", "[::1]:7860", "app.localhost", "testserver"]
)
def test_a_keyless_server_answers_loopback_names_and_allowed_hosts(api, host):
    assert api.get("/v1/history", headers={"Host": host}).status_code == 200


def test_the_allow_list_and_a_key_lift_the_host_check(tmp_path):
    with TestClient(in_process_app(tmp_path / "a", allowed_hosts=("gpu-box.lan",))) as client:
        assert client.get("/v1/history", headers={"Host": "gpu-box.lan:7860"}).status_code == 200
        assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 403
    with TestClient(in_process_app(tmp_path / "b", allowed_hosts=("*",))) as client:
        assert client.get("/v1/history", headers={"Host": "anything.example"}).status_code == 200
    with TestClient(in_process_app(tmp_path / "c", api_key="k")) as client:
        r = client.get("/v1/history", headers={"Host": "proxy.example", "Authorization": "Bearer k"})
        assert r.status_code == 200


def test_allowed_hosts_is_a_serve_option():
    from zturbo.cli import build_parser

    args = build_parser().parse_args(["serve", "--allowed-hosts", "gpu-box.lan,gpu-box"])
    assert args.allowed_hosts == ("gpu-box.lan", "gpu-box")
    assert build_parser().parse_args(["serve"]).allowed_hosts == ()


# --- what the open routes show, and which image files are served -------------------------------


def test_ready_shows_no_job_or_process_ids(api, monkeypatch):
    supervisor = api.app.state.service.supervisor
    busy = {"id": "w0", "device": "cuda:0", "state": "busy", "restarts": 0, "pid": 4242, "job": "secret-job-id",
            "last_error": "CUDA error at /home/alice/x.py"}  # fmt: skip
    monkeypatch.setattr(supervisor, "ready", lambda: True)
    monkeypatch.setattr(supervisor, "workers", lambda: [busy, {**busy, "id": "w1", "state": "restarting"}])
    r = api.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "workers": {"ready": 1, "total": 2}}


@pytest.fixture()
def finished_image(api) -> Iterator[tuple[Path, str]]:
    """A finished job's image, recorded in the store; the test decides what its file holds."""
    from zturbo.serving import jobs

    service = api.app.state.service
    job = api.post("/v1/jobs", json={"prompt": "an owl", **SMALL}).json()
    while (claim := service.store.claim("w-test")) is not None and claim.job_id != job["id"]:
        service.store.end(claim, jobs.CANCELLED)  # earlier tests' queued jobs
    image_id = f"{job['id']}-img"
    assert service.store.succeed(claim, [jobs.ImageRef(image_id, 0, 1, f"{job['id']}-0.png")])
    yield service.images_dir / f"{job['id']}-0.png", image_id


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_intact_png_is_served(api, finished_image):
    path, image_id = finished_image
    path.write_bytes(png_bytes())
    r = api.get(f"/v1/images/{image_id}")
    assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/png", png_bytes())


@pytest.mark.parametrize("damage", ["truncated", "bad checksum", "not a png"])
def test_a_damaged_png_is_a_storage_error(api, finished_image, damage):
    path, image_id = finished_image
    data = png_bytes()
    flipped = data[:45] + bytes([data[45] ^ 0xFF]) + data[46:]  # inside the pixel data (IDAT)
    path.write_bytes({"truncated": data[:-20], "bad checksum": flipped, "not a png": b"x"}[damage])
    error = assert_error(api.get(f"/v1/images/{image_id}"), 507, "storage")
    assert "damaged" in error["message"] and path.name in error["message"]


def test_a_large_image_is_served_whole_in_pieces_of_bounded_size(api, finished_image, tmp_path):
    # A slow reader must hold one piece of server memory, not the whole file.
    import numpy as np

    from zturbo.serving import app as app_module

    path, image_id = finished_image
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    data = path.read_bytes()
    assert len(data) > 2 * app_module.DOWNLOAD_CHUNK
    r = api.get(f"/v1/images/{image_id}")
    assert (r.status_code, r.headers["content-length"], r.content) == (200, str(len(data)), data)
    with open(path, "rb") as file:
        pieces = list(app_module._chunks(file))
        assert file.closed and b"".join(pieces) == data
    assert max(len(p) for p in pieces) == app_module.DOWNLOAD_CHUNK


@pytest.mark.parametrize(("fmt", "cut"), [("WEBP", 10), ("JPEG", 2)])
def test_a_truncated_webp_or_jpeg_is_a_storage_error(api, finished_image, fmt, cut):
    path, image_id = finished_image
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue()[:-cut])
    error = assert_error(api.get(f"/v1/images/{image_id}"), 507, "storage")
    assert "damaged" in error["message"]


def test_a_symlink_in_images_is_not_followed(api, finished_image, tmp_path):
    path, image_id = finished_image
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())  # even a valid PNG elsewhere is not served through a link
    path.symlink_to(secret)
    r = api.get(f"/v1/images/{image_id}")
    assert_error(r, 507, "storage")
    assert "only regular files are served" in r.json()["error"]["message"]


@pytest.mark.parametrize(("headers", "status"), [([], 401), ([(b"authorization", b"Bearer k")], 202)])
def test_a_body_is_read_only_after_the_key_has_passed(tmp_path, headers, status):
    """The body buffer sits inside auth: a client without the key cannot make the server hold a body."""
    app = in_process_app(tmp_path / "data", api_key="k")
    body = json.dumps({"prompt": "a fox", **SMALL}).encode()
    reads: list[int] = []
    sent: list[dict] = []

    async def receive() -> dict:
        reads.append(len(body))
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == status
    assert reads == ([] if status == 401 else [len(body)])


WAITING_ROUTES = [
    ("/v1/images/generations", {"prompt": "a fox", "size": "64x64"}),
    ("/sdapi/v1/txt2img", {"prompt": "a fox", **SMALL}),
]


def _waiting_request(path: str, body: dict, hang_up_after: float | None) -> tuple[dict, Any, Any, list[dict]]:
    """An ASGI request to `path` whose receive behaves as uvicorn's: the body, then a wait until
    the client hangs up, `hang_up_after` seconds later (None: never)."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    hangs_up: list[float] = []

    async def receive() -> dict:
        if not hangs_up:
            hangs_up.append(time.monotonic() + (hang_up_after if hang_up_after is not None else 1e9))
            return {"type": "http.request", "body": raw, "more_body": False}
        if time.monotonic() < hangs_up[0]:
            await asyncio.sleep(hangs_up[0] - time.monotonic())
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    return scope, receive, send, sent


@pytest.mark.parametrize(("path", "body"), WAITING_ROUTES)
@pytest.mark.parametrize("stopping", [False, True])
def test_a_waiting_request_whose_client_goes_away_cancels_its_job(tmp_path, path, body, stopping):
    # The OpenAI and A1111 routes answer once the job is done; a client that hung up will collect
    # nothing, so its job leaves the queue instead of taking the GPU (and a queue slot) for no one,
    # during a shutdown's grace too.
    app = in_process_app(tmp_path / "data", sync_timeout=30)
    if stopping:
        app.state.service.stopping.set()
    scope, receive, send, sent = _waiting_request(path, body, hang_up_after=0.5)
    start = time.monotonic()
    asyncio.run(app(scope, receive, send))
    assert time.monotonic() - start < 1.5  # the hang-up wakes the wait: not the next poll, nor 30 s
    assert sent[0]["status"] == 499
    counts = app.state.service.store.counts()
    assert (counts["cancelled"], counts["queued"]) == (1, 0)


@pytest.mark.parametrize(
    ("failure", "logged"),
    [(JobConflictError("it has already succeeded"), None), (StoreBusyError("locked"), "cancelling it failed: locked")],
)
def test_a_hang_up_whose_cancel_fails_still_ends_the_request(tmp_path, caplog, failure, logged):
    # The job may finish at the moment its client hangs up (nothing to cancel), or the store may be
    # busy: the request ends either way, and only the second is worth a warning.
    app = in_process_app(tmp_path / "data", sync_timeout=30)

    def cancel(job_id: str) -> None:
        raise failure

    app.state.service.cancel = cancel
    scope, receive, send, sent = _waiting_request(*WAITING_ROUTES[0], hang_up_after=0.2)
    with caplog.at_level(logging.INFO, logger="zturbo"):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 499
    assert ("cancelling it failed" in caplog.text) is (logged is not None)
    assert "cancelled: its client went away" not in caplog.text


@pytest.mark.parametrize(("path", "body"), WAITING_ROUTES)
@pytest.mark.parametrize("stopping", [False, True])
def test_a_waiting_request_cancelled_under_the_server_cancels_its_job_unless_it_shuts_down(
    tmp_path, path, body, stopping
):
    # Ray Serve cancels a request whose client disconnected; uvicorn cancels the requests still
    # open when a shutdown's grace ends, whose jobs then stay queued for the next server.
    app = in_process_app(tmp_path / "data", sync_timeout=30)
    store = app.state.service.store
    scope, receive, send, _ = _waiting_request(path, body, hang_up_after=None)

    async def cancel_once_queued() -> None:
        request = asyncio.ensure_future(app(scope, receive, send))
        while store.counts()["queued"] == 0:
            await asyncio.sleep(0.05)
        if stopping:
            app.state.service.stopping.set()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(cancel_once_queued())
    counts = store.counts()
    assert (counts["cancelled"], counts["queued"]) == ((0, 1) if stopping else (1, 0))


def test_a_burst_of_slow_history_searches_leaves_the_other_routes_their_threads(tmp_path, monkeypatch):
    # A search reads every finished job (0.6 s over 30,000 long prompts on 2 cores); 40 at once
    # held every worker thread, and /v1/status waited 36 s for one. Now two run at a time and the
    # others wait without a thread.
    with TestClient(in_process_app(tmp_path / "data")) as client:
        store = client.app.state.service.store
        search = store.history

        def slow_search(**kwargs):
            time.sleep(2.0)
            return search(**kwargs)

        monkeypatch.setattr(store, "history", slow_search)
        burst = [threading.Thread(target=client.get, args=("/v1/history",), kwargs={"params": {"q": "fox"}})
                 for _ in range(45)]  # fmt: skip
        for thread in burst:
            thread.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert client.get("/v1/status").status_code == 200
        took = time.monotonic() - start
        monkeypatch.setattr(store, "history", search)  # the waiting ones finish at once
        for thread in burst:
            thread.join()
        assert took < 1.0, f"/v1/status took {took:.1f} s behind 45 searches"


def test_reads_answer_while_a_submission_waits_for_another_processs_lock(tmp_path):
    # A write waiting (up to BUSY_WAIT_S) for a lock another process holds must not hold up the
    # status, history and queue reads of every other client of this server.
    import sqlite3

    with TestClient(in_process_app(tmp_path / "data")) as client:
        store = client.app.state.service.store
        job = client.post("/v1/jobs", json={"prompt": "a fox", **SMALL}).json()
        store._db.execute("PRAGMA busy_timeout = 4000")  # the writer's wait, shortened from BUSY_WAIT_S
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        waiting = threading.Thread(target=client.post, args=("/v1/jobs",), kwargs={"json": {"prompt": "b", **SMALL}})
        try:
            waiting.start()
            time.sleep(0.3)  # the submission now holds the writer and waits for the lock
            start = time.monotonic()
            assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
            assert client.get("/v1/history", params={"q": "fox"}).status_code == 200
            assert client.get("/v1/status").status_code == 200
            assert client.get("/health").status_code == 200
            took = time.monotonic() - start
            assert waiting.is_alive()  # the submission was still waiting for the lock all along
        finally:
            other.execute("ROLLBACK")
            other.close()
            waiting.join()
        assert took < 2.0, f"reads took {took:.1f} s behind a waiting write"
        assert store.counts()["queued"] + store.counts()["running"] + store.counts()["succeeded"] == 2


def test_a_database_locked_by_another_process_is_a_503_to_retry_and_changes_nothing(tmp_path):
    # Another process (a backup, an admin's sqlite3 shell) holding the write lock past the wait must
    # not turn a submission into an untyped 500: the client is told to send it again.
    import sqlite3

    with TestClient(in_process_app(tmp_path / "data")) as client:
        store = client.app.state.service.store
        store._db.execute("PRAGMA busy_timeout = 200")  # the wait, shortened from BUSY_WAIT_S
        before = store.counts()
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            r = client.post("/v1/jobs", json={"prompt": "a fox", **SMALL})
        finally:
            other.execute("ROLLBACK")
            other.close()
        error = assert_error(r, 503, "store_busy")
        assert r.headers["retry-after"] == "5" and "send the request again" in error["message"]
        assert store.counts() == before
        assert client.post("/v1/jobs", json={"prompt": "a fox", **SMALL}).status_code == 202
