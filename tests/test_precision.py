"""Precision policy per device, and the automatic re-run after a non-finite result."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from zturbo.config import RuntimeConfig
from zturbo.device import Capabilities
from zturbo.engine import Engine
from zturbo.errors import DeviceError, PrecisionError
from zturbo.precision import choose_precision, safer
from zturbo.testing import inject_nonfinite

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def cuda(cc: tuple[int, int]) -> Capabilities:
    return Capabilities(
        "cuda", f"sm_{cc[0]}{cc[1]}", cc, bf16=cc >= (8, 0), fp16=True, fp8=cc >= (8, 9), flash_attention=cc >= (8, 0)
    )


CPU = Capabilities("cpu", "CPU", None, bf16=True, fp16=True, fp8=False, flash_attention=False)
MPS = Capabilities("mps", "Apple MPS", None, bf16=True, fp16=True, fp8=False, flash_attention=False)


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (cuda((7, 0)), (FP16, FP16, FP32)),  # V100: fp16 fast path, VAE upcast
        (cuda((7, 5)), (FP16, FP16, FP32)),  # T4, RTX 20xx
        (cuda((8, 0)), (BF16, BF16, BF16)),  # A100
        (cuda((8, 9)), (BF16, BF16, BF16)),  # L4, RTX 40xx
        (cuda((9, 0)), (BF16, BF16, BF16)),  # H100
        (CPU, (FP32, FP32, FP32)),
        (MPS, (BF16, BF16, FP32)),
    ],
    ids=["sm_70", "sm_75", "sm_80", "sm_89", "sm_90", "cpu", "mps"],
)
def test_policy_table(caps, expected):
    plan = choose_precision(caps)
    assert (plan.transformer.dtype, plan.text_encoder.dtype, plan.vae.dtype) == expected
    assert all(getattr(plan, c).reason for c in ("transformer", "text_encoder", "vae"))


def test_vae_without_force_upcast_may_use_float16_on_turing():
    assert choose_precision(cuda((7, 5)), vae_force_upcast=False).vae.dtype == FP16


def test_overrides_all_then_one():
    plan = choose_precision(cuda((9, 0)), dtype="float32", overrides={"transformer": "float16", "vae": None})
    assert plan.dtypes() == {"transformer": FP16, "text_encoder": FP32, "vae": FP32}
    assert plan.transformer.reason == "--transformer-dtype float16"
    assert plan.text_encoder.reason == "--dtype float32"


def test_bfloat16_refused_where_unsupported():
    with pytest.raises(DeviceError, match="bfloat16 is not supported on sm_75"):
        choose_precision(cuda((7, 5)), dtype="bfloat16")


def test_fallback_order():
    assert safer(FP16, cuda((9, 0))) is BF16
    assert safer(FP16, cuda((7, 5))) is FP32
    assert safer(BF16, CPU) is FP32
    assert safer(FP32, CPU) is None


@pytest.fixture
def bf16_engine(tiny_dir):
    return Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="bfloat16"))


class ForwardCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize(
    ("component", "reason"),
    [
        ("transformer", "non-finite latents after denoising"),
        ("text_encoder", "non-finite prompt embeddings"),
        ("vae", "non-finite image after decoding"),
    ],
)
def test_forced_nan_reruns_once_in_a_safer_dtype(bf16_engine, component, reason, caplog):
    counter = ForwardCounter(bf16_engine.components.transformer)
    module = getattr(bf16_engine.components, component)
    inject_nonfinite(module.decoder if component == "vae" else module)  # vae.decode() calls the decoder
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        result = bf16_engine.generate("a red fox", seed=3, steps=4, width=32, height=32)
    # The failed run and exactly one re-run; a VAE failure redoes only the decode.
    assert counter.count == (4 if component == "vae" else 8)
    record = {"component": component, "from": "bfloat16", "to": "float32", "reason": reason}
    assert result.fallbacks == [record]
    meta = result.images[0].metadata
    assert meta["fallbacks"] == [record]
    assert meta["dtypes"][component] == "float32"
    assert all(v == "bfloat16" for k, v in meta["dtypes"].items() if k != component)
    assert np.isfinite(np.asarray(result.images[0].image, dtype=float)).all()
    assert any("re-running in float32" in r.getMessage() for r in caplog.records)
    # The escalation sticks: the next request runs in float32 without another fallback.
    again = bf16_engine.generate("a red fox", seed=3, steps=4, width=32, height=32)
    assert again.fallbacks == [] and counter.count == (8 if component == "vae" else 12)


def test_non_finite_in_float32_is_a_clear_error(engine):
    inject_nonfinite(engine.components.transformer)
    with pytest.raises(PrecisionError, match=r"transformer produced non-finite values .* even in float32"):
        engine.generate("a red fox", seed=3, steps=2, width=32, height=32)
    # The engine is unchanged and healthy afterwards.
    assert engine.dtypes["transformer"] is FP32
    assert engine.generate("a red fox", seed=3, steps=2, width=32, height=32).fallbacks == []


def test_clean_run_records_no_fallback(engine):
    result = engine.generate("a red fox", seed=3, steps=2, width=32, height=32)
    assert result.images[0].metadata["fallbacks"] == []
