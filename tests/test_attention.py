"""The attention backend: SDPA by default, FlashAttention 3 only where it is installed and checks out.

No FA3 build runs on the CPU, so a stand-in `flash_attn_interface` module (SDPA underneath, in FA3's
(B, S, H, D) layout) exercises zturbo's side: the custom op, its fake for compilation, the check
and the choice.
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch

from zturbo.accel import attention


def fake_fa3(result: str = "exact") -> types.ModuleType:
    """A stand-in for FA3's Python module: `flash_attn_func(q, k, v)` on (B, S, H, D) tensors."""

    def flash_attn_func(q, k, v, **_):
        module.calls += 1
        if result == "raises":
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        out = attention.sdpa(q, k, v)
        if result == "wrong":
            out = torch.zeros_like(out)
        return (out, torch.zeros(q.shape[:3])) if result == "tuple" else out

    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = flash_attn_func
    module.calls = 0
    return module


@pytest.fixture
def installed(monkeypatch):
    def install(result: str = "exact") -> types.ModuleType:
        module = fake_fa3(result)
        monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
        monkeypatch.setattr(attention, "FLASH_ATTENTION_3_DEVICES", ("cuda", "cpu"))  # the stand-in runs on the CPU
        attention.checked.cache_clear()
        return module

    yield install
    attention.checked.cache_clear()


def qkv(dtype: torch.dtype = torch.bfloat16, tokens: int = 40) -> tuple[torch.Tensor, ...]:
    fused = torch.randn(2, tokens, 3 * 4 * 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    return tuple(t.unflatten(-1, (4, 16)) for t in fused.chunk(3, dim=-1))  # strided views, as in a block


def test_sdpa_is_used_without_flash_attention_3():
    q, k, v = qkv()
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(attention.attend(q, k, v, None, None), want.transpose(1, 2), rtol=0, atol=0)
    if not torch.cuda.is_available():
        assert attention.flash_attention_3() is None  # nothing to run FA3 on


@pytest.mark.parametrize("result", ["exact", "tuple"])
def test_an_installed_fa3_that_agrees_with_sdpa_is_chosen(installed, result):
    fa3 = installed(result)
    op = attention.checked(torch.device("cpu"))
    assert op is not None and fa3.calls == 1  # its check
    q, k, v = qkv()
    torch.testing.assert_close(attention.attend(q, k, v, None, op), attention.sdpa(q, k, v))
    assert fa3.calls == 2


@pytest.mark.parametrize(("result", "message"), [("wrong", "differs from SDPA"), ("raises", "failed its check")])
def test_an_fa3_that_fails_its_check_is_not_used(installed, caplog, result, message):
    installed(result)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        assert attention.checked(torch.device("cpu")) is None
    assert message in caplog.text and "using SDPA" in caplog.text


def test_fa3_is_not_looked_for_when_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import fails
    attention.checked.cache_clear()
    try:
        assert attention.checked(torch.device("cpu")) is None
    finally:
        attention.checked.cache_clear()


def test_masks_and_float32_stay_on_sdpa(installed):
    installed("wrong")  # any call of the op would show as zeros
    op = attention._op()
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, q.shape[1], dtype=torch.bool)
    torch.testing.assert_close(attention.attend(q, k, v, mask, op), attention.sdpa(q, k, v, mask))
    q32, k32, v32 = qkv(torch.float32)
    torch.testing.assert_close(attention.attend(q32, k32, v32, None, op), attention.sdpa(q32, k32, v32))


def test_the_op_compiles_as_one_opaque_call(installed):
    # dynamo must not trace into FA3's Python: the custom op's fake gives the output's shape.
    fa3 = installed()
    op = attention.checked(torch.device("cpu"))
    q, k, v = qkv()

    def block(q, k, v):
        return attention.attend(q, k, v, None, op).flatten(2, 3) * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    calls = fa3.calls
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), rtol=0, atol=0)
    assert fa3.calls == calls + 2  # the compiled call ran FA3 too, once


def test_cpu_tensors_never_reach_fa3(installed, monkeypatch):
    # An engine on the CPU of a Hopper machine gets the op from its processors; FA3's kernels
    # take CUDA tensors only, so CPU attention must stay on SDPA.
    fa3 = installed()
    op = attention.checked(torch.device("cpu"))
    monkeypatch.setattr(attention, "FLASH_ATTENTION_3_DEVICES", ("cuda",))
    calls = fa3.calls
    q, k, v = qkv()
    torch.testing.assert_close(attention.attend(q, k, v, None, op), attention.sdpa(q, k, v), rtol=0, atol=0)
    assert fa3.calls == calls


def test_compiled_blocks_attend_with_fa3_where_chosen(tiny_dir, installed, monkeypatch):
    # The whole engine, compiled (dynamo, no codegen), in bf16 with FA3 chosen: every block's
    # attention goes through the op, and the image is the SDPA image.
    from zturbo.accel import compile as accel
    from zturbo.accel.fuse import transformer_blocks
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    params = {"seed": 5, "steps": 2, "width": 64, "height": 48}
    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="bfloat16"))
    engine.accel = accel.apply(engine.components, accel.AccelOptions(compile=True, quantize="none", backend="eager"))
    sdpa_image = np.asarray(engine.generate("a red fox", **params).images[0].image, dtype=np.int16)
    engine.accel.revert_compile()

    fa3 = installed()
    monkeypatch.setattr(attention, "flash_attention_3", lambda enabled: attention.checked(torch.device("cpu")))
    engine.accel = accel.apply(engine.components, accel.AccelOptions(compile=True, quantize="none", backend="eager"))
    calls = fa3.calls
    fa3_image = np.asarray(engine.generate("a red fox", **params).images[0].image, dtype=np.int16)
    blocks = len(list(transformer_blocks(engine.components.transformer)))
    assert fa3.calls - calls >= blocks * params["steps"]
    assert np.abs(fa3_image - sdpa_image).max() <= 1
    engine.accel.revert_compile()
    # The option off: the same installed FA3 is not asked for, and attention is SDPA.
    off = accel.AccelOptions(compile=True, backend="eager", flash_attention_3=False)
    monkeypatch.setattr(
        attention, "flash_attention_3", lambda enabled: attention.checked(torch.device("cpu")) if enabled else None
    )
    engine.accel = accel.apply(engine.components, off)
    calls = fa3.calls
    engine.generate("a red fox", **params)
    assert fa3.calls == calls and engine.accel.attention == "sdpa"
