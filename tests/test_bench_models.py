"""`zturbo bench --base`, `--gguf` and `--gguf-caps` end to end on the CPU with the tiny
architecture (the H100 rows are in docs/performance.md)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile

import numpy as np
import pytest
import torch

from zturbo.bench import base, common, ggufwrite
from zturbo.bench import memory as bench_memory
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
     (["--gguf", "Q8_0", "--gguf-caps", "Q8_0:4"], "--gguf runs on its own with random weights: drop --gguf-caps"),
     (["--images", "--gguf-caps", "Q8_0:4"], "--images runs on its own: drop"),
     (["--steps", "2"], "--steps and --gguf-dir set the --base and --gguf runs")],
)  # fmt: skip
def test_bad_model_row_options_are_refused_by_name(extra, message, capsys, tmp_path):
    assert main(["bench", "--tiny", "--sizes", "32", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_a_gguf_cap_row_runs_the_file_resident_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the row's GGUF file goes
    written = []
    write = ggufwrite.write_transformer
    monkeypatch.setattr(ggufwrite, "write_transformer", lambda path, *a: written.append(path) or write(path, *a))
    argv = ["bench", "--tiny", "--cap-row", "zturbo-gguf-Q8_0:0", "--sizes", "64", "--runs", "1", "--warmup", "0"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["plan"] == "resident" and row["compiled"] is True and row["median_s"] > 0 and row["fallbacks"] == []
    weights = row["transformer_weights"]  # the file the row ran, as the image's metadata names it
    assert weights["format"] == "gguf" and weights["quantization"] == "Q8_0" and weights["bytes"] > 0
    assert [p.parent.parent for p in written] == [tmp_path] and not any(tmp_path.iterdir())  # gone with the row
    # The planner counts the file's weights at their stored size: less than the float32 model's.
    plain = bench_memory.one_row(0.0, 64, runs=1, tiny=True)
    assert row["transformer_stored_gib"] > 0 and row["estimate_gib"] < plain["estimate_gib"]
    assert bench_memory.image_difference(row, plain) < 2.0  # Q8_0 draws nearly the same picture
    table = bench_memory.markdown([plain | {"kind": "zturbo"}, row | {"kind": "zturbo-gguf-Q8_0"}])
    assert "| none | resident |" in table and "| none (GGUF Q8_0 file) | resident |" in table
    assert "| 4 GiB (GGUF Q4_K file) | - |" in bench_memory.markdown(
        [{"cap_gib": 4.0, "kind": "zturbo-gguf-Q4_K", "error": "x"}]
    )


def test_a_gguf_cap_row_streams_the_files_blocks_as_stored(tmp_path):
    # 3.25 MB usable: too little for the tiny model's te-offload, enough to stream its GGUF blocks.
    build = ggufwrite.gguf_components("Q8_0", tmp_path)
    engine, row = bench_memory.capped_engine(0.50325, 64, tiny=True, build=build)
    assert row["plan"] == "block-offload (1 blocks resident)" and row["compiled"] is True
    transformer = engine.components.transformer
    stored = [p for p in transformer.parameters() if hasattr(p, "quant_type")]
    assert row["transformer_stored_gib"] * common.GIB == sum(p.numel() * p.element_size() for p in stored)
    streamer = engine.placement.streamers["transformer"]
    assert len(streamer.blocks) == 3  # of the tiny model's 4 blocks, 1 resident
    for block in streamer.blocks:  # streamed as stored: the Q8_0 bytes, viewed in a device slot
        weight = block.module.attention.to_q.weight
        assert weight.quant_type.name == "Q8_0" and weight.dtype == torch.uint8
        assert weight.untyped_storage().data_ptr() == streamer.slots[block.slot].untyped_storage().data_ptr()
    result = engine.generate(common.PROMPT, seed=common.SEED, width=64, height=64, steps=1)
    assert result.images[0].metadata["transformer_weights"]["quantization"] == "Q8_0"


def test_resident_gguf_weights_stay_unfused_where_plain_ones_fuse(tmp_path):
    gguf, _ = bench_memory.capped_engine(0, 64, tiny=True, build=ggufwrite.gguf_components("Q8_0", tmp_path))
    plain, _ = bench_memory.capped_engine(0, 64, tiny=True)
    assert gguf.placement.plan == plain.placement.plan == "resident"
    assert plain.accel.fused is not None  # q/k/v and w1/w3 as one GEMM each
    assert gguf.accel.fused is None  # GGUF weights stay in their dequantizing linears
    assert gguf.components.transformer.layers[0].attention.to_q.weight.quant_type.name == "Q8_0"


def test_gguf_caps_run_after_the_other_cap_rows_each_in_its_own_process(tmp_path, monkeypatch, capsys):
    cap_rows, flags = [], []

    def child(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        flags.append(cmd[cmd.index("--runs") + 2 :])  # what the parent's options hand every row
        cap_rows.append(cmd[cmd.index("--cap-row") + 1])
        cap = cap_rows[-1].partition(":")[2]
        row = {"cap_gib": float(cap), "plan": "resident", "estimate_gib": 1.0, "median_s": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench_memory.subprocess, "run", child)
    argv = ["bench", "--tiny", "--memory-caps", "0", "--fp8-caps", "4", "--gguf-caps", "Q8_0:4, Q4_K:2.5"]
    assert main([*argv, "--no-compile", "--sizes", "64", "--out", str(tmp_path)]) == 0
    # The tiny rows run on the CPU, without diffusers' reference rows (which measure a GPU).
    assert cap_rows == ["zturbo:0", "zturbo-fp8:4", "zturbo-gguf-Q8_0:4", "zturbo-gguf-Q4_K:2.5"]
    assert all(f == ["--tiny", "--no-compile"] for f in flags)
    table = (tmp_path / "bench_memory.md").read_text()
    assert "| 4 GiB (GGUF Q8_0 file) | resident |" in table and "| 2.5 GiB (GGUF Q4_K file) | resident |" in table
    assert "| 4 GiB (fp8) | resident |" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--gguf-caps", "Q5_K:4"], "--gguf-caps item 'Q5_K:4' is not TYPE:CAP: TYPE one of Q8_0, Q4_K"),
     (["--gguf-caps", "Q8_0"], "--gguf-caps item 'Q8_0' is not TYPE:CAP"),
     (["--gguf-caps", "Q8_0:4,Q4_K:lots"], "--gguf-caps item 'Q4_K:lots' is not TYPE:CAP"),
     (["--gguf-caps", "Q8_0:-1"], "CAP the GiB (0 = uncapped)"),
     (["--gguf-caps", "Q4_K:inf"], "--gguf-caps item 'Q4_K:inf' is not TYPE:CAP"),
     (["--gguf-caps", " , "], "--gguf-caps ' , ' names no TYPE:CAP"),
     (["--gguf-caps", ""], "--gguf-caps '' names no TYPE:CAP"),
     (["--memory-caps", "0", "--gguf-caps", "q8_0:4"], "--gguf-caps item 'q8_0:4' is not TYPE:CAP"),
     (["--cap-row", "zturbo-gguf-Q5_K:4"],
      "--cap-row 'zturbo-gguf-Q5_K:4': row kind 'zturbo-gguf-Q5_K' is not one of zturbo, zturbo-fp8")],
)  # fmt: skip
def test_bad_gguf_caps_are_refused_by_name_before_any_row(extra, message, tmp_path, monkeypatch, capsys):
    def child(cmd: list[str], **_: object) -> None:
        raise AssertionError(f"a row ran: {cmd}")

    monkeypatch.setattr(bench_memory.subprocess, "run", child)
    monkeypatch.setattr(ggufwrite, "write_transformer", child)
    assert main(["bench", "--tiny", "--sizes", "64", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
