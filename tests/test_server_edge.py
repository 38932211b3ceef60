"""The HTTP edge, in process: what a request may hold (headers, body), which Host a keyless server
answers, the error body in its corners, and what the open routes show."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serving import SMALL, in_process_app
from zturbo.serving.app import ServeSettings

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
    """Sent without Content-Length (chunked), a body is read only until it passes the limit."""
    chunk, read, sent = 64 << 10, [], []

    async def receive() -> dict:
        read.append(chunk)
        return {"type": "http.request", "body": b" " * chunk, "more_body": len(read) < 64}  # 4 MiB in all

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"",
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
