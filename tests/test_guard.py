"""The float16 overflow guard: finite where plain float16 overflows, close to float32, and undoable."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from zturbo.cli import main
from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
from zturbo.guard import FFN_SCALE, install_fp16_guard, is_float32_key
from zturbo.imageio import read_metadata
from zturbo.testing import inject_nonfinite

# w1 and w3 times 400 puts the SwiGLU product of the tiny model far past 65504 in float16, while
# the float32 image hardly moves (the FFN output passes an RMSNorm).
OVERFLOW_FACTOR = 400.0
PARAMS = {"seed": 1, "steps": 8, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def overflow_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(tiny_dir, target)
    for shard in (target / "transformer").glob("*.safetensors"):
        tensors = load_file(shard)
        for key in tensors:
            if key.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
                tensors[key] = tensors[key] * OVERFLOW_FACTOR
        save_file(tensors, shard, metadata={"format": "pt"})
    return target


def load(model: Path, dtype: str) -> Engine:
    return Engine.load(RuntimeConfig(model=str(model), device="cpu", dtype=dtype))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.float64)


@pytest.fixture(scope="module")
def float32_image(overflow_dir: Path) -> np.ndarray:
    image = pixels(load(overflow_dir, "float32").generate("a red fox", **PARAMS))
    assert np.isfinite(image).all() and image.std() > 10
    return image


def test_unguarded_float16_overflows(overflow_dir):
    engine = load(overflow_dir, "float16")
    engine.guard.remove()
    engine.guard = None
    engine.components.transformer.half()
    result = engine.generate("a red fox", **PARAMS)
    assert result.fallbacks[0] == {
        "component": "transformer",
        "from": "float16",
        "to": "bfloat16",
        "reason": "non-finite latents after denoising",
    }


def test_cli_float16_is_finite_and_close_to_float32(capsys, overflow_dir, float32_image, tmp_path):
    target = tmp_path / "fp16.png"
    argv = ["generate", "a red fox", "--model", str(overflow_dir), "--device", "cpu", "--dtype", "float16"]
    argv += ["--seed", "1", "--steps", "8", "--width", "64", "--height", "64", "-o", str(target)]
    assert main(argv) == 0, capsys.readouterr().err
    meta = read_metadata(target)
    assert meta["fallbacks"] == []
    assert meta["dtypes"] == {"transformer": "float16", "text_encoder": "float16", "vae": "float16"}
    assert "w3 weights /32" in meta["fp16_guard"]
    from PIL import Image

    with Image.open(target) as im:
        image = np.asarray(im, dtype=np.float64)
    assert np.abs(image - float32_image).mean() <= 4


def test_scale_variant_is_closer_to_float32_than_clamping(overflow_dir, float32_image):
    # The measurement behind the default: under overflow, clamping changes the direction of the
    # clamped vectors; scaling ahead of the RMSNorm does not.
    errors = {}
    for variant in ("scale", "clamp"):
        engine = load(overflow_dir, "float16")
        engine.guard.remove()
        engine.guard = install_fp16_guard(engine.components.transformer, variant)
        result = engine.generate("a red fox", **PARAMS)
        assert result.fallbacks == []
        errors[variant] = np.abs(pixels(result) - float32_image).mean()
    assert errors["scale"] < 0.5 < errors["clamp"], errors


def test_guard_is_close_to_float32_without_overflow(tiny_dir, engine):
    reference = pixels(engine.generate("a red fox", **PARAMS))
    guarded = pixels(load(tiny_dir, "float16").generate("a red fox", **PARAMS))
    assert np.abs(guarded - reference).mean() < 0.5


def test_precision_sensitive_modules_load_in_float32_from_the_checkpoint(tiny_dir, engine):
    half = load(tiny_dir, "float16").components.transformer
    full = dict(engine.components.transformer.named_parameters())
    for name, param in half.named_parameters():
        if is_float32_key(name):
            assert param.dtype is torch.float32 and torch.equal(param, full[name]), name
        else:
            assert param.dtype is torch.float16, name
    assert any(is_float32_key(n) for n, _ in half.named_parameters())


def test_remove_restores_weights_and_hooks_exactly(tiny_dir):
    transformer = load(tiny_dir, "float32").components.transformer.half()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    eps = [m.eps for m in transformer.modules() if hasattr(m, "eps")]
    guard = install_fp16_guard(transformer)
    assert not torch.equal(transformer.layers[0].feed_forward.w3.weight, before["layers.0.feed_forward.w3.weight"])
    guard.remove()
    after = transformer.state_dict()
    # Powers of two scale exactly, except weights pushed into float16's subnormal range (spacing
    # 2^-24), which come back within factor * 2^-24.
    scaled = {n for n in before if n.endswith(("feed_forward.w3.weight", "attention.to_out.0.weight"))}
    for name in before:
        diff = (before[name].float() - after[name].float()).abs().max().item()
        assert diff <= (32 * 2**-24 if name in scaled else 0), name
    assert [m.eps for m in transformer.modules() if hasattr(m, "eps")] == eps
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in transformer.modules())


def test_no_guard_outside_float16(engine):
    assert engine.guard is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine.components.transformer.modules())


def test_fallback_from_float16_removes_the_guard(tiny_dir):
    engine = load(tiny_dir, "float16")
    inject_nonfinite(engine.components.transformer)
    result = engine.generate("a red fox", **PARAMS)
    assert [(f["from"], f["to"]) for f in result.fallbacks] == [("float16", "bfloat16")]
    assert engine.guard is None and result.images[0].metadata["fp16_guard"] is None
    transformer = engine.components.transformer
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in transformer.modules())
    assert np.isfinite(pixels(result)).all()


def test_a_controlnets_own_blocks_are_guarded_too(tiny_dir, tmp_path):
    """Its control blocks are Z-Image blocks that overflow as the transformer's do: guarded with it,
    a float16 run with a control image stays float16 and close to float32, and `remove` undoes them."""
    from zturbo.accel.fuse import controlnet_blocks
    from zturbo.tiny import write_tiny_controlnet

    path = write_tiny_controlnet(tmp_path / "cn.safetensors", "2.1")
    tensors = load_file(path)
    for key in tensors:
        if key.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            tensors[key] = tensors[key] * OVERFLOW_FACTOR
    save_file(tensors, path, metadata={"format": "pt"})
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    params = {**PARAMS, "steps": 2, "control_image": control, "control_type": "depth"}
    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", controlnet=str(path))
    want = pixels(Engine.load(config).generate("a red fox", **params))
    engine = Engine.load(dataclasses.replace(config, dtype="float16"))
    blocks = list(controlnet_blocks(engine.controlnet.model))
    before = [b.feed_forward.w3.weight.clone() for b in blocks]
    result = engine.generate("a red fox", **params)
    assert result.fallbacks == [] and np.isfinite(pixels(result)).all()
    assert np.abs(pixels(result) - want).mean() < 3
    engine.guard.remove()
    assert all(torch.equal(b.feed_forward.w3.weight, w * FFN_SCALE) for b, w in zip(blocks, before, strict=True))
    assert not any(m._forward_hooks or m._forward_pre_hooks for b in blocks for m in b.modules())
