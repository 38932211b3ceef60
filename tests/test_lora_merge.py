"""LoRA merged into the transformer: pixel parity with diffusers' LoRA path and with independently
merged weights, exact restoring, refusals before any change, and every memory plan and quantization.

Images: float32 on the CPU, 64x64, 4 steps; "equal" means a max uint8 difference of 1, as in
tests/test_parity.py. Each LoRA's delta is about the size of the tiny weights, so a LoRA that was
not applied (or applied twice) moves pixels by far more than that.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from loras import write_flux_lora, write_lora, write_partial_lora
from zturbo.errors import LoraError

PROMPT = "a red fox in the snow"
ARGS = dict(seed=7, steps=4, width=64, height=64)
# Formats diffusers 0.42.1 loads for Z-Image (ZImageLoraLoaderMixin); the others are compared with
# weights merged in the test.
DIFFUSERS_FORMATS = ("peft", "kohya", "comfyui", "dot-names", "lokr")
OWN_FORMATS = ("loha", "fused-qkv", "kohya-qkv", "lokr-full", "lokr-kohya")


@pytest.fixture(scope="module")
def own(tiny_dir: Path):
    """An engine of this module's own: these tests merge and restore its weights."""
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    return Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))


@pytest.fixture(autouse=True)
def _base_weights_first(own) -> None:
    """Each test starts from the base weights, whatever the one before left merged."""
    if own.merger is not None:
        own.merger.restore()


@pytest.fixture(scope="module")
def base_image(own) -> np.ndarray:
    return pixels(own)


def pixels(engine, **kwargs) -> np.ndarray:
    return np.asarray(engine.generate(PROMPT, **ARGS, **kwargs).images[0].image).astype(int)


def reference(pipe) -> np.ndarray:
    out = pipe(
        prompt=PROMPT,
        height=ARGS["height"],
        width=ARGS["width"],
        num_inference_steps=ARGS["steps"],
        guidance_scale=0.0,
        generator=[torch.Generator("cpu").manual_seed(ARGS["seed"])],
        output_type="pil",
    )
    return np.asarray(out.images[0]).astype(int)


def state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def assert_same_image(ours: np.ndarray, theirs: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(ours - base).max() > 20, "the LoRA did not change the image: nothing would be compared"
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1, f"max pixel difference {diff.max()}, mean {diff.mean():.3f}"


@pytest.mark.parametrize("fmt", DIFFUSERS_FORMATS)
def test_each_format_matches_diffusers_load_lora_weights(fmt, own, base_image, reference_pipe, tmp_path):
    path = tmp_path / f"{fmt}.safetensors"
    write_lora(path, fmt, own.components.transformer, seed=3)
    ours = pixels(own, loras=[(str(path), 1.0)])
    reference_pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x")
    try:
        theirs = reference(reference_pipe)
    finally:
        reference_pipe.unload_lora_weights()
    assert_same_image(ours, theirs, base_image)


def test_two_loras_with_weights_match_diffusers_set_adapters(own, base_image, reference_pipe, tmp_path):
    transformer = own.components.transformer
    write_lora(tmp_path / "a.safetensors", "kohya", transformer, seed=1)
    write_lora(tmp_path / "b.safetensors", "peft", transformer, seed=2, alpha=8.0)
    loras = [(str(tmp_path / "a.safetensors"), 0.7), (str(tmp_path / "b.safetensors"), 0.4)]
    ours = pixels(own, loras=loras)
    for name in ("a", "b"):
        reference_pipe.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors", adapter_name=name)
    try:
        reference_pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
        theirs = reference(reference_pipe)
    finally:
        reference_pipe.unload_lora_weights()
    assert_same_image(ours, theirs, base_image)


@contextlib.contextmanager
def merged_into(pipe, deltas: dict[str, torch.Tensor], weight: float):
    """diffusers' pipeline with `weight * delta` added to its transformer's weights here, in the
    test (independently of zturbo's merging); its weights are put back afterwards."""
    transformer = pipe.transformer
    saved = {m: transformer.get_submodule(m).weight.detach().clone() for m in deltas}
    with torch.no_grad():
        for module, delta in deltas.items():
            transformer.get_submodule(module).weight.add_(weight * delta)
    try:
        yield pipe
    finally:
        with torch.no_grad():
            for module, value in saved.items():
                transformer.get_submodule(module).weight.copy_(value)


@pytest.mark.parametrize("fmt", OWN_FORMATS)
def test_formats_diffusers_cannot_load_match_independently_merged_weights(
    fmt, own, base_image, reference_pipe, tmp_path
):
    path = tmp_path / f"{fmt}.safetensors"
    expected = write_lora(path, fmt, own.components.transformer, seed=4)
    ours = pixels(own, loras=[(str(path), 0.8)])
    with merged_into(reference_pipe, expected, 0.8) as pipe:
        theirs = reference(pipe)
    assert_same_image(ours, theirs, base_image)


def test_no_lora_restores_the_base_weights_bit_for_bit_and_the_base_image(own, base_image, tmp_path):
    transformer = own.components.transformer
    before = state(transformer)
    write_lora(tmp_path / "a.safetensors", "kohya", transformer, seed=5)
    write_lora(tmp_path / "b.safetensors", "loha", transformer, seed=6)
    pixels(own, loras=[(str(tmp_path / "a.safetensors"), 1.0)])
    pixels(own, loras=[(str(tmp_path / "a.safetensors"), 0.3), (str(tmp_path / "b.safetensors"), -0.5)])
    assert np.array_equal(pixels(own), base_image)
    after = state(transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert own.merger is not None and own.merger.stats.switches >= 3


def test_the_same_set_again_writes_nothing(own, tmp_path):
    path = tmp_path / "a.safetensors"
    write_lora(path, "peft", own.components.transformer, seed=8)
    first = pixels(own, loras=[(str(path), 1.0)])
    switches = own.merger.stats.switches
    assert np.array_equal(pixels(own, loras=[(str(path), 1.0)]), first)
    assert own.merger.stats.switches == switches
    pixels(own)


def test_refused_files_change_nothing_and_name_the_problem(own, tmp_path):
    transformer = own.components.transformer
    before = state(transformer)
    stray = write_partial_lora(tmp_path / "partial.safetensors", transformer)
    with pytest.raises(LoraError) as err:
        own.generate(PROMPT, **ARGS, loras=[(str(tmp_path / "partial.safetensors"), 1.0)])
    assert stray[0] in str(err.value)
    write_flux_lora(tmp_path / "flux.safetensors")
    with pytest.raises(LoraError, match="FLUX"):
        own.generate(PROMPT, **ARGS, loras=[(str(tmp_path / "flux.safetensors"), 1.0)])
    after = state(transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_refusal_after_a_merged_set_leaves_that_set_in_place(own, tmp_path):
    transformer = own.components.transformer
    good = tmp_path / "good.safetensors"
    write_lora(good, "kohya", transformer, seed=9)
    image = pixels(own, loras=[(str(good), 1.0)])
    merged = state(transformer)
    write_flux_lora(tmp_path / "flux.safetensors")
    with pytest.raises(LoraError):
        own.generate(PROMPT, **ARGS, loras=[(str(good), 1.0), (str(tmp_path / "flux.safetensors"), 1.0)])
    assert all(torch.equal(merged[k], v) for k, v in state(transformer).items())
    assert np.array_equal(pixels(own, loras=[(str(good), 1.0)]), image)
    pixels(own)


def test_a_failure_while_writing_a_new_set_puts_every_weight_back_to_base(own, tmp_path, monkeypatch):
    """Never a half-applied set: weights already written with the new set and weights still
    holding the old one all go back to base, and the old set merges again afterwards."""
    from zturbo.adapters.merge import LoraMerger

    transformer = own.components.transformer
    before = state(transformer)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(a, "kohya", transformer, seed=14)
    write_lora(b, "peft", transformer, seed=15)
    want = pixels(own, loras=[(str(a), 1.0)])
    real, calls = LoraMerger._merged, []

    def fails_third(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self, *args)

    monkeypatch.setattr(LoraMerger, "_merged", fails_third)
    with pytest.raises(RuntimeError, match="injected failure"):
        own.generate(PROMPT, **ARGS, loras=[(str(b), 1.0)])
    monkeypatch.undo()
    assert len(calls) == 3 and own.merger.active == () and own.merger.merged == set()
    assert all(torch.equal(before[k], v) for k, v in state(transformer).items())
    assert np.array_equal(pixels(own, loras=[(str(a), 1.0)]), want)
    pixels(own)


def test_fused_projections_see_the_merged_rows(own, tmp_path):
    from zturbo.accel.fuse import FUSED_QKV, fuse_projections, unfuse_projections

    transformer = own.components.transformer
    path = tmp_path / "a.safetensors"
    expected = write_lora(path, "peft", transformer, seed=10)
    fuse_projections(transformer)
    try:
        before = state(transformer)
        own.generate(PROMPT, **ARGS, loras=[(str(path), 1.0)])
        attn = transformer.layers[0].attention
        fused = getattr(attn, FUSED_QKV)
        q_rows = attn.to_q.weight.shape[0]
        want = before["layers.0.attention.to_q.weight"] + expected["layers.0.attention.to_q"]
        torch.testing.assert_close(fused[:q_rows], want)
        pixels(own)
        assert torch.equal(fused[:q_rows], before["layers.0.attention.to_q.weight"])
    finally:
        unfuse_projections(transformer)


@pytest.mark.parametrize(
    "layout",
    [
        dict(plan="block-offload", resident_blocks=1),
        dict(plan="te-offload"),
        dict(plan="model-offload"),
        dict(plan="sequential"),
    ],
    ids=lambda d: d["plan"],
)
def test_streamed_and_offloaded_plans_carry_the_merged_weights(layout, own, fresh, tmp_path):
    from zturbo.memory.plan import Layout

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(a, "kohya", own.components.transformer, seed=11)
    write_lora(b, "loha", own.components.transformer, seed=15, modules="ffn")
    want_a, want_b = pixels(own, loras=[(str(a), 1.0)]), pixels(own, loras=[(str(b), 1.0)])
    base = pixels(own)
    fresh.placement.change(Layout(**layout))
    assert np.array_equal(pixels(fresh, loras=[(str(a), 1.0)]), want_a)
    # A switch while the streamed copies (slots, the arena, pinned copies) hold the previous set
    assert np.array_equal(pixels(fresh, loras=[(str(b), 1.0)]), want_b)
    assert np.array_equal(pixels(fresh), base)


def test_running_out_of_memory_mid_request_merges_the_set_again_after_the_plan_change(own, fresh, tmp_path):
    """The leaner-plan retry restores the base before moving the weights, then merges again."""
    from zturbo.testing import inject_oom

    path = tmp_path / "a.safetensors"
    write_lora(path, "kohya", own.components.transformer, seed=12)
    want = pixels(own, loras=[(str(path), 1.0)])
    base = pixels(own)
    inject_oom(fresh.components.transformer)
    result = fresh.generate(PROMPT, **ARGS, loras=[(str(path), 1.0)])
    assert [f["component"] for f in result.fallbacks] == ["memory"]
    assert np.array_equal(np.asarray(result.images[0].image).astype(int), want)
    assert np.array_equal(pixels(fresh), base)


def test_float16_guard_scaled_weights_take_the_change_scaled_alike_and_restore_exactly(tiny_dir, tmp_path):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine
    from zturbo.guard import ATTENTION_SCALE, FFN_SCALE

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float16"))
    transformer = engine.components.transformer
    assert engine.guard is not None and engine.guard.scaled
    before = state(transformer)
    path = tmp_path / "a.safetensors"
    expected = write_lora(path, "kohya", transformer, seed=16)
    engine.generate(PROMPT, **ARGS, loras=[(str(path), 1.0)])
    block = "layers.0"
    for module, factor in (
        (f"{block}.feed_forward.w3", FFN_SCALE),  # scaled down by the guard
        (f"{block}.attention.to_out.0", ATTENTION_SCALE),
        (f"{block}.feed_forward.w1", 1.0),  # not scaled
    ):
        weight = transformer.get_submodule(module).weight.float() * factor
        want = before[f"{module}.weight"].float() * factor + expected[module]
        torch.testing.assert_close(weight, want, atol=2e-3 * factor, rtol=2e-3)
    engine.generate(PROMPT, **ARGS)
    assert all(torch.equal(before[k], v) for k, v in state(transformer).items())


def test_int8_weights_are_merged_before_quantizing_and_restored_exactly(tiny_dir, tmp_path):
    pytest.importorskip("torchao")
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8"))
    transformer = engine.components.transformer
    weight = transformer.layers[0].feed_forward.w1.weight
    names, _ = weight.__tensor_flatten__()
    before = {n: getattr(weight, n).clone() for n in names}
    path = tmp_path / "a.safetensors"
    expected = write_lora(path, "kohya", transformer, seed=13)
    engine.generate(PROMPT, **ARGS, loras=[(str(path), 1.0)])
    # What quantizing the merged plain weight gives, computed here from the checkpoint's weight.
    from torchao import quantization as tq

    from zturbo.accel.quantize import _torchao_config

    plain = engine.base_reader("layers.0.feed_forward.w1.weight") + expected["layers.0.feed_forward.w1"]
    linear = torch.nn.Linear(plain.shape[1], plain.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(plain, requires_grad=False)
    tq.quantize_(linear, _torchao_config(tq, "int8"))
    ours, theirs = weight.dequantize(), linear.weight.dequantize()
    step = float((theirs.abs().amax(dim=1) / 127).max())
    torch.testing.assert_close(ours, theirs, atol=step, rtol=0)  # at most one rounding step apart
    assert not torch.equal(ours, engine.base_reader("layers.0.feed_forward.w1.weight"))
    engine.generate(PROMPT, **ARGS)
    assert all(torch.equal(getattr(weight, n), before[n]) for n in names)


def test_a_lora_merges_into_streamed_int8_weights_as_into_resident_ones(tiny_dir, tmp_path):
    # A streamed block's slot is refilled from its host copy: the merge and the restore must reach it.
    pytest.importorskip("torchao")
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", quantize="int8")
    resident = Engine.load(config)
    streamed = Engine.load(RuntimeConfig(**{**config.__dict__, "memory": "block-offload"}))
    assert streamed.placement.streamers["transformer"].blocks
    path = tmp_path / "a.safetensors"
    write_lora(path, "kohya", resident.components.transformer, seed=13)
    base = pixels(streamed)
    merged = pixels(streamed, loras=[(str(path), 1.0)])
    assert np.array_equal(merged, pixels(resident, loras=[(str(path), 1.0)]))
    assert np.abs(merged - base).max() > 1  # the LoRA changed the image
    assert np.array_equal(pixels(streamed), base)  # and is gone again
