"""The CLI: generate and info end to end, and every kind of bad input (a clear line, non-zero exit)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run
from zturbo.cli import main
from zturbo.imageio import read_metadata


def test_generate_writes_png_and_reports_path_and_seed(capsys, tiny_dir, tmp_path):
    target = tmp_path / "fox.png"
    code, out, err = run(
        capsys, "generate", "a red fox", "--model", str(tiny_dir), "--seed", "42",
        "--width", "64", "--height", "48", "--steps", "3", "--device", "cpu", "-o", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"{target}\tseed=42"
    assert "1 image(s) in" in err and "total" in err
    assert "transformer: float32 on cpu" in err  # one log line per component
    meta = read_metadata(target)
    assert (meta["seed"], meta["steps"], meta["width"], meta["height"]) == (42, 3, 64, 48)
    with Image.open(target) as im:
        assert im.size == (64, 48)


def test_generate_batch_into_directory_with_random_seed(capsys, tiny_dir, tmp_path):
    code, out, err = run(
        capsys, "generate", "a red fox", "--model", str(tiny_dir), "--batch", "2",
        "--width", "32", "--height", "32", "--steps", "1", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    seeds = [int(line.split("seed=")[1]) for line in lines]
    assert seeds[1] == seeds[0] + 1
    assert f"seed {seeds[0]} (random)" in err
    assert all(Path(line.split("\t")[0]).is_file() for line in lines)


def test_info_lists_versions_capabilities_and_dtypes(capsys):
    code, out, _ = run(capsys, "info", "--device", "cpu")
    assert code == 0
    for key in ("zturbo", "torch", "diffusers", "transformers", "CUDA", "bf16 / fp16 / fp8", "flash attention",
                "memory", "transformer dtype", "text encoder dtype", "vae dtype"):  # fmt: skip
        assert key in out


BAD_REQUESTS = [
    (["--width", "1000"], "width 1000 is not a multiple of 16 (the model's spatial unit); nearest valid: 992 or 1008"),
    (["--height", "8"], "height 8 is below the minimum of 16"),
    (["--steps", "0"], "steps 0 is out of range; allowed 1..100"),
    (["--steps", "101"], "steps 101 is out of range; allowed 1..100"),
    (["--batch", "0"], "batch 0 is out of range; allowed 1..64"),
    (["--guidance", "-1"], "guidance_scale -1.0 is out of range"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
    (["--seed", "-5"], "seed -5 is out of range"),
    (["--width", "4096", "--height", "4096"], "size 4096x4096 is 16777216 pixels, above the limit of 4194304"),
    (["--width", "512", "--height", "512", "--max-pixels", "1024"], "above the limit of 1024"),
    (["--batch", "2", "-o", "one.png"], "names one file but 2 images will be made"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "tpu"], "device 'tpu' is not a device name; use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cpu", "--quantize", "fp8"], "--quantize fp8 needs a GPU with fp8 matrix units"),
    (["--device", "cpu", "--quantize", "int4"], "--quantize int4 needs a CUDA GPU"),
    (["-o", "/proc/x.png"], "output /proc/x.png cannot be written: /proc refuses new files"),
    (["-o", "blocker/x.png"], "output blocker/x.png: blocker is a file, not a directory"),
    (["--batch", "2", "-o", "blocker"], "output blocker exists and is not a directory"),
    (
        ["--format", "webp", "-o", "x.png"],
        "output x.png is a png file name but the output format is webp; name the file x.webp or choose --format png",
    ),
    (["--format", "gif"], "output_format 'gif' is not one of png | webp | jpeg"),
    (["-o", "x.gif"], "output x.gif: gif is not an output format; use .png, .webp or .jpg (or a directory)"),
    (["--format", "jpg"], "output_format 'jpg' is not one of png | webp | jpeg"),
    (["--compression", "50"], "output_compression 50 applies to webp and jpeg only; png is lossless"),
    (["-o", "x.png", "--compression", "50"], "output_compression 50 applies to webp and jpeg only"),
    (["--format", "jpeg", "--compression", "101"], "output_compression 101 is out of range; allowed 0..100"),
    (["--format", "webp", "--compression", "high"], "output_compression 'high' is not a whole number"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available here")]),
]


@pytest.mark.parametrize(("args", "message"), BAD_REQUESTS)
def test_bad_requests_fail_with_one_clear_line(capsys, tiny_dir, tmp_path, monkeypatch, args, message):
    """Invalid parameters: exit 2 with one line naming the value, before the model loads (and so
    before a random seed is drawn and printed)."""
    from zturbo.engine import Engine

    def no_load(*a, **k):
        raise AssertionError("an invalid request must fail before the model loads")

    monkeypatch.setattr(Engine, "load", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("")
    code, out, err = run(capsys, "generate", "a fox", "--model", str(tiny_dir), *args)
    assert code == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1 and err.startswith("zturbo: error: ")
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([os.fsdecode(b"a fox \xff")], "prompt contains an unpaired surrogate (\\udcff at character 7)"),
        (["a fox", "--negative-prompt", "x\udcfe"], "negative_prompt contains an unpaired surrogate (\\udcfe"),
        (["a fox", "--lora", "ink\udcfe:0.5"], "LoRA name contains an unpaired surrogate (\\udcfe at character 4)"),
    ],
)
def test_text_that_is_not_utf8_is_refused_before_the_model_loads(
    capsys, tiny_dir, tmp_path, monkeypatch, args, message
):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates (surrogateescape:
    `os.fsdecode(b"\xff")` is "\udcff"); they are refused with exit 2, not a tokenizer traceback."""
    from zturbo.engine import Engine

    def no_load(*a, **k):
        raise AssertionError("an invalid request must fail before the model loads")

    monkeypatch.setattr(Engine, "load", no_load)
    code, out, err = run(capsys, "generate", *args, "--model", tiny_dir, "-o", tmp_path / "out")
    assert (code, out) == (2, "")
    assert message in err and "text must be valid UTF-8" in err
    assert err.count("\n") == 1 and err.startswith("zturbo: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_rejected(capsys, tiny_dir, prompt):
    code, _, err = run(capsys, "generate", prompt, "--model", str(tiny_dir))
    assert code == 2
    assert "prompt is empty" in err


def test_unknown_dtype_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a fox", "--dtype", "float8"])
    assert exc.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(capsys, tiny_dir, tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"keep me")
    code, _, err = run(capsys, "generate", "a fox", "--model", str(tiny_dir), "-o", str(target))
    assert code == 1
    assert "already exists; pass --overwrite" in err
    assert target.read_bytes() == b"keep me"


@pytest.fixture
def broken_copy(tiny_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    return copy


def test_missing_component_is_named(capsys, broken_copy):
    shutil.rmtree(broken_copy / "vae")
    code, _, err = run(capsys, "generate", "a fox", "--model", str(broken_copy))
    assert code == 1
    assert f"component directory {broken_copy / 'vae'} is missing" in err


def test_missing_shard_is_named(capsys, broken_copy):
    shard = sorted((broken_copy / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    code, _, err = run(capsys, "generate", "a fox", "--model", str(broken_copy))
    assert code == 1
    assert f"weight shard {shard} named in diffusion_pytorch_model.safetensors.index.json is missing" in err


def test_truncated_safetensors_is_named(capsys, broken_copy):
    shard = sorted((broken_copy / "transformer").glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "generate", "a fox", "--model", str(broken_copy), "--width", "32", "--height", "32")
    assert code == 1
    assert f"{shard} is corrupt or truncated" in err


def test_garbage_safetensors_is_named(capsys, broken_copy):
    shard = broken_copy / "vae" / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "generate", "a fox", "--model", str(broken_copy), "--width", "32", "--height", "32")
    assert code == 1
    assert f"{shard} is corrupt or truncated" in err


def test_not_a_model_name(capsys):
    code, _, err = run(capsys, "generate", "a fox", "--model", "no such thing")
    assert code == 1
    assert "is neither an existing directory nor a hub repo id" in err


def _cli_subprocess(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZTURBO_"))}
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "zturbo.cli", "generate", "a fox", "--model", "Tongyi-MAI/Z-Image-Turbo"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_offline_without_cache_says_how_to_proceed(tmp_path):
    proc = _cli_subprocess(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "is not in the local Hugging Face cache and the hub cannot be reached" in proc.stderr
    assert "pass --model a local directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_hub_without_cache_says_how_to_proceed(tmp_path):
    # Port 9 on loopback refuses at once: an unreachable hub without touching the network.
    proc = _cli_subprocess(tmp_path, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"})
    assert proc.returncode == 1
    assert "pass --model a local directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("user_setting", "expected"), [(None, "expandable_segments:True"), ("backend:native", None)])
def test_engine_processes_turn_on_expandable_segments_unless_the_user_configured_the_allocator(
    monkeypatch, user_setting, expected
):
    from zturbo.config import cache_root, process_defaults

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    if user_setting is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_setting)
    process_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (expected or user_setting)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_root() / "inductor")  # Inductor's cache with zturbo's


def test_quiet_prints_nothing_on_stderr_even_on_the_first_tiny_random_use(tmp_path):
    # A fresh cache: the tiny checkpoint is written in this run, and every library is imported.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZTURBO_"))}
    env.update(ZTURBO_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    argv = ["generate", "a fox", "--model", "tiny-random", "--device", "cpu", "--width", "32", "--height", "32",
            "--steps", "1", "-q", "-o", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "zturbo.cli", *argv], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    (line,) = proc.stdout.splitlines()
    assert Path(line.split("\t")[0]).is_file() and "\tseed=" in line


def test_quiet_leaves_the_libraries_settings_as_it_found_them(capsys, tiny_dir, tmp_path):
    import logging

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    before = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    code, _, err = run(capsys, "generate", "a fox", "--model", str(tiny_dir), "--width", "32", "--height", "32",
                       "--steps", "1", "-q", "-o", str(tmp_path / "out"))  # fmt: skip
    assert code == 0 and err == ""
    assert (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()) == before
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    assert logging.getLogger("torchao").level == logging.NOTSET


def test_generate_from_a_png_uses_the_model_recorded_in_it(capsys, tmp_path):
    # `tiny-random` is a name only zturbo knows: the default hub model would fail here (no network).
    first = tmp_path / "first.png"
    code, _, err = run(capsys, "generate", "a fox", "--model", "tiny-random", "--seed", "5", "--width", "32",
                       "--height", "32", "--steps", "2", "-o", str(first))  # fmt: skip
    assert code == 0, err
    again = tmp_path / "again.png"
    code, out, err = run(capsys, "generate", "--from", str(first), "-o", str(again))
    assert code == 0, err
    assert f"model tiny-random, as recorded in {first} (--model chooses another)" in err
    assert out.strip() == f"{again}\tseed=5"
    assert read_metadata(again)["model"] == "tiny-random"
    with Image.open(first) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_from_a_png_whose_model_is_not_here_says_so_and_uses_the_configured_one(
    capsys, monkeypatch, tmp_path, tiny_dir
):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, moved)
    first = tmp_path / "first.png"
    code, _, err = run(capsys, "generate", "a fox", "--model", str(moved), "--seed", "5", "--width", "32",
                       "--height", "32", "--steps", "2", "-o", str(first))  # fmt: skip
    assert code == 0, err
    assert read_metadata(first)["model"] == str(moved.resolve())  # found from any working directory
    shutil.rmtree(moved)
    given = ("--model", str(tiny_dir), "-o", str(tmp_path / "a.png"))
    code, _, err = run(capsys, "generate", "--from", str(first), *given)
    assert code == 0 and "as recorded" not in err and "not available" not in err
    with monkeypatch.context() as m:
        m.setenv("ZTURBO_MODEL", str(tiny_dir))
        code, out, err = run(capsys, "generate", "--from", str(first), "-o", str(tmp_path / "b.png"))
    assert code == 0, err
    assert "not available" not in err and out.strip() == f"{tmp_path / 'b.png'}\tseed=5"
    code, _, err = run(capsys, "generate", "--from", str(first), "-o", str(tmp_path / "c.png"))
    assert code == 1  # the default hub model is out of reach here
    assert f"the model recorded in {first} is not available here" in err and "pixels may differ" in err


def test_quantize_help_names_every_mode():
    from zturbo.cli import build_parser
    from zturbo.config import QUANTIZE_CHOICES

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("generate", "batch", "info", "serve"):
        (quantize,) = [a for a in subcommands.choices[command]._actions if a.dest == "quantize"]
        assert all(mode in quantize.help for mode in QUANTIZE_CHOICES), (command, quantize.help)


def test_info_plan_says_which_plan_the_engine_loads_with(capsys, tiny_dir):
    base = ["info", "--device", "cpu", "--model", str(tiny_dir), "--plan", "--vram-budget", "24"]
    code, out, _ = run(capsys, *base)
    assert code == 0
    assert "plan for 1024x1024, batch 1" in out
    assert out.rstrip().endswith(
        "with --memory auto the engine loads with the chosen plan (it plans for 1024x1024, batch 1)"
    )
    code, out, _ = run(capsys, *base, "--width", "2048", "--height", "2048", "--batch", "4")
    assert code == 0
    assert "plan for 2048x2048, batch 4" in out
    last = out.rstrip().splitlines()[-1]
    assert "the chosen plan" not in last
    assert "its choice for 1024x1024, batch 1; a 2048x2048, batch 4 request then tiles the VAE decode" in last
    code, out, _ = run(capsys, *base, "--memory", "model-offload")
    assert out.rstrip().splitlines()[-1] == "with --memory model-offload the engine loads with that plan"
    # Where nothing fits, plain weights load with the leanest plan; quantized ones are refused.
    tight = [*base[:-1], "0.001", "--width", "512", "--height", "512"]
    code, out, _ = run(capsys, *tight)
    assert "loads with the leanest plan (none fits)" in out.rstrip().splitlines()[-1]
    code, out, _ = run(capsys, *tight, "--quantize", "int8")
    assert out.rstrip().splitlines()[-1] == (
        "with --memory auto no plan fits 1024x1024, batch 1: the engine refuses to load (see the table above)"
    )
