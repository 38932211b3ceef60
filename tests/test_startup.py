"""Start-up: compiled artifacts kept across processes (accel.artifacts) are reused by the next
process, give the same output, and a damaged or foreign cache file is ignored with a warning; the
warm-up parts a server runs after it reports ready; and what the server and its worker processes
import before the worker starts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zturbo.accel import artifacts
from zturbo.accel.compile import AccelOptions
from zturbo.config import RuntimeConfig, default_compile_cache
from zturbo.errors import InvalidRequestError

# One process's life: restore the cache, compile a regional block the way the engine does
# (`_token_dynamic`, two token counts), keep the artifacts, print what happened.
CHILD = r"""
import hashlib, json, sys
from pathlib import Path
import torch
from zturbo.accel import artifacts
from zturbo.accel.compile import AccelOptions, _token_dynamic

def block(x, w):
    h = torch.nn.functional.rms_norm(x, (x.shape[-1],)) @ w
    return x + torch.nn.functional.silu(h)

options = AccelOptions(compile=True)
cache = artifacts.open_cache(Path(sys.argv[1]), torch.device("cpu"), {"transformer": torch.float32}, options)
cache.restore()
compiled = _token_dynamic(block, "inductor")
g = torch.Generator().manual_seed(0)
w = torch.randn(16, 16, generator=g)
outs = [compiled(torch.randn(2, n, 16, generator=g), w) for n in (7, 11)]
cache.persist()
digest = hashlib.sha256(b"".join(o.numpy().tobytes() for o in outs)).hexdigest()
print(json.dumps({"status": cache.status, "loaded": cache.loaded, "lookups": cache.describe()["lookups"],
                  "digest": digest, "path": str(cache.path)}))
"""


def _child(cache_dir: Path, inductor_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONPATH": os.pathsep.join(sys.path)}
    # Inductor's probes of the CPU's vector instructions (a C++ build each, in the new cache
    # directory) are not what is checked here: trusting the CPU's flags halves the first run.
    env["TORCHINDUCTOR_VEC_ISA_OK"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir)], env=env, capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_artifacts_and_computes_the_same(tmp_path):
    inductor = tmp_path / "inductor"
    first = _child(tmp_path / "compile", inductor)
    assert first["status"] == "miss" and first["loaded"] == 0
    assert first["lookups"]["inductor.fxgraph_cache_miss"] >= 1
    assert Path(first["path"]).is_file() and Path(first["path"]).parent == tmp_path / "compile"
    # Inductor's own graph caches emptied (as a reboot empties /tmp): a lookup can only hit what
    # the zturbo file brings back. Its built C++ kernels stay, which only spares the CPU a rebuild.
    for entries in ("fxgraph", "aotautograd"):
        shutil.rmtree(inductor / entries)
    second = _child(tmp_path / "compile", inductor)
    assert second["status"] == "hit" and second["loaded"] > 0
    assert second["lookups"]["inductor.fxgraph_cache_miss"] == 0  # no graph compiled again
    assert second["lookups"]["aot_autograd.autograd_cache_miss"] == 0
    assert second["lookups"]["inductor.fxgraph_cache_hit"] == first["lookups"]["inductor.fxgraph_cache_miss"]
    assert second["digest"] == first["digest"]
    assert not list((tmp_path / "compile").glob(".*.tmp"))  # written atomically, nothing left beside


# A process that compiles graphs one after another and keeps the artifacts after each, as a server
# worker does after its warm-up and after each deferred part: argv[2] names the graphs, in order.
STEPS = r"""
import json, sys
from pathlib import Path
import torch
from zturbo.accel import artifacts
from zturbo.accel.compile import AccelOptions

GRAPHS = {
    "silu": lambda x: torch.nn.functional.silu(x) * 2,
    "gelu": lambda x: torch.nn.functional.gelu(x) + 1,
    "tanh": lambda x: torch.tanh(x) - 3,
}
cache = artifacts.open_cache(Path(sys.argv[1]), torch.device("cpu"), {"transformer": torch.float32},
                             AccelOptions(compile=True))
cache.restore()
for name in sys.argv[2].split(","):
    torch.compile(GRAPHS[name], backend="inductor", dynamic=False)(torch.ones(4, 8))
    cache.persist()
print(json.dumps({"status": cache.status, "loaded": cache.loaded, "lookups": cache.describe()["lookups"]}))
"""


def _steps(cache_dir: Path, inductor_dir: Path, graphs: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONPATH": os.pathsep.join(sys.path)}
    env["TORCHINDUCTOR_VEC_ISA_OK"] = "1"
    out = subprocess.run([sys.executable, "-c", STEPS, str(cache_dir), graphs], env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_graph_a_process_saved_comes_back_whatever_it_saved_in_between(tmp_path):
    """Artifacts saved twice by one process, and a file saved again by a process that loaded it and
    compiled more, all load into a new Inductor directory (torch's loader alone keeps only the
    last save's group of each kind)."""
    compile_dir = tmp_path / "compile"
    first = _steps(compile_dir, tmp_path / "inductor-0", "silu,gelu")  # saved after each graph
    assert first["lookups"]["inductor.fxgraph_cache_miss"] == 2
    second = _steps(compile_dir, tmp_path / "inductor-1", "silu,gelu,tanh")  # both loaded, one more compiled
    assert second["loaded"] > 0
    assert (second["lookups"]["inductor.fxgraph_cache_hit"], second["lookups"]["inductor.fxgraph_cache_miss"]) == (2, 1)
    third = _steps(compile_dir, tmp_path / "inductor-2", "silu,gelu,tanh")
    assert third["status"] == "hit"
    assert (third["lookups"]["inductor.fxgraph_cache_hit"], third["lookups"]["inductor.fxgraph_cache_miss"]) == (3, 0)


def _cache(root: Path, dtype: torch.dtype = torch.float32) -> artifacts.CompileCache:
    options = AccelOptions(compile=True)
    cache = artifacts.open_cache(root, torch.device("cpu"), {"transformer": dtype}, options)
    assert cache is not None
    return cache


def _write(cache: artifacts.CompileCache, key: dict, payload: bytes, sha: str | None = None) -> None:
    import hashlib

    header = {"key": key, "sha256": sha or hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    artifacts._write_atomic(cache.path, artifacts.MAGIC + json.dumps(header).encode() + b"\n" + payload)


@pytest.mark.parametrize("damage", ["garbage", "flipped byte", "truncated", "other key", "torch refuses"])
def test_a_damaged_or_foreign_cache_file_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    cache = _cache(tmp_path)
    payload = b"\x00artifacts" * 50
    loads: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loads.append(data) and None)
    if damage == "garbage":
        cache.path.parent.mkdir(parents=True, exist_ok=True)
        cache.path.write_bytes(b"\x89PNG not ours")
    elif damage == "flipped byte":
        _write(cache, cache.key, payload)
        data = bytearray(cache.path.read_bytes())
        data[-3] ^= 0xFF
        cache.path.write_bytes(bytes(data))
    elif damage == "truncated":
        _write(cache, cache.key, payload)
        cache.path.write_bytes(cache.path.read_bytes()[:-10])
    elif damage == "other key":
        _write(cache, {**cache.key, "torch": "0.0"}, payload)
    else:  # checks pass, but torch cannot deserialise the payload (it returns None)
        _write(cache, cache.key, payload)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        cache.restore()
    assert cache.status == "miss" and cache.loaded == 0
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "compile cache" in r.getMessage()]
    assert loads == ([payload] if damage == "torch refuses" else [])  # only an intact file reaches torch


def test_a_missing_file_is_a_quiet_miss_and_an_unwritable_directory_costs_a_warning(tmp_path, caplog, monkeypatch):
    cache = _cache(tmp_path / "compile")
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        cache.restore()
    assert cache.status == "miss" and not caplog.records
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    cache = _cache(blocker)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
        assert cache.persist() is False
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_the_key_separates_what_compiled_code_depends_on(tmp_path):
    base = _cache(tmp_path)
    assert base.path == _cache(tmp_path).path
    assert _cache(tmp_path, torch.bfloat16).path != base.path
    fp8 = artifacts.open_cache(tmp_path, torch.device("cpu"), {"transformer": torch.float32},
                               AccelOptions(compile=True, quantize="fp8"))  # fmt: skip
    assert fp8 is not None and fp8.path != base.path
    for package in ("torch", "diffusers", "zturbo", "transformers"):
        assert base.key[package]
    # Nothing to keep: not compiling, no directory, or a backend whose graphs torch does not cache.
    devices, dtypes = torch.device("cpu"), {"transformer": torch.float32}
    assert artifacts.open_cache(tmp_path, devices, dtypes, AccelOptions(compile=False)) is None
    assert artifacts.open_cache(None, devices, dtypes, AccelOptions(compile=True)) is None
    assert artifacts.open_cache(tmp_path, devices, dtypes, AccelOptions(compile=True, backend="eager")) is None


def test_the_compile_cache_setting(tmp_path):
    assert RuntimeConfig().compile_cache == default_compile_cache()
    assert default_compile_cache().parent == Path(os.environ["ZTURBO_CACHE"])
    assert RuntimeConfig.from_env({"ZTURBO_COMPILE_CACHE": "off"}).compile_cache is None
    assert RuntimeConfig.from_env({"ZTURBO_COMPILE_CACHE": str(tmp_path)}).compile_cache == tmp_path
    assert (
        RuntimeConfig.from_env({"ZTURBO_COMPILE_CACHE": "off"}, compile_cache=str(tmp_path)).compile_cache == tmp_path
    )
    assert RuntimeConfig.from_env({}, compile_cache="OFF").compile_cache is None
    with pytest.raises(InvalidRequestError, match="directory or 'off'"):
        RuntimeConfig.from_env({}, compile_cache=" ")


def test_an_engine_reports_its_start_up(tiny_dir, tmp_path):
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", compile_cache=tmp_path))
    report = engine.startup_report()
    assert report["compile_cache"] == "off" and report["load_s"] > 0  # on the CPU, auto compiles nothing
    phases = report["phases"]  # each phase once, in order, together the whole load
    assert list(phases) == ["device_s", "plan_s", "weights_s", "setup_s", "restore_s", "accel_s"]
    loading = sum(phases[name] for name in ("device_s", "plan_s", "weights_s", "setup_s"))
    assert loading == pytest.approx(report["load_s"], abs=0.01) and phases["weights_s"] > 0
    assert engine.compile_cache is None and not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_restarted_compiled_engine_reuses_its_artifacts_and_draws_the_same_image(tiny_dir, tmp_path):
    script = r"""
import hashlib, json, sys
import numpy as np
from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
engine = Engine.load(RuntimeConfig(model=sys.argv[1], device="cuda", compile="on", compile_cache=sys.argv[2]))
image = engine.generate("a red fox", seed=3, steps=2, width=256, height=256).images[0].image
engine.persist_compiled()
print(json.dumps({**engine.startup_report(), "digest": hashlib.sha256(np.asarray(image).tobytes()).hexdigest()}))
"""
    runs = []
    for i in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{i}")}
        out = subprocess.run([sys.executable, "-c", script, str(tiny_dir), str(tmp_path / "compile")], env=env,
                             capture_output=True, text=True, timeout=900, check=True)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["compile_cache"] for r in runs] == ["miss", "hit"]
    assert runs[1]["artifacts"]["lookups"]["inductor.fxgraph_cache_miss"] == 0
    assert runs[0]["digest"] == runs[1]["digest"]


def test_ready_reports_the_servers_start_up_from_the_first_ready_worker(tmp_path):
    from fastapi.testclient import TestClient

    from serving import in_process_app
    from zturbo.serving.workers import Ready, WorkerSlot, process_age

    app = in_process_app(tmp_path)
    supervisor = app.state.service.supervisor
    slot = WorkerSlot("worker-0", "cpu")
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 503  # no worker yet, and nothing to report
        supervisor.slots.append(slot)  # after start-up: a slot the supervisor never spawns
        age = process_age()
        assert age is not None and 0 < age < 3600  # this process's age, imports included
        phases = {"imports_s": 2.0, "weights_s": 1.0, "warmup_s": 4.0}
        startup = {"load_s": 1.5, "warmup_s": 4.0, "compile_cache": "hit", "phases": phases}
        supervisor._handle(slot, Ready({"model": "tiny"}, None, 7.0, startup))
        body = client.get("/ready").json()
    assert body["status"] == "ready" and body["compile_cache"] == "hit"
    assert body["worker_ready_s"] == 7.0 and body["worker_phases"] == phases  # where the worker's time went
    assert age <= body["ready_s"] < age + 60  # from the server process's start, not the worker's
    assert supervisor.runtime()["startup"] == startup  # the phases, for /v1/status's runtime


def test_ready_tells_when_the_first_ready_worker_ran_its_deferred_warm_ups(tmp_path):
    from fastapi.testclient import TestClient

    from serving import in_process_app
    from zturbo.serving.workers import Ready, Warmed, WorkerSlot

    app = in_process_app(tmp_path)
    supervisor = app.state.service.supervisor
    first, second = WorkerSlot("worker-0", "cpu"), WorkerSlot("worker-1", "cpu")
    with TestClient(app) as client:
        supervisor.slots += [first, second]
        supervisor._handle(first, Ready({"model": "tiny"}, None, 7.0, {"compile_cache": "hit"}))
        supervisor._handle(second, Ready({"model": "tiny"}, None, 8.0, {"compile_cache": "hit"}))
        ready = client.get("/ready").json()
        assert ready["status"] == "ready" and "warm_s" not in ready  # ready before its deferred warm-ups ran
        supervisor._handle(second, Warmed({"small_call_s": 5.0}, {}, 13.0))  # not the worker /ready reports on
        assert "warm_s" not in client.get("/ready").json()
        assert "deferred_warmup_failed" not in client.get("/ready").json()
        failed = {"inputs_s": "RuntimeError: /home/someone/.cache/inductor: no space left"}
        supervisor._handle(first, Warmed({"small_call_s": 2.9}, failed, 13.3))
        body = client.get("/ready").json()
    assert body["deferred_warmup_parts"] == {"small_call_s": 2.9}
    assert body["deferred_warmup_failed"] == ["inputs_s"] and "no space" not in str(body)  # names, no error text
    assert body["worker_warm_s"] == 13.3 and body["warm_s"] >= body["ready_s"]
    assert supervisor.slots[0].runtime["startup"]["deferred_warmup_parts"] == {"small_call_s": 2.9}


def _spy_generate(engine, monkeypatch) -> list[dict]:
    """Record each `engine.generate` call's size and input fields, then make the call."""
    calls: list[dict] = []
    real = engine.generate

    def spy(prompt, **params):
        calls.append({**params, "size": (params["width"], params["height"]), "with_image": "image" in params})
        return real(prompt, **params)

    monkeypatch.setattr(engine, "generate", spy)
    return calls


def test_a_deferred_warm_up_leaves_its_parts_for_later_and_runs_each_once(tiny_dir, monkeypatch):
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"), defer_warmup=True)
    assert engine.pending_warmups() == ("small_call_s",)  # nothing compiles on the CPU: first-call costs only
    assert "deferred_warmup_parts" not in engine.startup_report()
    calls = _spy_generate(engine, monkeypatch)
    seconds = engine.finish_warmup("small_call_s")
    assert [c["size"] for c in calls] == [(64, 64)]  # the smallest size: 4 patches of 16 px a side
    assert engine.pending_warmups() == () and engine.startup_report()["deferred_warmup_parts"] == {
        "small_call_s": seconds
    }
    with pytest.raises(InvalidRequestError, match="no deferred warm-up part 'small_call_s'; pending: none"):
        engine.finish_warmup("small_call_s")
    assert len(calls) == 1


def test_deferring_the_warm_up_leaves_the_input_image_call_and_runs_the_main_calls(fresh, monkeypatch):
    from PIL import Image

    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    # What a compiled VAE encoder asks of the warm-up (on the CPU nothing compiles).
    monkeypatch.setattr(fresh, "_warmup_inputs", lambda width, height: {"image": gray, "strength": 1.0})
    calls = _spy_generate(fresh, monkeypatch)
    fresh.warmup(64, 64, defer=True)
    assert [c["with_image"] for c in calls] == [False, False]  # the two prompt lengths, text-to-image
    assert list(fresh.startup["warmup_parts"]) == ["prompt_s", "longer_prompt_s"]
    assert fresh.pending_warmups() == ("inputs_s",)
    fresh.finish_warmup("inputs_s")
    assert [c["with_image"] for c in calls] == [False, False, True] and fresh.pending_warmups() == ()
    fresh.warmup(64, 64)  # not deferred: every part now, in order
    assert [c["with_image"] for c in calls[3:]] == [False, False, True]
    assert list(fresh.startup["warmup_parts"]) == ["prompt_s", "longer_prompt_s", "inputs_s"]


def test_a_warm_up_between_requests_keeps_the_merged_lora_set(tiny_dir, tmp_path, monkeypatch):
    from loras import write_lora
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"), defer_warmup=True)
    path = tmp_path / "a.safetensors"
    write_lora(path, "peft", engine.components.transformer, seed=8)
    engine.generate("a fox", seed=1, steps=1, width=64, height=64, loras=[(str(path), 1.0)])
    assert engine.merger is not None
    merged, switches = engine.merger.active, engine.merger.stats.switches
    calls = _spy_generate(engine, monkeypatch)
    engine.finish_warmup("small_call_s")
    assert engine.merger.active == merged and engine.merger.stats.switches == switches  # no switch there and back
    assert len(calls) == 1 and [ref.name for ref in calls[0].get("loras", ())] == [str(path)]


PROBE = "import sys, spawn_probe; spawn_probe.main(sys.argv[1], sys.argv[2:])"
WEB = {"fastapi", "starlette", "pydantic", "uvicorn", "gradio", "zturbo.serving.app", "zturbo.serving.schemas"}


def test_the_server_starts_its_worker_before_it_imports_the_web_framework(tiny_dir, tmp_path):
    """The API's own imports (FastAPI, pydantic, the routes, uvicorn) and torch run while the workers
    load; a worker process imports none of them, nor torch, before its entry point runs."""
    import socket
    import time

    from spawn_probe import SERVER_FILE, WORKER_FILE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])}
    args = ["serve", "--model", str(tiny_dir), "--device", "cpu", "--compile", "off", "--no-ui", "--port", str(port),
            "--data-dir", str(tmp_path / "data"), "--log-level", "warning"]  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", PROBE, str(tmp_path), *args], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not _answers(f"http://127.0.0.1:{port}/health") or not (tmp_path / WORKER_FILE).exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(60)
    server = set(json.loads((tmp_path / SERVER_FILE).read_text()))
    worker = set(json.loads((tmp_path / WORKER_FILE).read_text()))
    assert {"zturbo.serving.service", "zturbo.serving.workers"} <= server  # the service runs when it spawns
    assert server & WEB == set(), "the server imported the web framework before it started its worker"
    assert "torch" not in server, "the server imported torch before it started its worker"
    assert "__mp_main__" in worker  # the server's main module (zturbo.cli), imported again by the spawn
    assert worker & (WEB | {"torch"}) == set()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class FakeDriver:
    """libcuda.so.1's two entry points the server's count calls, answering `count` (or an error)."""

    def __init__(self, count: int, status: int = 0) -> None:
        self.count, self.status = count, status

    def cuInit(self, flags: int) -> int:  # the driver's names
        return self.status

    def cuDeviceGetCount(self, out) -> int:
        out._obj.value = self.count
        return 0


@pytest.mark.parametrize(("driver", "expected"), [(FakeDriver(2), 2), (FakeDriver(2, status=100), None), (None, None)])
def test_the_server_counts_its_gpus_with_the_driver_and_leaves_other_cases_to_torch(monkeypatch, driver, expected):
    import ctypes

    from zturbo.errors import DeviceError
    from zturbo.serving import serve

    def cdll(name: str):
        assert name == "libcuda.so.1"
        if driver is None:
            raise OSError("libcuda.so.1: cannot open shared object file")
        return driver

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert serve.cuda_device_count() == expected
    if expected:
        assert serve.worker_devices(None, None) == ["cuda:0", "cuda:1"]
        assert serve.worker_devices("1", None) == ["cuda:1"]
        with pytest.raises(DeviceError, match="GPU 2 does not exist; this machine has 2 GPU"):
            serve.worker_devices("0,2", None)
    else:  # torch decides: this CPU machine has no CUDA device
        assert serve.worker_devices(None, None) in (["cpu"], ["mps"])
