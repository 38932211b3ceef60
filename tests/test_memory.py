"""The memory estimator against H100 measurements, the planner's choices, VAE tiling and OOM recovery."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from zturbo.accel import compile as accel
from zturbo.accel import fuse, graphs
from zturbo.cli import main
from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
from zturbo.errors import GPUMemoryError, InvalidRequestError
from zturbo.memory import placement as placing
from zturbo.memory import plan as memory
from zturbo.memory.plan import Layout
from zturbo.testing import inject_oom

GIB = memory.GIB
BF16 = {"transformer": 2, "text_encoder": 2, "vae": 2}


# Peak torch.cuda.max_memory_allocated on an H100, real architecture, random weights, bf16, 8 steps:
# zturbo eager all resident (docs/performance.md, 58-token prompt), and diffusers 0.42.1 with
# enable_model_cpu_offload and with leaf-level group offload (design.md §2, 128-token embeddings).
MEASURED = [
    ("resident", 512, 1, 64, 19.9),
    ("resident", 1024, 1, 64, 21.7),
    ("resident", 1536, 1, 64, 24.7),
    ("resident", 2048, 1, 64, 28.8),
    ("resident", 1024, 4, 64, 21.56),  # decoded one image at a time (pipeline.decode)
    ("model-offload", 1024, 1, 128, 12.1),
    ("sequential", 1024, 1, 128, 2.6),
]


@pytest.mark.parametrize(("plan", "size", "batch", "tokens", "measured"), MEASURED)
def test_estimate_within_ten_percent_of_h100_measurements(shape, plan, size, batch, tokens, measured):
    est = memory.estimate(shape, BF16, plan=plan, width=size, height=size, batch=batch, prompt_tokens=tokens)
    assert abs(est.peak / GIB - measured) / measured <= 0.10, (est.peak / GIB, measured)


# zturbo's own plans on the same H100, compiled, 58-token prompt (docs/performance.md):
# (plan, resident blocks, resident text-encoder layers, VAE tiling, size, measured peak GiB).
MEASURED_PLANS = [
    ("resident", 0, 0, False, 512, 19.71),
    ("resident", 0, 0, False, 1024, 20.46),
    ("resident", 0, 0, False, 1536, 23.71),
    ("resident", 0, 0, False, 2048, 27.22),
    ("te-offload", 0, 10, False, 1024, 15.16),
    ("te-offload", 0, 8, False, 1024, 14.79),
    ("te-offload", 0, 3, False, 1024, 13.90),
    ("te-offload", 0, 0, False, 1024, 13.33),
    ("block-offload", 28, 0, True, 1024, 11.30),
    ("block-offload", 16, 0, True, 1024, 7.22),
    ("block-offload", 10, 0, True, 1024, 5.19),
    ("block-offload", 4, 0, True, 1024, 3.15),
    ("resident", 0, 0, True, 2048, 20.57),
]


@pytest.mark.parametrize(("plan", "blocks", "layers", "tiling", "size", "measured"), MEASURED_PLANS)
def test_streaming_and_tiling_estimates_within_ten_percent(shape, plan, blocks, layers, tiling, size, measured):
    est = memory.estimate(
        shape,
        BF16,
        plan=plan,
        width=size,
        height=size,
        prompt_tokens=64,
        vae_tiling=tiling,
        resident_blocks=blocks,
        resident_layers=layers,
        compiled_vae=True,
    )
    assert abs(est.peak / GIB - measured) / measured <= 0.10, (est.peak / GIB, measured)


def test_a_compiled_decoder_is_estimated_leaner_only_where_it_was_measured_leaner(shape):
    def decode(plan: str = "resident", size: int = 1024, **kw) -> int:
        return memory.estimate(shape, BF16, plan=plan, width=size, height=size, **kw).stages["decode"]

    unit = 1024 * 1024 * shape.vae_channels * 2  # one full-resolution decoder tensor at 1024²
    # 1024² has its own static graph (accel.STATIC_DECODE_SIZE); other sizes share a dynamic one.
    assert accel.STATIC_DECODE_SIZE == 1024
    static = memory.VAE_LIVE_TENSORS - memory.VAE_LIVE_TENSORS_STATIC
    dynamic = memory.VAE_LIVE_TENSORS - memory.VAE_LIVE_TENSORS_COMPILED
    assert static > dynamic > 0
    assert decode() - decode(compiled_vae=True) == static * unit
    assert decode(size=2048) - decode(size=2048, compiled_vae=True) == dynamic * 4 * unit
    assert decode(size=512) - decode(size=512, compiled_vae=True) == dynamic * unit // 4
    # Tiled decodes measured at the eager count; the sequential plan never compiles.
    assert decode(vae_tiling=True) == decode(vae_tiling=True, compiled_vae=True)
    assert decode("sequential") == decode("sequential", compiled_vae=True)
    # At 16 GiB the room freed keeps more text-encoder layers resident: 10 with the static graph's
    # count (docs/performance.md), 6 with the dynamic graph's, 3 with the eager one.
    compiled = memory.choose(shape, BF16, 16 * GIB, width=1024, height=1024, compiled_vae=True).chosen
    assert compiled is not None and compiled.label() == "te-offload (10 text-encoder layers resident)"
    eager = memory.choose(shape, BF16, 16 * GIB, width=1024, height=1024).chosen
    assert eager is not None and eager.label() == "te-offload (3 text-encoder layers resident)"


@pytest.mark.parametrize(
    ("budget", "size", "expected"),
    [
        (80, 1024, "resident"),
        (80, 2048, "resident"),
        (24, 1024, "resident"),
        (24, 2048, "resident + vae-tiling"),
        (16, 1024, "te-offload (3 text-encoder layers resident)"),
        (16, 2048, "te-offload (9 text-encoder layers resident) + vae-tiling"),
        # Streaming: as many of the 34 blocks resident as fit, tiling the decode when that lets more stay.
        (12, 1024, "block-offload (28 blocks resident) + vae-tiling"),
        (8, 1024, "block-offload (16 blocks resident) + vae-tiling"),
        (8, 2048, "block-offload (14 blocks resident) + vae-tiling"),
        (4, 1024, "block-offload (4 blocks resident) + vae-tiling"),
        (2, 1024, "sequential + vae-tiling"),
    ],
)
def test_planner_table(shape, budget, size, expected):
    choice = memory.choose(shape, BF16, budget * GIB, width=size, height=size)
    assert choice.chosen is not None and choice.chosen.label() == expected
    usable = budget * GIB - max(int(budget * GIB * 0.05), GIB // 2)
    assert choice.chosen.peak <= usable and choice.considered[-1] is choice.chosen
    # Everything tried before the choice (all faster) does not fit.
    assert all(e.peak > usable for e in choice.considered[:-1])


def test_smaller_budget_never_gets_a_faster_plan(shape):
    previous = (0, -shape.transformer_block_count)
    for budget in [b / 4 for b in range(320, 7, -1)]:
        chosen = memory.choose(shape, BF16, int(budget * GIB), width=1024, height=1024).chosen
        assert chosen is not None
        rank = (memory.SPEED_ORDER.index(chosen.plan), -chosen.resident_blocks)
        assert rank >= previous, budget
        previous = rank
    assert previous[0] == memory.SPEED_ORDER.index("sequential")


def test_block_offload_keeps_the_most_blocks_that_fit(shape):
    usable = memory.usable_budget(8 * GIB)
    est = memory.fitting(shape, BF16, usable, plan="block-offload", width=1024, height=1024, vae_tiling=True)
    more = memory.estimate(
        shape,
        BF16,
        plan="block-offload",
        width=1024,
        height=1024,
        vae_tiling=True,
        resident_blocks=est.resident_blocks + 1,
    )
    assert est.peak <= usable < more.peak
    # Each resident block adds one block's weights; the two streaming slots are always there.
    assert more.peak - est.peak == shape.transformer_block_params * 2


def test_only_the_plain_weight_plan_refuses_quantized_weights(shape):
    with pytest.raises(ValueError, match="sequential runs plain weights only and cannot run a fp8-quantized"):
        memory.estimate(shape, BF16, plan="sequential", width=1024, height=1024, quantize="fp8")
    choice = memory.choose(shape, BF16, 2 * GIB, width=1024, height=1024, quantize_options=("int4",), exact=False)
    assert all(e.plan != "sequential" for e in choice.considered)
    assert "block-offload" in {e.plan for e in choice.considered}


def test_streamed_blocks_are_counted_at_their_quantized_size(shape):
    bf16, int8 = memory.block_bytes(shape, 2, "none"), memory.block_bytes(shape, 2, "int8")
    fp8, int4 = memory.block_bytes(shape, 2, "fp8"), memory.block_bytes(shape, 2, "int4")
    assert bf16 == [weights * 2 for weights, _, _ in shape.transformer_block_weights]
    # A main block: its linears at a byte a weight (half a byte in int4), adaLN and norms in bf16.
    main = 2 + 2  # after the two noise-refiner and two context-refiner blocks
    weights, linear, fp8_linear = shape.transformer_block_weights[main]
    assert int8[main] == fp8[main] == (weights - linear) * 2 + linear and linear == fp8_linear
    assert int4[main] == (weights - linear) * 2 + linear // 2
    assert 0.5 < int8[main] / bf16[main] < 0.52
    # fp8 leaves the caption refiner's blocks plain (accel.quantize.FP8_PLAIN_BLOCKS).
    assert fp8[2] == bf16[2] > int8[2]
    # Everything outside the blocks stays plain: the quantized totals add up with it.
    outside = (shape.transformer_params - shape.transformer_blocks_params) * 2
    assert memory._transformer_bytes(shape, 2, "int8") == outside + sum(int8)


def test_the_planner_keeps_more_8_bit_blocks_resident_under_the_same_cap(shape):
    plans = {}
    for quantize in ("none", "int8", "fp8"):
        options = () if quantize == "none" else (quantize,)
        request = {"width": 1024, "height": 1024, "compiled_vae": True}
        choice = memory.choose(shape, BF16, 4 * GIB, quantize_options=options, exact=not options, **request)
        assert choice.chosen is not None and choice.chosen.plan == "block-offload"
        plans[quantize] = choice.chosen
    assert plans["none"].label() == "block-offload (4 blocks resident) + vae-tiling"
    assert plans["int8"].resident_blocks >= 2 * plans["none"].resident_blocks
    assert plans["none"].resident_blocks < plans["fp8"].resident_blocks <= plans["int8"].resident_blocks

    # Each step moves what streams: under 8-bit weights under half the bf16 plan's bytes.
    def moved(est: memory.Estimate) -> int:
        sizes = memory.block_bytes(shape, 2, est.quantize)
        return sum(sizes[i] for i in memory.streamed_positions(len(sizes), len(sizes) - est.resident_blocks))

    assert moved(plans["int8"]) < 0.5 * moved(plans["none"])


def test_fp8_keeps_two_blocks_fewer_resident_than_int8_for_the_caption_refiners_plain_weights(shape):
    # Under 4 GiB at 1024²: int8 keeps 11 of 34 blocks, fp8 9. Both count a byte a weight (per-row
    # scales are ~0.1 % of a block, counted for neither), but fp8 leaves the two caption-refiner
    # blocks in bf16 (FP8_PLAIN_BLOCKS): 354 MB each instead of 177, resident or streamed (a
    # streamed one widens its slot by the same bytes), which is two 185 MB main blocks' room.
    request = {"width": 1024, "height": 1024, "compiled_vae": True, "exact": False}

    def resident(s: memory.ModelShape, quantize: str) -> int:
        return memory.choose(s, BF16, 4 * GIB, quantize_options=(quantize,), **request).chosen.resident_blocks

    assert (resident(shape, "int8"), resident(shape, "fp8")) == (11, 9)
    plain = memory.block_bytes(shape, 2, "fp8")[2] - memory.block_bytes(shape, 2, "int8")[2]
    assert 2 * plain == shape.transformer_fp8_plain_params == 353_894_400
    # Were the caption refiners quantized too, fp8 would keep what int8 keeps.
    blocks = tuple((weights, linear, linear) for weights, linear, _ in shape.transformer_block_weights)
    all_fp8 = dataclasses.replace(shape, transformer_fp8_plain_params=0, transformer_block_weights=blocks)
    assert resident(all_fp8, "fp8") == 11


def test_nothing_fits_is_reported(shape):
    choice = memory.choose(shape, BF16, GIB, width=2048, height=2048)
    assert choice.chosen is None and len(choice.considered) == 2 * len(memory.SPEED_ORDER)


def test_quantization_shrinks_only_the_transformer(shape):
    base = memory.estimate(shape, BF16, plan="resident", width=1024, height=1024)
    fp8 = memory.estimate(shape, BF16, plan="resident", width=1024, height=1024, quantize="fp8")
    int4 = memory.estimate(shape, BF16, plan="resident", width=1024, height=1024, quantize="int4")
    saved = base.stages["denoise"] - fp8.stages["denoise"]
    # One byte less per quantized weight; fp8 leaves the caption refiner's two blocks plain.
    assert saved == shape.transformer_linear_params - shape.transformer_fp8_plain_params
    assert 0 < shape.transformer_fp8_plain_params < 0.1 * shape.transformer_linear_params
    assert base.stages["denoise"] - int4.stages["denoise"] == int(1.5 * shape.transformer_linear_params)


def test_info_plan_prints_the_choice(capsys, tiny_dir):
    code = main(["info", "--model", str(tiny_dir), "--device", "cpu", "--plan", "--vram-budget", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "budget 4.00 GiB (--vram-budget)" in out
    assert "resident" in out and "<- chosen" in out


def test_info_plan_needs_a_budget_without_a_gpu(capsys, tiny_dir):
    assert main(["info", "--model", str(tiny_dir), "--device", "cpu", "--plan"]) == 2
    assert "pass --vram-budget" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# VAE tiling and out-of-memory recovery (CPU, tiny model, simulated OOM)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.float64)


def test_tiled_decode_is_close_to_untiled(fresh):
    params = {"seed": 1, "steps": 2, "width": 512, "height": 512}
    whole = pixels(fresh.generate("a red fox", **params))
    placing.set_vae_tiling(fresh.components.vae, True, tile=256)  # 4 tiles (with overlap: 9) of 512²
    tiled = pixels(fresh.generate("a red fox", **params))
    # Blended seams differ a little; a different image would be ~50 off (std of the image ~45).
    assert 0 < np.abs(tiled - whole).mean() <= 3


def test_out_of_memory_in_decode_retries_once_tiled(fresh, caplog):
    inject_oom(fresh.components.vae.decoder)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        result = fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)
    record = {"component": "vae", "from": "whole-image decode", "to": "tiled decode"}
    assert len(result.fallbacks) == 1 and result.fallbacks[0].items() >= record.items()
    assert "simulated" in result.fallbacks[0]["reason"]
    meta = result.images[0].metadata
    assert meta["fallbacks"] == result.fallbacks and meta["vae_tiling"] is True
    assert any("retrying with a tiled decode" in r.getMessage() for r in caplog.records)
    assert np.isfinite(pixels(result)).all()
    # Healthy afterwards: the next request runs without another fallback.
    assert fresh.generate("a red fox", seed=1, steps=2, width=64, height=64).fallbacks == []


def test_out_of_memory_in_the_transformer_moves_to_a_leaner_plan_once(fresh, engine, caplog):
    expected = pixels(engine.generate("a red fox", seed=1, steps=2, width=64, height=64))
    inject_oom(fresh.components.transformer)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        result = fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)
    got = [(f["component"], f["from"], f["to"].split(" (")[0]) for f in result.fallbacks]
    assert got == [("memory", "resident", "te-offload")]
    assert result.images[0].metadata["memory_plan"].startswith("te-offload")
    assert np.array_equal(pixels(result), expected)
    assert any("retrying with te-offload" in r.getMessage() for r in caplog.records)
    # The plan sticks, and the next request needs no retry.
    assert fresh.generate("a red fox", seed=1, steps=2, width=64, height=64).fallbacks == []


def test_out_of_memory_twice_is_a_clear_error_and_the_engine_stays_usable(fresh):
    inject_oom(fresh.components.transformer, times=2)
    with pytest.raises(GPUMemoryError, match=r"simulated.*memory plan te-offload[^:]*: 64x64, 1 image\(s\) need about"):
        fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)
    assert fresh.generate("a red fox", seed=1, steps=2, width=64, height=64).fallbacks == []


def test_out_of_memory_error_lists_only_the_plans_leaner_than_the_current_one(fresh):
    inject_oom(fresh.components.transformer, times=2)
    with pytest.raises(GPUMemoryError) as caught:
        fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)
    message = str(caught.value)
    assert "a leaner --memory plan (block-offload, model-offload, sequential)" in message  # now at te-offload
    assert "memory is the host's" in message and "--quantize fp8" in message


def test_a_quantized_transformer_streams_after_running_out_of_memory_and_stops_there(tiny_dir):
    pytest.importorskip("torchao")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8")
    args = {"seed": 1, "steps": 2, "width": 64, "height": 64}
    expected = pixels(Engine.load(config).generate("a red fox", **args))
    engine = Engine.load(config)
    engine.placement.change(Layout("te-offload", quantize="int8"))
    inject_oom(engine.components.transformer)
    result = engine.generate("a red fox", **args)  # retried with the quantized blocks streamed
    assert engine.placement.plan == "block-offload" and result.fallbacks[0]["to"].startswith("block-offload")
    assert np.array_equal(pixels(result), expected)
    inject_oom(engine.components.transformer)
    with pytest.raises(GPUMemoryError) as caught:  # sequential runs plain weights only: no further retry
        engine.generate("a red fox", **args)
    message = str(caught.value)
    assert "sequential" not in message.split("Options:")[1].split("--quantize none")[0]
    assert "--quantize none" in message and engine.placement.plan == "block-offload"


@pytest.mark.parametrize("plan", memory.PLANS)
def test_every_plan_gives_the_resident_image(tiny_dir, engine, plan):
    # On the CPU the moves are CPU to CPU; what this checks is that each plan's hooks and stage
    # moves leave the computation unchanged (GPU memory and speed are measured with zturbo bench).
    expected = pixels(engine.generate("a red fox", seed=1, steps=2, width=64, height=64))
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", memory=plan))
    result = planned.generate("a red fox", seed=1, steps=2, width=64, height=64)
    assert result.images[0].metadata["memory_plan"].startswith(plan)
    assert np.array_equal(pixels(result), expected)


@pytest.mark.parametrize(("plan", "resident"), [("block-offload", 0), ("block-offload", 3), ("te-offload", 0)])
def test_streamed_int8_weights_give_the_image_of_the_same_weights_resident(tiny_dir, plan, resident):
    # int8 weight-only runs on the CPU; block-offload streams the quantized blocks, te-offload
    # lends the last blocks' (quantized) memory to text-encoder layers.
    pytest.importorskip("torchao")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8")
    args = {"seed": 1, "steps": 2, "width": 64, "height": 64}
    expected = pixels(Engine.load(config).generate("a red fox", **args))
    planned = Engine.load(dataclasses.replace(config, memory=plan))
    planned.placement.change(Layout(plan, resident_blocks=resident, quantize="int8"))
    streamer = planned.placement.streamers["transformer" if plan == "block-offload" else "arena"]
    for prompt in ("a red fox", "a cat", "a red fox"):  # the arena takes turns; a cached prompt too
        result = planned.generate(prompt, **args)
        if prompt == "a red fox":
            assert np.array_equal(pixels(result), expected)
    assert result.images[0].metadata["memory_plan"].startswith(plan)
    # The streamed blocks' weights are still int8, and their host copies hold int8 bytes.
    blocks = [b.module for b in streamer.blocks] if plan == "block-offload" else streamer.modules["transformer"]
    weight = blocks[0].feed_forward.w1.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    hosts = [b.host for b in streamer.blocks] if plan == "block-offload" else [streamer.hosts["transformer"]]
    stored = sum(_aligned(t) for b in blocks for t in _stored_tensors(b))
    assert sum(h.numel() for h in hosts) == stored < sum(p.numel() * 4 for b in blocks for p in b.parameters())


def test_int8_weights_taking_turns_under_model_offload_give_the_resident_image(tiny_dir):
    # The stages move the quantized transformer whole, inside a request (inference mode).
    pytest.importorskip("torchao")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8")
    args = {"seed": 1, "steps": 2, "width": 64, "height": 64}
    expected = pixels(Engine.load(config).generate("a red fox", **args))
    planned = Engine.load(dataclasses.replace(config, memory="model-offload"))
    assert np.array_equal(pixels(planned.generate("a red fox", **args)), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming through CUDA slots needs a GPU")
@pytest.mark.parametrize("quantize", ["fp8", "int8"])
def test_streamed_quantized_weights_on_the_gpu_give_the_resident_image(tiny_dir, quantize):
    pytest.importorskip("torchao")
    if quantize == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    config = RuntimeConfig(model=str(tiny_dir), device="cuda", dtype="bfloat16", quantize=quantize, compile="off")
    args = {"seed": 1, "steps": 2, "width": 64, "height": 64}
    expected = pixels(Engine.load(config).generate("a red fox", **args))
    planned = Engine.load(dataclasses.replace(config, memory="block-offload"))
    planned.placement.change(Layout("block-offload", quantize=quantize))  # every block streams
    streamer = planned.placement.streamers["transformer"]
    weights = [p for b in streamer.blocks for p in b.module.parameters()]
    assert any(type(w) not in (torch.Tensor, torch.nn.Parameter) for w in weights)  # torchao skips odd widths
    assert all(w.device.type == "cuda" for w in weights)
    for prompt in ("a red fox", "a cat", "a red fox"):
        result = planned.generate(prompt, **args)
    assert np.array_equal(pixels(result), expected)


def _stored_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a module stores: a quantized weight's inner tensors, else the tensor."""
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        out += [getattr(t, n) for n in flatten(t)[0]] if flatten else [t]
    return out


def _aligned(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // 256) * 256  # memory.stream.ALIGN


def test_te_offload_with_resident_layers_gives_the_resident_image(tiny_dir, engine):
    expected = pixels(engine.generate("a red fox", seed=1, steps=2, width=64, height=64))
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))
    planned.placement.change(Layout("block-offload", resident_blocks=3, resident_layers=1))  # no shared memory there
    assert len(planned.placement.streamers["text_encoder"].blocks) == 1  # 2 of the tiny text encoder's 3 layers run
    result = planned.generate("a red fox", seed=1, steps=2, width=64, height=64)
    assert np.array_equal(pixels(result), expected)


def test_te_offload_shares_transformer_memory_and_every_turn_gives_the_resident_image(tiny_dir, engine):
    prompts = ["a red fox", "a cat", "a red fox"]
    expected = [pixels(engine.generate(p, seed=1, steps=2, width=64, height=64)) for p in prompts]
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", memory="te-offload"))
    placed = planned.placement
    arena = placed.streamers["arena"]
    blocks = list(planned.components.transformer.layers)[-placing.SHARED_BLOCKS :]
    assert arena.modules["transformer"] == blocks and placed.shared_layers == 2  # both layers that run
    assert placed.streamers["text_encoder"].blocks == []  # nothing left to stream on the tiny model
    assert (
        placed.describe()
        == f"te-offload (0/2 text-encoder layers resident, 2 sharing memory with {len(blocks)} blocks)"
    )
    # New prompt, new prompt, then a cached one (no encoding: the blocks must come back all the same).
    for prompt, want in zip(prompts, expected, strict=True):
        assert np.array_equal(pixels(planned.generate(prompt, seed=1, steps=2, width=64, height=64)), want)
    # Blocks at load; the first image's layers come by a layer's hook; then per image the blocks
    # come back before denoising and the layers are prefetched at the decode.
    assert arena.holder == "text_encoder" and arena.fills == 2 + 2 * len(prompts)
    # Views of one buffer: a block's weight and a layer's weight start at the same device address.
    first_block, first_layer = arena.tensors["transformer"][0], arena.tensors["text_encoder"][0]
    assert first_block.packed.offset == first_layer.packed.offset == 0


@pytest.mark.parametrize("resident", [0, 1, 3])
def test_block_offload_with_resident_blocks_gives_the_resident_image(tiny_dir, engine, resident):
    expected = [pixels(engine.generate(p, seed=1, steps=2, width=64, height=64)) for p in ("a red fox", "a cat")]
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))
    planned.placement.change(Layout("block-offload", resident))
    streamed = planned.placement.streamers["transformer"]
    assert len(streamed.blocks) == 4 - resident  # the tiny transformer has 4 blocks in all
    # Two prompts: the second pass through the blocks starts from the slots the first left behind.
    for prompt, want in zip(("a red fox", "a cat"), expected, strict=True):
        result = planned.generate(prompt, seed=1, steps=2, width=64, height=64)
        assert result.images[0].metadata["memory_plan"] == f"block-offload ({resident}/4 blocks resident)"
        assert np.array_equal(pixels(result), want)


def test_with_tiling_off_a_decode_out_of_memory_takes_a_leaner_plan_instead(tiny_dir):
    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", vae_tiling="off"))
    inject_oom(engine.components.vae.decoder)
    result = engine.generate("a red fox", seed=1, steps=2, width=64, height=64)
    assert [f["to"].split(" (")[0] for f in result.fallbacks] == ["te-offload"]
    assert result.images[0].metadata["vae_tiling"] is False
    inject_oom(engine.components.vae.decoder, times=2)
    with pytest.raises(GPUMemoryError, match="simulated"):
        engine.generate("a red fox", seed=1, steps=2, width=64, height=64)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("memory", "all-in", "memory 'all-in' is not one of auto, resident"), ("vram_budget", -1.0, "positive")],
)
def test_memory_settings_are_validated(field, value, message):
    with pytest.raises(InvalidRequestError, match=message):
        RuntimeConfig(**{field: value})


def test_vae_tiling_setting_is_validated():
    with pytest.raises(InvalidRequestError, match="vae_tiling 'sometimes' is not one of auto, on, off"):
        RuntimeConfig(vae_tiling="sometimes")


def test_a_requested_quantization_is_planned_with(shape):
    choice = memory.choose(shape, BF16, 16 * GIB, width=1024, height=1024, quantize_options=("fp8",), exact=False)
    assert choice.chosen is not None and choice.chosen.label() == "resident + fp8 + vae-tiling"
    assert all(e.quantize == "fp8" for e in choice.considered)


def test_leaner_drops_resident_blocks_and_layers_before_changing_plan():
    assert memory.leaner(Layout("block-offload", 16)) == Layout("block-offload")
    assert memory.leaner(Layout("te-offload", 0, 3)) == Layout("te-offload")
    chain, step = [], Layout(vae_tiling=True)
    while step is not None:
        chain.append(step.plan)
        assert step.vae_tiling  # the rest of the layout is kept
        step = memory.leaner(step)
    assert chain == ["resident", "te-offload", "block-offload", "sequential"]
    # A quantized transformer streams under block-offload and stops there (sequential: plain weights only).
    assert memory.leaner(Layout("resident", quantize="int8")) == Layout("te-offload", quantize="int8")
    assert memory.leaner(Layout("te-offload", quantize="int8")) == Layout("block-offload", quantize="int8")
    assert memory.leaner(Layout("block-offload", quantize="int8")) is None


def test_quantized_weights_are_planned_under_block_offload_and_refused_under_sequential(tiny_dir):
    from zturbo.loader import resolve_model

    source, dtypes = resolve_model(str(tiny_dir)), {"transformer": torch.float32}
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", quantize="int8", memory="block-offload")
    layout = memory.plan_layout(config, source, dtypes, None, None, compiled_vae=False)
    assert layout == Layout("block-offload", quantize="int8")
    sequential = dataclasses.replace(config, memory="sequential")
    with pytest.raises(InvalidRequestError, match=r"--quantize int8 .* --memory sequential .*plain weights only"):
        memory.plan_layout(sequential, source, dtypes, None, None, compiled_vae=False)


@pytest.mark.parametrize(("plan", "compiles"), [(plan, plan != "sequential") for plan in memory.PLANS])
def test_every_plan_compiles_but_diffusers_group_offload(plan, compiles):
    assert memory.compilable(plan) is compiles
    assert (memory.eager_reason(plan) is None) is compiles


def test_int8_weights_streamed_compile_and_stay_compiled_when_the_engine_leans_out_to_te_offload(tiny_dir, caplog):
    # Compiled int8 under a 4 GiB cap fits and is faster than eager on an H100 (docs/performance.md).
    pytest.importorskip("torchao")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8", compile="on")
    with caplog.at_level(logging.INFO, logger="zturbo"):
        engine = Engine.load(dataclasses.replace(config, memory="block-offload"), warmup=False)
        assert engine.accel.compiling
        resident = Engine.load(config, warmup=False)
        assert resident.accel.compiling
        resident._move_to(Layout("te-offload", quantize="int8"))  # out of memory: the text encoder streams
    assert resident.accel.compiling
    assert "running eagerly" not in caplog.text


def test_a_layout_names_a_bad_plan_or_count():
    with pytest.raises(ValueError, match="plan 'all-in' is not one of resident"):
        Layout("all-in")
    with pytest.raises(ValueError, match="must be >= 0"):
        Layout("block-offload", resident_blocks=-1)


def test_a_quantization_that_fits_no_plan_is_refused_with_the_need(tiny_dir):
    # Sequential runs plain weights only; a quantized transformer that fits nothing is an error
    # naming what it needs, while the unquantized engine falls back to the leanest plan.
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", vram_budget=0.001)
    with pytest.raises(GPUMemoryError, match=r"--quantize int8 needs about .* GiB even as .*use --quantize none"):
        Engine.load(dataclasses.replace(config, quantize="int8"))
    assert Engine.load(config).placement.plan == "sequential"


def test_a_gguf_transformer_that_fits_no_plan_is_refused_with_the_need(tiny_dir, tmp_path):
    # GGUF weights, like a requested quantization, run under no plain-weight plan (sequential):
    # where none of theirs fits, the load is an error naming the need; where the leanest of them
    # fits, that is the plan.
    pytest.importorskip("gguf")
    from gguf_files import write_gguf
    from zturbo.loader import iter_tensors, resolve_model, weight_files

    files = weight_files(tiny_dir / "transformer", "diffusion_pytorch_model")
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", {k: t for k, _, t in iter_tensors(files)}, "Q8_0")
    source = dataclasses.replace(resolve_model(str(tiny_dir)), transformer_file=path)
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", vram_budget=0.001)
    need = r"GGUF transformer .*tiny-Q8_0\.gguf needs about [\d.]+ GiB even as .*budget is 0\.00 GiB"
    with pytest.raises(GPUMemoryError, match=need + r".*--vram-budget.*smaller GGUF quantization"):
        Engine.load(config, source=source)
    dtypes = {"transformer": torch.float32, "text_encoder": torch.float32, "vae": torch.float32}
    cfg = source.profile(config.preset).profile.guidance > 0
    size = {"width": memory.PLANNED_SIZE, "height": memory.PLANNED_SIZE, "cfg": cfg}
    shape = memory.shape_from_source(source)
    considered = memory.choose(shape, memory.dtype_bytes(dtypes), 1, **size).considered
    least = min(considered, key=lambda est: est.peak)
    assert least.plan != "sequential"  # (on the tiny model, model-offload: its VAE outweighs the rest)
    budget = least.peak + memory.GIB // 2  # the planner's margin on top
    layout = memory.plan_layout(config, source, dtypes, budget, None, compiled_vae=False)
    assert layout == memory.layout_of(least)


def test_only_the_resident_plan_fuses_projections():
    assert [p for p in memory.PLANS if memory.fusable(p)] == ["resident"]


def test_a_fused_engine_unfuses_before_the_whole_transformer_leaves_the_device(fresh, engine):
    # Module.to moves parameters, not the fused tensors (plain attributes): they would stay behind
    # on the device, and the model-offload plan would hold most of the transformer there.
    expected = pixels(engine.generate("a red fox", seed=1, steps=2, width=64, height=64))
    fuse.fuse_projections(fresh.components.transformer)
    fresh.placement.change(Layout("model-offload"))
    blocks = fuse.transformer_blocks(fresh.components.transformer)
    assert all(getattr(b.attention, fuse.FUSED_QKV, None) is None for b in blocks)
    assert np.array_equal(pixels(fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)), expected)


@pytest.mark.parametrize("plan", ["te-offload", "block-offload"])
def test_fused_blocks_are_unfused_before_their_weights_move_into_streaming_memory(fresh, engine, plan):
    # A lean-out from a fused resident engine: the fused q/k/v and w1/w3 tensors are copies that
    # the streamed or shared views would not reach (and their memory would never be freed).
    expected = pixels(engine.generate("a red fox", seed=1, steps=2, width=64, height=64))
    fuse.fuse_projections(fresh.components.transformer)
    fresh.placement.change(Layout(plan))
    moved = fresh.placement.streamers["arena" if plan == "te-offload" else "transformer"]
    buffers = [moved.arena] if plan == "te-offload" else moved.slots
    blocks = moved.modules["transformer"] if plan == "te-offload" else [b.module for b in moved.blocks]
    assert blocks
    for block in blocks:
        assert getattr(block.attention, fuse.FUSED_QKV, None) is None
        ptr = block.attention.to_q.weight.data_ptr()
        assert any(b.data_ptr() <= ptr < b.data_ptr() + b.numel() for b in buffers)
    assert np.array_equal(pixels(fresh.generate("a red fox", seed=1, steps=2, width=64, height=64)), expected)


def test_shared_memory_survives_guidance_and_a_pause(tiny_dir, engine):
    # Guidance encodes twice per request; a pause (as a precision fallback makes) hands the
    # weights back to their modules and packs them again.
    kwargs = {"seed": 3, "steps": 2, "width": 64, "height": 64, "guidance_scale": 2.0, "negative_prompt": "blurry"}
    expected = pixels(engine.generate("a red fox", **kwargs))
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", memory="te-offload"))
    assert np.array_equal(pixels(planned.generate("a red fox", **kwargs)), expected)
    before = planned.placement.streamers["arena"]
    with planned.placement.paused():
        assert "arena" not in planned.placement.streamers
    after = planned.placement.streamers["arena"]
    assert after is not before and planned.placement.shared_layers == 2
    planned.prompt_cache.clear()
    assert np.array_equal(pixels(planned.generate("a red fox", **kwargs)), expected)


# ---------------------------------------------------------------------------------------------
# With a ControlNet


@pytest.fixture(scope="module")
def control_shape() -> memory.ModelShape:
    """The real architecture with a Union 2.1 ControlNet (hlky/...-2.1's config), on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImageControlNetModel, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zturbo.bench.common import QWEN3_4B_CONFIG
    from zturbo.tiny import FLUX_VAE_CONFIG

    with init_empty_weights():
        transformer = ZImageTransformer2DModel()
        text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG))
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
        controlnet = ZImageControlNetModel(
            control_layers_places=list(range(0, 30, 2)),
            control_refiner_layers_places=[0, 1],
            control_in_dim=33,
            add_control_noise_refiner="control_noise_refiner",
        )
    return memory.model_shape(transformer, text_encoder, vae, controlnet=controlnet)


def test_a_controlnet_counts_its_own_weights_where_the_transformers_go(shape, control_shape):
    cn = control_shape.controlnet_params * 2
    assert 6.5e9 < cn < 6.9e9  # Union 2.1's bf16 file: 6.7 GB (its own blocks; embedders and refiners are shared)
    assert control_shape.controlnet_layers == 15 and control_shape.transformer_params == shape.transformer_params
    request = {"width": 1024, "height": 1024}
    for plan in memory.PLANS:
        plain = memory.estimate(shape, BF16, plan=plan, **request).stages
        controlled = memory.estimate(control_shape, BF16, plan=plan, **request).stages
        weights = {
            "resident": (cn, cn, cn),
            "te-offload": (cn, cn, cn),
            "model-offload": (0, cn, 0),  # it takes its turn with the transformer
            "block-offload": ((control_shape.controlnet_params - control_shape.controlnet_blocks_params
                               + 2 * control_shape.controlnet_block_params) * 2,) * 3,  # two slots of its own
            "sequential": (0, 0, 0),
        }[plan]  # fmt: skip
        activation = memory.controlnet_activation(control_shape, 2, 1024, 1024, 1, False, 128)
        assert controlled["encode"] - plain["encode"] == weights[0]
        assert controlled["denoise"] - plain["denoise"] == weights[1] + activation
        assert controlled["decode"] - plain["decode"] == weights[2]
    # 1024², one image: 15 hints stacked twice over 4,224 tokens of 3,840 channels, and a few copies.
    assert activation == 4224 * 34 * 3840 * 2
    assert memory.controlnet_activation(shape, 2, 1024, 1024, 1, False, 128) == 0


def test_eight_gib_with_union_2_1_plans_a_layout_that_fits(control_shape):
    budget = 8 * GIB
    choice = memory.choose(control_shape, BF16, budget, width=1024, height=1024, compiled_vae=True)
    assert choice.chosen is not None and choice.chosen.plan == "block-offload"
    assert choice.chosen.peak <= memory.usable_budget(budget)
    without = memory.choose(control_shape, BF16, 24 * GIB, width=1024, height=1024, compiled_vae=True).chosen
    assert without is not None and without.plan == "te-offload"  # 12.3 + 6.7 GB of weights stay resident


def test_the_image_stage_leaves_room_for_an_input_images_encode(shape):
    for tiling in (False, True):
        est = memory.estimate(shape, BF16, plan="resident", width=2048, height=2048, vae_tiling=tiling)
        weights = est.stages["decode"] - memory.vae_activation(shape, 2, 2048, 2048, 1, tiling)
        assert est.stages["image"] == weights + memory.vae_encode_activation(shape, 2, 2048, 2048, tiling)
    # The encoder holds fewer full-resolution tensors than the eager decoder: the measured plans keep their peaks.
    assert memory.vae_encode_activation(shape, 2, 1024, 1024, False) < memory.vae_activation(
        shape, 2, 1024, 1024, 1, False
    )


def test_model_offload_encodes_an_input_image_with_the_text_encoder_off_the_device(tiny_dir, control_image):
    # The image stage's estimate holds the VAE alone: the text encoder's turn ends before the encode.
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", memory="model-offload")
    planned = Engine.load(config)
    events: list[str] = []
    stage = planned.placement.stage
    planned.placement.stage = lambda name: (events.append(name), stage(name))[1]
    planned.components.vae.encoder.register_forward_pre_hook(lambda *_: events.append("vae encode"))
    planned.generate("a red fox", seed=1, steps=2, image=control_image, strength=0.5)
    assert events == ["encode", "image", "vae encode", "denoise", "decode"]


def test_the_planner_reads_the_controlnet_from_its_file(tiny_dir, tmp_path, engine):
    from zturbo.loader import load_controlnet, resolve_model
    from zturbo.tiny import write_tiny_controlnet

    path = write_tiny_controlnet(tmp_path / "cn.safetensors", "2.1")
    source = resolve_model(str(tiny_dir))
    planned = memory.shape_from_source(source, str(path))
    assert memory.shape_from_source(source) == engine.shape  # no ControlNet: nothing counted
    loaded = load_controlnet(str(path), engine.components.transformer, placing.CPU, torch.float32)
    assert planned == dataclasses.replace(engine.shape, **memory.controlnet_counts(loaded.model))
    assert planned.controlnet_layers == 2 and planned.controlnet_params > 0


@pytest.fixture(scope="module")
def control_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_every_plan_runs_the_controlnet_as_resident_and_moves_only_its_own_modules(tiny_dir, tmp_path, control_image):
    # One engine through every plan, leaner each time; a control image, and a plain request between
    # (the ControlNet calls the transformer's refiners: streamed and offloaded ones must serve both).
    from zturbo.tiny import write_tiny_controlnet

    path = write_tiny_controlnet(tmp_path / "cn.safetensors", "2.1")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", controlnet=str(path))
    planned = Engine.load(config)
    params = {"seed": 1, "steps": 2, "width": 64, "height": 64}
    controlled = {**params, "control_image": control_image, "control_type": "depth", "control_scale": 0.8}
    expected = pixels(planned.generate("a red fox", **controlled))
    plain = pixels(planned.generate("a red fox", **params))
    assert not np.array_equal(expected, plain)
    for plan in ("te-offload", "model-offload", "block-offload", "sequential"):
        planned.placement.change(Layout(plan))
        assert np.array_equal(pixels(planned.generate("a red fox", **controlled)), expected), plan
        assert np.array_equal(pixels(planned.generate("a red fox", **params)), plain), plan
        if plan == "block-offload":
            streamed = planned.placement.streamers["controlnet"]
            blocks = list(fuse.controlnet_blocks(planned.components.controlnet.model))
            assert [b.module for b in streamed.blocks] == blocks and len(blocks) == 3  # 1 refiner, 2 layers


def test_moving_the_controlnet_leaves_the_transformers_shared_modules_where_they_are(fresh, tmp_path):
    from zturbo.loader import load_controlnet
    from zturbo.tiny import write_tiny_controlnet

    path = write_tiny_controlnet(tmp_path / "cn.safetensors", "1.0")
    transformer = fresh.components.transformer
    fresh.components.controlnet = load_controlnet(str(path), transformer, placing.CPU, torch.float32)
    fresh.placement._move_controlnet(torch.device("meta"))  # a device a shared tensor cannot hide on
    model = fresh.components.controlnet.model
    assert {p.device.type for _, m in placing.own_modules(model) for p in m.parameters()} == {"meta"}
    assert {p.device.type for p in transformer.parameters()} == {"cpu"}
    assert model.noise_refiner is transformer.noise_refiner


def test_a_lora_merges_into_the_refiners_the_controlnet_shares_under_block_offload(tiny_dir, tmp_path, control_image):
    from loras import write_lora
    from zturbo.tiny import write_tiny_controlnet

    cn = write_tiny_controlnet(tmp_path / "cn.safetensors", "2.1")
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", controlnet=str(cn))
    resident = Engine.load(config)
    write_lora(tmp_path / "lora.safetensors", "peft", resident.components.transformer, seed=3)
    params = {"seed": 1, "steps": 2, "width": 64, "height": 64, "control_image": control_image, "control_type": "depth"}
    lora = [{"name": str(tmp_path / "lora.safetensors"), "weight": 0.8}]
    expected = pixels(resident.generate("a red fox", loras=lora, **params))
    base = pixels(resident.generate("a red fox", **params))
    streamed = Engine.load(dataclasses.replace(config, memory="block-offload"))
    assert np.array_equal(pixels(streamed.generate("a red fox", loras=lora, **params)), expected)
    assert np.array_equal(pixels(streamed.generate("a red fox", **params)), base)  # the base weights back


# ---------------------------------------------------------------------------------------------
# How many images a batch may hold


def room(shape: memory.ModelShape, size: int, free: int, **request: object) -> int:
    fields = {"cfg": False, "prompt_tokens": 128, "controlled": False} | request
    return memory.batch_room(shape, 2, width=size, height=size, free_bytes=free, **fields)  # type: ignore[arg-type]


def test_the_batch_room_is_what_the_transformer_activation_leaves_room_for(shape):
    free = 10 * GIB
    # 1024², 128 prompt tokens: 4,224 rows of max(3 x 10,240 FFN, 3 x 3,840 + 2 x 3,840 float32
    # RoPE) + 4 x 3,840 residual bf16 values each.
    one = memory.transformer_activation(shape, 2, 1024, 1024, 1, False, 128)
    assert one == 4224 * (3 * 10240 + 4 * 3840) * 2
    assert room(shape, 1024, free) == int(0.9 * free) // one == 24
    fits = memory.transformer_activation(shape, 2, 1024, 1024, 24, False, 128)
    assert fits <= 0.9 * free < memory.transformer_activation(shape, 2, 1024, 1024, 25, False, 128)


def test_the_batch_room_grows_with_free_memory_and_smaller_images_and_is_never_below_one(shape):
    rooms = [room(shape, 1024, gib * GIB) for gib in range(0, 41, 2)]
    assert rooms == sorted(rooms) and rooms[0] == 1 and rooms[-1] == 99
    assert room(shape, 1024, 0) == room(shape, 1024, GIB // 8) == 1  # nothing fits: a lone job still runs
    by_size = [room(shape, size, 16 * GIB) for size in (512, 1024, 2048)]
    assert by_size[0] > by_size[1] > by_size[2] >= 1
    assert room(shape, 1024, 20 * GIB, most=4) == 4 and room(shape, 2048, 2 * GIB, most=4) == 1


def test_the_batch_room_counts_guidance_a_controlnet_and_a_step_graph_pool(shape, control_shape):
    plain = room(shape, 1024, 20 * GIB)
    assert room(shape, 1024, 20 * GIB, cfg=True) == plain // 2  # two rows per image
    assert room(shape, 1024, 20 * GIB, pool_factor=1.5) == int(0.9 * 20 * GIB // (1.5 * 389283840))
    one = memory.transformer_activation(control_shape, 2, 1024, 1024, 1, False, 128)
    one += memory.controlnet_activation(control_shape, 2, 1024, 1024, 1, False, 128)
    assert room(control_shape, 1024, 20 * GIB, controlled=True) == int(0.9 * 20 * GIB) // one < plain
    assert room(control_shape, 1024, 20 * GIB) == plain  # loaded, but this request has no control image


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 0, "width 0 and height 1024 must be positive"),
        ("free_bytes", -1, "free_bytes -1 must be 0 or more"),
        ("pool_factor", 0.5, "pool_factor 0.5 must be at least 1.0"),
        ("most", 0, "most 0 must be at least 1"),
    ],
)
def test_the_batch_room_names_a_bad_value(shape, field, value, message):
    fields = {"width": 1024, "height": 1024, "free_bytes": GIB, "cfg": False, "prompt_tokens": 128} | {field: value}
    with pytest.raises(ValueError, match=message):
        memory.batch_room(shape, 2, controlled=False, **fields)  # type: ignore[arg-type]


def test_only_the_plans_that_move_the_transformer_in_to_denoise_count_its_weights(control_shape):
    sizes = {"width": 1024, "height": 1024}
    activation = memory.transformer_activation(control_shape, 2, 1024, 1024, 1, False, 128)
    for plan in memory.PLANS:
        onload = memory.denoise_onload(control_shape, BF16, Layout(plan))
        if plan in ("model-offload", "sequential"):  # off the device between requests
            denoise = memory.estimate(control_shape, BF16, plan=plan, **sizes).stages["denoise"]
            control = memory.controlnet_activation(control_shape, 2, 1024, 1024, 1, False, 128)
            assert onload == denoise - activation - control > 0
        else:  # held already: what is free is left to the activations
            assert onload == 0
    whole = memory.denoise_onload(control_shape, BF16, Layout("model-offload"))
    assert whole == (control_shape.transformer_params + control_shape.controlnet_params) * 2
    assert memory.denoise_onload(control_shape, BF16, Layout("model-offload", quantize="int8")) < whole


def test_the_engine_plans_a_batch_from_the_memory_free_within_its_budget(fresh, monkeypatch):
    request = fresh.request("a red fox", width=64, height=64, steps=2)
    assert fresh.batch_room(request) is None  # the CPU: the host's memory is not planned
    free = 200 * fresh.shape.dim * 1024  # a few hundred rows of the tiny transformer
    monkeypatch.setattr(fresh, "device", torch.device("cuda"))
    monkeypatch.setattr("zturbo.engine.budget_fraction", lambda device: 0.5)  # --vram-budget: no step graphs
    asked = []
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: asked.append(budget) or free)
    fresh.vram_budget = 8 * GIB
    elem = 4  # float32
    expected = memory.batch_room(fresh.shape, elem, width=64, height=64, cfg=False, prompt_tokens=fresh.max_tokens,
                                 controlled=False, free_bytes=free)  # fmt: skip
    assert fresh.batch_room(request) == expected > 1 and asked == [8 * GIB]
    guided = fresh.request("a red fox", width=64, height=64, steps=2, guidance_scale=2.0)
    assert fresh.batch_room(guided) == max(1, expected // 2)

    monkeypatch.setattr(fresh.placement, "layout", Layout("model-offload"))
    weights = memory.denoise_onload(
        fresh.shape, {"transformer": 4, "text_encoder": 4, "vae": 4}, Layout("model-offload")
    )
    assert fresh.batch_room(request) == memory.batch_room(
        fresh.shape, elem, width=64, height=64, cfg=False, prompt_tokens=fresh.max_tokens, controlled=False,
        free_bytes=max(0, free - weights),
    ) < expected  # fmt: skip

    monkeypatch.setattr(fresh.placement, "layout", Layout("resident"))
    monkeypatch.setattr("zturbo.engine.budget_fraction", lambda device: 1.0)
    fresh.accel.step_graphs = graphs.StepGraphs()  # the step graphs' pools count
    assert fresh.batch_room(request) == memory.batch_room(
        fresh.shape, elem, width=64, height=64, cfg=False, prompt_tokens=fresh.max_tokens, controlled=False,
        free_bytes=free, pool_factor=1.5,
    ) < expected  # fmt: skip


def test_the_memory_a_process_may_still_allocate_counts_its_vram_budget(monkeypatch):
    from zturbo import device as devices

    mib = 2**20
    # No cap: the card's free memory plus the process's own unused cache.
    assert (
        devices.capped_room(free=50 * mib, total=100 * mib, fraction=1.0, reserved=30 * mib, allocated=20 * mib)
        == 60 * mib
    )
    # A 40 MiB cap with 30 MiB reserved: 10 MiB of new blocks, though the card has 50 free.
    assert (
        devices.capped_room(free=50 * mib, total=100 * mib, fraction=0.4, reserved=30 * mib, allocated=20 * mib)
        == 20 * mib
    )
    # At the cap already: only the unused cache.
    assert (
        devices.capped_room(free=50 * mib, total=100 * mib, fraction=0.3, reserved=30 * mib, allocated=20 * mib)
        == 10 * mib
    )
    # The card itself fuller than the cap: its free memory bounds the new blocks.
    assert (
        devices.capped_room(free=5 * mib, total=100 * mib, fraction=0.4, reserved=30 * mib, allocated=20 * mib)
        == 15 * mib
    )

    assert devices.memory_room(torch.device("cpu"), 8 * GIB) is None
    assert devices.memory_room(torch.device("mps"), None) is None  # the host's memory
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 3 * GIB)
    assert devices.memory_room(torch.device("mps"), 8 * GIB) == 5 * GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 9 * GIB)
    monkeypatch.setattr(devices, "budget_fraction", lambda device: 16 / 80)  # --vram-budget 16
    assert devices.memory_room(torch.device("cuda", 0), 16 * GIB) == 7 * GIB  # not the card's 71


def test_each_process_of_a_split_image_plans_for_its_share_of_the_tokens(shape):
    """--parallel N: the blocks hold 1/N of the tokens, plus two whole-sequence tensors."""
    one = memory.transformer_activation(shape, 2, 2048, 2048, 1, False, 128)
    four = memory.transformer_activation(shape, 2, 2048, 2048, 1, False, 128, shards=4)
    tokens = 128 * 128 + 128
    assert four == -(-tokens // 4) * (one // tokens) + 2 * tokens * shape.dim * 2
    assert one / 4 < four < one / 2
    plans = {n: memory.estimate(shape, BF16, plan="resident", width=2048, height=2048, shards=n) for n in (1, 4)}
    assert plans[1].stages["denoise"] - plans[4].stages["denoise"] == one - four
