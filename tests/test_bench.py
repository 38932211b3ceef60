"""`zturbo bench` end to end on the CPU with the tiny architecture (the GPU numbers are in docs/)."""

from __future__ import annotations

import argparse

import pytest
import torch

from zturbo.bench import main as bench_main
from zturbo.bench import profiling, report
from zturbo.bench import speed as bench
from zturbo.cli import main
from zturbo.errors import InvalidRequestError


def test_tiny_bench_measures_every_phase_against_the_reference():
    opts = bench.BenchOptions(sizes=(32,), batch=2, runs=1, warmup=0, quantize=("none", "fp8"), tiny=True)
    res = bench.run(opts)
    assert res["eager"]["zturbo"][32]["median_s"] > 0 and res["eager"]["reference"][32]["median_s"] > 0
    for key in ("compiled_unfused", "compiled"):
        assert "error" not in res[key], res[key]
        assert res[key]["latent_rel_err_vs_eager"] < 1e-5  # traced graphs compute what eager does
    assert res["compiled"]["batch"]["images_per_s"] > 0
    assert res["fp8"] == {"skipped": "no fp8-capable GPU"}
    table = report.markdown(res)
    assert "| eager | 32² |" in table and "| compiled | 32² |" in table


def test_bench_needs_weights_named(capsys):
    assert main(["bench"]) == 2
    assert "--random-weights or --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("sizes", "1000,abc", "not a comma-separated list"), ("sizes", "1000", "multiples of 16"),
     ("quantize", "int3", "must be none or fp8")],
)  # fmt: skip
def test_bad_bench_options_name_the_value(flag, value, message):
    args = argparse.Namespace(
        random_weights=True, model=None, tiny=False, sizes="1024", batch=4, runs=5, warmup=1, quantize="none",
        no_reference=False, reference_compiled=False, no_compile=False, profile=False, first_image=False,
        no_fuse_ab=False,
    )  # fmt: skip
    setattr(args, flag, value)
    with pytest.raises(InvalidRequestError, match=message):
        bench_main.options(args)


def test_bench_runs_on_a_local_checkpoint_and_eager_vae_rows_say_so(tiny_dir):
    opts = bench.BenchOptions(
        sizes=(32,),
        runs=1,
        warmup=0,
        quantize=("none",),
        reference=False,
        tiny=True,
        model=str(tiny_dir),
        fuse_ab=False,
        eager_vae=True,
    )
    res = bench.run(opts)
    assert res["eager"]["reference"] == {} and res["compiled"]["sizes"][32]["median_s"] > 0
    assert res["compiled"]["latent_rel_err_vs_eager"] < 1e-5
    assert res["compiled"]["vae_compiled"] is False and "error" not in res["compiled"]
    assert "| compiled (eager VAE) | 32² |" in report.markdown(res)


def test_memory_cap_rows_on_the_tiny_model():
    from zturbo.bench import memory as bench_memory

    row = bench_memory.one_row(0.0, 64, runs=1, tiny=True)  # uncapped: the tiny model stays resident
    assert row["plan"] == "resident" and row["median_s"] > 0 and row["fallbacks"] == []
    assert row["estimate_gib"] > 0 and row["memory_plan_after"] == "resident"
    # Each stage's peak is recorded (on CUDA; None here) beside the estimate's stages.
    assert list(row["stage_peaks_gib"]) == ["encode", "prepare", "denoise", "check", "decode", "finish"]
    assert set(row["estimate_stages_gib"]) == {"encode", "image", "denoise", "decode"}
    assert "| none | resident |" in bench_memory.markdown([row | {"kind": "zturbo"}])
    assert row["decode_s"] > 0  # the decode alone, as the row runs it
    # Rows are compared by their image: the same weights and seed in every row, so the same picture.
    again = bench_memory.one_row(0.0, 64, runs=1, tiny=True, compile=False)  # --no-compile: the same image
    assert row["compiled"] and not again["compiled"]
    assert len(row["thumbnail"]) == 32 * 32 * 3 and bench_memory.image_difference(again, row) == 0.0
    other = again | {"thumbnail": [v + 3.0 for v in again["thumbnail"]]}
    assert bench_memory.image_difference(other, row) == pytest.approx(3.0)
    assert "| 3.00/255 |" in bench_memory.markdown([row | {"kind": "zturbo"}, other | {"kind": "zturbo"}])
    # A 0.5 GiB cap leaves nothing after the 0.5 GiB safety margin: the row says so.
    assert bench_memory.one_row(0.5, 64, runs=1, tiny=True)["error"].startswith("no plan fits: 0 GiB usable")


def test_a_quantized_cap_row_packs_the_quantized_weights():
    # Quantized before placement, as Engine.load does: the blocks te-offload lends to the text
    # encoder are packed int8 (block-offload streams them the same way).
    pytest.importorskip("torchao")
    from zturbo.bench import memory as bench_memory

    engine, row = bench_memory.capped_engine(0.505, 64, "int8", tiny=True)  # 5 MB usable on the tiny model
    assert row["plan"] == "te-offload (1 text-encoder layers resident) + int8"
    arena = engine.placement.streamers["arena"]
    weight = arena.modules["transformer"][0].feed_forward.w1.weight
    assert type(weight).__name__ == "Int8Tensor"
    assert weight.qdata.untyped_storage().data_ptr() == arena.arena.untyped_storage().data_ptr()
    assert bench_memory.KINDS[:3] == ("zturbo", "zturbo-fp8", "zturbo-int8")
    assert "| 4 GiB (int8) |" in bench_memory.markdown([{"cap_gib": 4.0, "kind": "zturbo-int8", "error": "x"}])


def test_loading_bench_on_the_tiny_model(tmp_path):
    from zturbo.bench import loading as bench_loading

    root = bench_loading.write_checkpoint(tmp_path / "ckpt", torch.device("cpu"))
    assert (root / "model_index.json").is_file() and list((root / "transformer").glob("*.safetensors"))
    rows = bench_loading.run_loading(root, tiny=True, repeats=1)
    assert [r["kind"] for r in rows] == ["zturbo", "diffusers"], rows
    assert all(r["seconds"] > 0 and r["rss_anon_growth_gib"] >= 0 and not r["cold_page_cache"] for r in rows)
    assert "| zturbo | warm |" in bench_loading.markdown(rows)


def test_idle_time_is_charged_to_the_stage_open_during_each_gap():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, device=DeviceType.CPU):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)

    events = [
        event("zturbo.request", 0, 1000),
        event("zturbo.encode", 0, 300),
        event("zturbo.denoise", 300, 900),
        event("aten::to", 850, 990),  # CPU work during the last gap
        event("zturbo.denoise", 320, 880, DeviceType.CUDA),  # the GPU-side mirror of a range: not work
        event("k1", 100, 250, DeviceType.CUDA),  # idle 0-100 (encode) and 250-400 (mostly denoise)
        event("k2", 400, 800, DeviceType.CUDA),
        event("Command Buffer Full", 800, 950, DeviceType.CUDA),  # a queue marker: not work
    ]
    idle = profiling.idle_by_stage(events, profiling.device_events(events))
    assert idle["idle_ms"] == pytest.approx((100 + 150 + 200) / 1000)
    assert idle["by_stage_ms"]["zturbo.encode"] == pytest.approx(0.1)
    assert idle["by_stage_ms"]["zturbo.denoise"] == pytest.approx(0.15)
    assert idle["by_stage_ms"]["(between stages)"] == pytest.approx(0.2)
    longest = idle["longest"][0]
    assert (longest["after"], longest["before"], longest["ms"]) == ("k2", "(request end)", pytest.approx(0.2))
    assert longest["cpu"][0].startswith("aten::to")


def test_profile_kinds_count_cutlass_attention_kernels_as_attention():
    fa3 = "void cutlass::device_kernel<flash::enable_sm90<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2"
    mem_efficient = "fmha_cutlassF_bf16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass"
    assert profiling.kernel_kind(fa3) == profiling.kernel_kind(mem_efficient) == "attention"
    assert profiling.kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert profiling.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "matmul"
    assert profiling.kernel_kind("triton_poi_fused__unsafe_view_mul_silu_split_2") == "other"


def test_the_lora_benchs_files_target_every_attention_and_ffn_linear_and_parse(tmp_path):
    """`zturbo bench --lora` writes its LoRAs in diffusers' keys; they map onto exactly the linears
    it says it patches (its GPU run is in docs/performance.md)."""
    from diffusers import ZImageTransformer2DModel

    from zturbo.adapters import formats
    from zturbo.bench import lora as bench_lora
    from zturbo.tiny import TRANSFORMER_CONFIG

    transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    targets = bench_lora.lora_targets(transformer)
    blocks = len(transformer.layers) + len(transformer.noise_refiner) + len(transformer.context_refiner)
    assert len(targets) == len(set(targets)) == 7 * blocks
    path = tmp_path / "a.safetensors"
    params = bench_lora.write_random_lora(path, transformer, rank=4, seed=1)
    parsed = formats.parse(*formats.read_file(path), formats.linear_targets(transformer))
    assert sorted(p.target for p in parsed.patches) == sorted(targets)
    assert {p.rank for p in parsed.patches} == {4}
    assert params == sum(4 * sum(transformer.get_submodule(t).weight.shape) for t in targets)


def test_image_inputs_bench_runs_every_row_beside_diffusers_on_the_tiny_model(tmp_path, capsys):
    """`zturbo bench --images` on the tiny model: each row beside diffusers' pipeline for it, on the
    same modules, inputs and seed (its GPU run is in docs/performance.md)."""
    import json

    from zturbo.bench import images as bench_images

    assert main(["bench", "--tiny", "--images", "--lora"]) == 2  # refused before any model is built
    assert "--images runs on its own" in capsys.readouterr().err
    argv = ["bench", "--tiny", "--images", "--sizes", "32", "--runs", "1", "--warmup", "0", "--no-compile"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("zturbo bench --images: 32x32, 8 steps")
    res = json.loads((tmp_path / "bench_images.json").read_text())
    rows = list(bench_images.ROWS)
    # The work of each row, counted on both sides: img2img at 0.5 runs 4 of the 8 steps, and the
    # ControlNet runs on every step of its two rows and on no other.
    forwards = {row: res["forwards"][row]["zturbo"] for row in rows}
    assert forwards == {row: res["forwards"][row]["diffusers"] for row in rows}
    assert forwards == {
        "txt2img": {"transformer": 8, "controlnet": 0},
        "img2img": {"transformer": 4, "controlnet": 0},
        "inpaint": {"transformer": 8, "controlnet": 0},
        "controlnet": {"transformer": 8, "controlnet": 8},
        "controlnet_inpaint": {"transformer": 8, "controlnet": 8},
    }
    for row in rows:
        assert res["compiled"][row]["median_s"] > 0 and res["compiled"][row]["fallbacks"] == [], row
        assert res["reference"][row]["median_s"] > 0, row
        # float32 on the CPU: the same picture as diffusers' (parity), so the rows time the same work
        assert res["images"][row]["compiled_vs_diffusers"] < 0.5, (row, res["images"][row])
    assert res["images"]["control_changes_image"] > 2  # the control image reaches the model
    overhead = res["compiled"]["controlnet"]["median_s"] / res["compiled"]["txt2img"]["median_s"]
    assert res["summary"]["controlnet_overhead"] == pytest.approx(overhead)
    table = (tmp_path / "bench_images.md").read_text()
    assert "| img2img | 4 (4) | 0 (0) |" in table and "| controlnet | 8 (8) | 8 (8) |" in table
    # Under a memory cap (a fresh process per cap on the GPU; here in this one): the plan, or why none fits.
    row = bench_images.capped_row(0.0, 32, runs=1, tiny=True, compile=False)
    assert row["plan"] == "resident" and row["median_s"] > 0 and row["fallbacks"] == []
    assert "| uncapped | resident |" in "\n".join(bench_images.capped_markdown([row], res))
    assert bench_images.capped_row(0.5, 32, runs=1, tiny=True)["error"].startswith("no plan fits: 0 GiB usable")
