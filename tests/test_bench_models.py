"""`zturbo bench --base` and `--gguf` end to end on the CPU with the tiny architecture (the H100
rows are in docs/performance.md)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from zturbo.bench import base, common
from zturbo.bench import speed as bench
from zturbo.bench.memory import thumbnail
from zturbo.cli import main
from zturbo.profiles import BASE, TURBO

pytest.importorskip("gguf")

CPU = torch.device("cpu")


def difference(a: list[float], b: list[float]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


def test_the_base_row_runs_the_base_profile_on_both_sides():
    opts = bench.BenchOptions(sizes=(32,), runs=1, warmup=0, tiny=True, compile=False)
    res = base.run(opts, steps=2)
    assert res["profile"]["name"] == "base" and res["scheduler_config"]["shift"] == BASE.shift
    assert res["request"]["guidance"] == BASE.guidance and res["request"]["negative_prompt"] == base.NEGATIVE_PROMPT
    ran = res["zturbo"]["ran"]  # what zturbo's image metadata says it ran
    assert (ran["steps"], ran["guidance_scale"], ran["negative_prompt"]) == (2, BASE.guidance, base.NEGATIVE_PROMPT)
    for side in ("zturbo", "diffusers_eager"):
        assert res[side]["median_s"] > 0 and "peak_gib" in res[side]
    assert res["zturbo"]["step_s"] == pytest.approx(res["zturbo"]["median_s"] / 2)
    # diffusers made zturbo's picture, and any one of the base settings changed makes another:
    # so both sides ran the shift, the guidance and the negative prompt.
    assert res["image_difference"] < 0.5
    engine = base.base_engine(CPU, torch.float32, tiny=True)
    turbo = common.random_engine(common.random_components(CPU, torch.float32, True), CPU, torch.float32)
    full = base.sampling(2)
    others = [
        (engine, dataclasses.replace(full, negative_prompt=None)),
        (engine, dataclasses.replace(full, guidance=TURBO.guidance)),
        (turbo, full),  # Turbo's scheduler shift
    ]
    for other_engine, request in others:
        image = common.zturbo_e2e(other_engine, 32, sampling=request)().images[0].image
        assert difference(thumbnail(image), res["thumbnails"]["diffusers"]) > 2
    table = base.markdown(res)
    # The row is labelled by what ran: eager here (compile=False), compiled where it compiled.
    assert res["zturbo"]["compiled"] is False
    assert "| zturbo eager |" in table and "| zturbo compiled |" not in table and "| diffusers eager |" in table
    compiled = {**res, "zturbo": {**res["zturbo"], "compiled": True}}
    assert "| zturbo compiled |" in base.markdown(compiled) and "| zturbo eager |" not in base.markdown(compiled)
    assert "2 steps, guidance 4 with a negative prompt" in table


def test_the_gguf_rows_run_zturbo_and_diffusers_on_each_file(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", "--tiny", "--gguf", "Q8_0,Q4_K", "--sizes", "32", "--steps", "1", "--runs", "1"]
    assert main([*args, "--warmup", "0", "--gguf-dir", str(tmp_path / "files"), "--out", str(out)]) == 0
    res = json.loads((out / "bench_gguf.json").read_text())
    assert res["steps"] == 1 and res["qtypes"] == ["Q8_0", "Q4_K"]
    assert res["files"]["Q8_0"]["types"] == {"F32": 41, "Q8_0": 24}
    assert res["files"]["Q4_K"]["types"]["Q4_K"] > 0  # the tiny model's few 256-wide rows
    assert all(file["write_s"] > 0 and file["bytes"] > 0 for file in res["files"].values())
    for weights in ("bf16", "Q8_0", "Q4_K"):
        for side in ("zturbo", "diffusers"):
            row = res["rows"][weights][side]
            assert "error" not in row, (weights, side, row)
            assert row["median_s"] > 0 and "peak_gib" in row and row["thumbnail"]
    rows = res["rows"]
    assert rows["Q8_0"]["zturbo"]["weights"]["quantization"] == "Q8_0"  # the image's metadata names the file
    assert rows["Q4_K"]["zturbo"]["weights"]["quantization"] == "Q4_K"
    sizes = [rows[w]["zturbo"]["transformer_gib"] for w in ("Q4_K", "Q8_0", "bf16")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[1] < sizes[2]  # the bytes each row held on the device
    assert rows["Q8_0"]["diffusers"]["transformer_gib"] == pytest.approx(sizes[1], rel=0.05)
    images = res["images"]
    for weights in ("bf16", "Q8_0", "Q4_K"):  # the same file gives the same picture in both runtimes
        assert images[f"{weights} zturbo vs diffusers"] < 0.5
    assert images["Q8_0 zturbo vs bf16 zturbo"] < images["Q4_K zturbo vs bf16 zturbo"]
    table = (out / "bench_gguf.md").read_text()
    assert "| Q4_K | diffusers eager |" in table and "| Q8_0 | zturbo compiled |" in table
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["transformer-Q4_K.gguf", "transformer-Q8_0.gguf"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--gguf", "Q5_K"], "'Q5_K' cannot be written here; the writer makes Q8_0, Q4_K"),
     (["--gguf", " , "], "names no GGUF type"),
     (["--base", "--gguf", "Q8_0"], "--base and --gguf are separate runs"),
     (["--base", "--lora"], "--base runs on its own with random weights: drop --lora"),
     (["--base", "--steps", "0"], "--steps 0 must be at least 1"),
     (["--steps", "2"], "--steps and --gguf-dir set the --base and --gguf runs")],
)  # fmt: skip
def test_bad_model_row_options_are_refused_by_name(extra, message, capsys, tmp_path):
    assert main(["bench", "--tiny", "--sizes", "32", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
