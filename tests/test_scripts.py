"""Every tool in scripts/ runs on the current code in its cheapest mode, so none can rot unseen.

bench_precision has a CPU mode (--tiny); probe_floor, bench_pcie and bench_weights measure a GPU, so on the CPU
their command lines, imports and refusals are checked; build_fa3.sh is parsed by bash and stops
at its first missing input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
KEPT = {
    "bench_encode.py",
    "bench_parallel.py",
    "bench_pcie.py",
    "bench_precision.py",
    "bench_weights.py",
    "build_fa3.sh",
    "probe_floor.py",
    "probe_int8_compile.py",
    "profile_start.py",
}
# Scripts covered by a test file of their own.
OWN_TESTS = {"load_serve.py": "test_load_script.py"}


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python scripts/<name> args`, with this tree's src/ first on the path (as the docs run them)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(SCRIPTS / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(name: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`main(args)` of scripts/<name> in this process, where its argparse refuses: the exit code and
    stderr. Each script also runs as a subprocess in a test below; a refusal needs no fresh
    interpreter (each one costs seconds of importing torch)."""
    with pytest.raises(SystemExit) as exited:
        load(name).main(list(args))
    return exited.value.code, capsys.readouterr().err


def test_every_script_is_covered_here():
    assert {p.name for p in SCRIPTS.iterdir() if p.is_file()} == KEPT | set(OWN_TESTS)
    assert all((ROOT / "tests" / test).is_file() for test in OWN_TESTS.values())


def test_bench_encode_measures_every_format_with_its_metadata():
    proc = run_script("bench_encode.py", "--size", "64", "--runs", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    labels = " ".join(row[0] for row in rows).lower()
    assert all(name in labels for name in ("png", "webp", "jpeg")), proc.stdout
    # Each image's columns: wall ms, CPU ms, KiB. Every file has bytes, every encoding takes time.
    assert all(float(cell) > 0 for row in rows for cell in (row[1], row[3], row[4], row[6])), proc.stdout
    assert "zturbo writer" in labels and "pillow level 1, z_rle" in labels, proc.stdout


def test_profile_start_reports_the_phases_and_where_the_time_went(tmp_path):
    proc = run_script("profile_start.py", "--model", "tiny-random", "--out", str(tmp_path), "--top", "5",
                      env={"ZTURBO_DEVICE": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "start.txt").read_text()
    assert '"weights_s"' in text and "Ordered by: cumulative time" in text and "Ordered by: internal time" in text
    assert (tmp_path / "start.prof").stat().st_size > 0


def test_bench_precision_smoke_run_on_the_tiny_model(tmp_path):
    proc = run_script(
        "bench_precision.py", "--tiny", "--cases", "fp32,bf16,fp16", "--sizes", "32", "--runs", "1", "--rounds", "1",
        env={"OUT": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench_precision.json").read_text())
    assert res["errors"] == {} and set(res["cases"]) == {"fp32", "bf16", "fp16"}
    cases = res["cases"]
    assert cases["fp32"]["accuracy"]["latent_rel_err_vs_fp32"] == 0.0
    assert 0 < cases["bf16"]["accuracy"]["latent_rel_err_vs_fp32"] < 0.05
    for variant in ("scale", "clamp", "none"):  # the guard's variants, each against float32
        assert cases["fp16"][variant]["accuracy"]["latents_finite"], variant
    assert res["env"]["zturbo_src_sha256"] and res["env"]["diffusers"]
    assert "| 1 fp32 | float32 / float32 / float32 |" in proc.stdout
    assert "| 3 fp16 + guard (scale) | float16 / float16 / float32 |" in proc.stdout


def test_probe_floor_lists_its_parts_and_needs_a_gpu(capsys, monkeypatch, tmp_path):
    help_text = run_script("probe_floor.py", "--help")
    assert help_text.returncode == 0 and "burst, bf16, fp8, fa3_fp8, e2e" in help_text.stdout
    probe = load("probe_floor.py")  # imports on a CPU machine: nothing touches CUDA at import
    assert list(probe.PARTS) == ["burst", "bf16", "fp8", "fa3_fp8", "e2e"]
    code, err = refused("probe_floor.py", "nonsense", capsys=capsys)
    assert code == 2 and "unknown parts ['nonsense']" in err
    if not torch.cuda.is_available():
        monkeypatch.setenv("OUT", str(tmp_path))  # were it to get past the check, it would write here
        code, err = refused("probe_floor.py", "burst", capsys=capsys)
        assert code == 2 and "CUDA GPU" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_floor_times_each_product_on_a_gpu(tmp_path):
    proc = run_script("probe_floor.py", "burst", env={"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "floor.json").read_text())
    assert set(res["burst_ms"]) == {"qkv", "out", "w13", "w2"} and all(v > 0 for v in res["burst_ms"].values())
    assert res["burst_block_ms"] == pytest.approx(sum(res["burst_ms"].values()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_pcie_measures_on_a_gpu():
    proc = run_script("bench_pcie.py", "--mib", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pinned_GBps"] > 0 and out["pageable_GBps"] > 0 and out["pinned_8MiB_tensors_GBps"] > 0


def test_bench_weights_checks_its_repeats_and_needs_a_gpu(capsys, tiny_dir):
    assert run_script("bench_weights.py", "--help").returncode == 0
    code, err = refused("bench_weights.py", "--model", str(tiny_dir), "--repeats", "0", capsys=capsys)
    assert code == 2 and "--repeats 0: must be at least 1" in err
    if not torch.cuda.is_available():
        code, err = refused("bench_weights.py", "--model", str(tiny_dir), capsys=capsys)
        assert code == 2 and "needs a CUDA GPU" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_weights_times_both_copies_of_a_checkpoint(tiny_dir):
    proc = run_script("bench_weights.py", "--model", str(tiny_dir), "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bytes"] > 0 and set(out["rows"]) == {"staged", "pageable"}
    assert all(row["GBps"] > 0 for row in out["rows"].values())


def test_bench_pcie_checks_its_size_and_needs_a_gpu(capsys):
    assert run_script("bench_pcie.py", "--help").returncode == 0
    code, err = refused("bench_pcie.py", "--mib", "12", capsys=capsys)
    assert code == 2 and "--mib 12: must be a positive multiple of 8" in err
    if not torch.cuda.is_available():
        code, err = refused("bench_pcie.py", "--mib", "8", capsys=capsys)
        assert code == 2 and "CUDA GPU" in err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_fa3_parses_and_names_its_first_missing_input(tmp_path):
    script = str(SCRIPTS / "build_fa3.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("FA_REPO", "CUTLASS_REPO", "TORCH_WHEEL")}
    env["WORK"] = str(tmp_path / "work")  # were it to get past the check, it would build here
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode != 0 and "FA_REPO" in proc.stderr and not (tmp_path / "work").exists()


def test_bench_parallel_times_one_and_two_processes_in_one_run(tmp_path):
    proc = run_script(
        "bench_parallel.py", "--tiny", "--device", "cpu", "--parallel", "1", "2", "--sizes", "64",
        "--runs", "1", "--steps", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "parallel.json").read_text())["rows"]
    assert set(rows) == {"64x1", "64x2"}
    assert rows["64x1"]["speedup"] == 1.0 and rows["64x2"]["rel_err"] < 1e-5
    assert "| 64² | 2 |" in proc.stdout


def test_bench_parallel_refuses_a_run_without_its_baseline(capsys):
    code, err = refused("bench_parallel.py", "--parallel", "2", "4", capsys=capsys)
    assert code == 2 and "--parallel must include 1" in err


@pytest.mark.parametrize(
    ("weights", "plan"), [(["--quantize", "int8"], "resident + int8"), (["--gguf", "Q8_0"], "resident")]
)
def test_probe_int8_compile_reports_each_call_as_it_finishes(weights, plan):
    # On the GPU a call may run for minutes: each finished one is a line of its own, so a run cut
    # off by a timeout still says how far it got.
    if weights[0] == "--gguf":
        pytest.importorskip("gguf")
    args = ("--tiny", "--cap", "0", "--size", "32", "--steps", "1", *weights)
    proc = run_script("probe_int8_compile.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["what"] for line in lines] == ["placed", "first call", "second call"]
    assert lines[0]["plan"] == plan and lines[0]["compiled"] is True
    assert lines[2]["call_s"] > 0


def test_the_gpu_machine_scripts_parse():
    """scripts/gpu/ runs only on the workplace's GPU machine (README there): bash must parse each."""
    for path in sorted((SCRIPTS / "gpu").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
