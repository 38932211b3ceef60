"""Shared fixtures: one tiny random checkpoint per test session, loaded by zturbo and by diffusers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The test files that take longest on the 2-core CI machine, longest first (`pytest --durations`;
# the files not named take a few seconds each). `-n 2 --dist loadfile` hands whole files to
# whichever process is free, in collection order: begun first, these leave the short files to even
# out the end. xdist's own order (the files with the most tests first) starts the long files of few
# tests last: on the same durations, its two processes would end 58 s apart (381 s and 323 s),
# these both at 352 s. Only the order depends on this list: a file missing from it starts later.
LONG_FIRST = (
    "test_server_recovery.py",
    "test_ui_e2e.py",
    "test_bench.py",
    "test_scripts.py",
    "test_bench_models.py",
    "test_accel.py",
    "test_context_parallel.py",
    "test_server.py",
    "test_startup.py",
    "test_modelscope.py",
    "test_server_fuzz.py",
    "test_cli.py",
    "test_server_postgres.py",
    "test_a1111.py",
    "test_server_lifecycle.py",
    "test_load_script.py",
    "test_server_images.py",
    "test_server_lora.py",
    "test_batching.py",
    "test_attention.py",
    "test_memory.py",
    "test_loader.py",
    "test_cli_lora.py",
    "test_gguf.py",
    "test_batch.py",
    "test_jobs.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist, files are handed out in the order collected (LONG_FIRST), not reordered."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of LONG_FIRST first; and the Ray tests, which start a cluster, run only when `-m`
    names them (`pytest -m ray tests/test_ray.py`)."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file stays in one piece
    if "ray" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="starts a Ray cluster: run with -m ray")
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Never touch the user's caches or the network from tests.
    root = tmp_path_factory.mktemp("cache")
    os.environ["ZTURBO_CACHE"] = str(root / "zturbo")
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ["MODELSCOPE_CACHE"] = str(root / "modelscope")
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread_per_process() -> None:
    """One CPU thread for torch in the test processes and in every process they start (servers,
    workers, scripts, spawned ranks inherit the variable). The tiny model's ops are too small to
    gain from a second thread, and torch's default of one OpenMP thread per core makes the
    processes of `-n 2` spin against each other on a 2-core machine: tests/test_memory.py,
    test_parity.py, test_engine.py, test_reproduce.py, test_guard.py, test_preview.py and
    test_cli_images.py took 62 s together that way, and 31 s with one thread each."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _one_parse_per_tokenizer() -> Iterator[None]:
    """Tokenizers parsed once per directory for the whole session. Parsing Qwen's 151,643-rank
    vocabulary takes about half a second, and the tests load the tiny checkpoint a hundred times in
    this process; zturbo never changes a tokenizer, so engines can share one. The key holds every
    file's modification time, so a test that edits a tokenizer gets a fresh parse; tests that start
    a server still parse in their own processes."""
    from transformers import AutoTokenizer

    parse = AutoTokenizer.from_pretrained.__func__
    parsed: dict[tuple[object, ...], object] = {}

    def from_pretrained(cls: type, path: object, *args: object, **kwargs: object) -> object:
        directory = Path(str(path))
        files = tuple((f.name, f.stat().st_mtime_ns) for f in sorted(directory.iterdir())) if directory.is_dir() else ()
        key = (str(directory.resolve()), files, args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = parse(cls, path, *args, **kwargs)
        return parsed[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(AutoTokenizer, "from_pretrained", classmethod(from_pretrained))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache: None) -> Path:
    from zturbo.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def engine(tiny_dir: Path):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    return Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def reference_pipe(tiny_dir: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh(tiny_dir: Path):
    """A float32 CPU engine of its own, for tests that change it (compile, plans, injected faults)."""
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    return Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the whole session (tests/pgserver.py); skipped where there is none."""
    from pgserver import server

    with server() as url:
        yield url


@pytest.fixture
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A new, empty database on that server, for one test: its URL."""
    from pgserver import fresh_database

    with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(scope="session")
def shape():
    """The real architecture's `memory.plan.ModelShape`, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zturbo.bench.common import QWEN3_4B_CONFIG
    from zturbo.memory import plan
    from zturbo.tiny import FLUX_VAE_CONFIG

    with init_empty_weights():
        transformer = ZImageTransformer2DModel()
        text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG))
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    return plan.model_shape(transformer, text_encoder, vae)


@pytest.fixture(autouse=True)
def _fresh_dynamo_caches() -> Iterator[None]:
    """Each test's compilations start from empty Dynamo caches. Every engine's blocks share diffusers'
    block `forward`, whose compiled variants accumulate across tests in one process up to Dynamo's
    recompile limit, where a fullgraph compile fails hard; a process that serves keeps one engine."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and dynamo.convert_frame.FRAME_COUNTER:  # something compiled since the last reset
        dynamo.reset()
