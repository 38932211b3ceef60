"""Fuzz every route of the OpenAPI schema (schemathesis): no input may produce a 5xx.

The app runs in process with no workers, so valid jobs just wait in the queue and the synchronous
OpenAI route gives up after its (short) sync timeout with a 504 that is not a server error.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from zturbo.config import RuntimeConfig
from zturbo.loader import resolve_model
from zturbo.serving.app import create_app
from zturbo.serving.service import ServeSettings

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_schema(tiny_dir, tmp_path_factory):
    config = RuntimeConfig(model=str(tiny_dir), device="cpu")
    settings_ = ServeSettings(
        config=config,
        data_dir=tmp_path_factory.mktemp("fuzz"),
        devices=[],
        limits=resolve_model(str(tiny_dir), weights=False).limits(64 * 64),
        api_key=KEY,
        queue_size=5,
        sync_timeout=0.2,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))


def test_no_input_makes_a_server_error(fuzz_schema):
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 10
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)  # valid inputs, then invalid ones
    for operation, mode in itertools.product(operations, modes):

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            for headers in ({"Authorization": f"Bearer {KEY}"}, {}):
                response = case.call(headers=headers)
                allowed = {504, 503} if case.path == "/ready" else {504}  # no worker: never ready
                assert response.status_code < 500 or response.status_code in allowed, response.text
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"type", "message", "field"}, response.text
                if not headers and case.path not in ("/health", "/ready"):
                    assert response.status_code == 401

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # a route with no inputs has no invalid ones
