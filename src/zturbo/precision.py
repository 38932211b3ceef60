"""Precision policy: a dtype per component chosen from the device, with the reason, and the fallback order.

Latents and the scheduler step always run in float32 (the engine enforces it); this module decides
the weights/compute dtype of the transformer, the text encoder and the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .device import DTYPES, Capabilities, dtype_name
from .errors import DeviceError

COMPONENTS = ("transformer", "text_encoder", "vae")


@dataclass(frozen=True)
class Choice:
    dtype: torch.dtype
    reason: str


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtype each component runs in, and why."""

    transformer: Choice
    text_encoder: Choice
    vae: Choice

    def dtypes(self) -> dict[str, torch.dtype]:
        return {c: getattr(self, c).dtype for c in COMPONENTS}

    def names(self) -> dict[str, str]:
        return {c: dtype_name(getattr(self, c).dtype) for c in COMPONENTS}

    def with_dtype(self, component: str, dtype: torch.dtype, reason: str) -> PrecisionPlan:
        return replace(self, **{component: Choice(dtype, reason)})


def choose_precision(
    caps: Capabilities,
    *,
    dtype: str = "auto",
    overrides: dict[str, str | None] | None = None,
    vae_force_upcast: bool = True,
) -> PrecisionPlan:
    """Device default per component; `dtype` (all components) then `overrides` (one each) win over it."""
    plan = _device_default(caps, vae_force_upcast)
    if dtype != "auto":
        chosen = _checked(dtype, caps)
        plan = PrecisionPlan(*(Choice(chosen, f"--dtype {dtype}") for _ in COMPONENTS))
    for component, name in (overrides or {}).items():
        if name is not None and name != "auto":
            flag = "--" + component.replace("_", "-") + "-dtype"
            plan = plan.with_dtype(component, _checked(name, caps), f"{flag} {name}")
    return plan


def _device_default(caps: Capabilities, vae_force_upcast: bool) -> PrecisionPlan:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if caps.device.startswith("cuda"):
        cc = ".".join(map(str, caps.compute_capability or ()))
        if caps.bf16:
            why = f"sm_{cc.replace('.', '')} computes bfloat16 natively: half the memory of float32, float32's range"
            return PrecisionPlan(Choice(bf16, why), Choice(bf16, why), Choice(bf16, why))
        why = f"sm_{cc.replace('.', '')} has no bfloat16; float16 with the overflow guard is its fast path"
        vae = (
            Choice(fp32, "float16 VAE can overflow and the VAE config sets force_upcast")
            if vae_force_upcast
            else Choice(fp16, "VAE config allows float16 (force_upcast false)")
        )
        return PrecisionPlan(Choice(fp16, why), Choice(fp16, why), vae)
    if caps.device.startswith("mps"):
        why = "MPS computes bfloat16 (macOS 14+), avoiding float16's overflow"
        return PrecisionPlan(Choice(bf16, why), Choice(bf16, why), Choice(fp32, "VAE config sets force_upcast"))
    why = "CPU: half precision is emulated or slower there"
    return PrecisionPlan(Choice(fp32, why), Choice(fp32, why), Choice(fp32, why))


def _checked(name: str, caps: Capabilities) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and not caps.bf16:
        raise DeviceError(f"dtype bfloat16 is not supported on {caps.name}; use float16 or float32")
    return dtype


def safer(dtype: torch.dtype, caps: Capabilities) -> torch.dtype | None:
    """The next dtype to try after a non-finite result: float16 -> bfloat16 (if supported) -> float32."""
    if dtype is torch.float16:
        return torch.bfloat16 if caps.bf16 else torch.float32
    if dtype is torch.bfloat16:
        return torch.float32
    return None


class NonFiniteError(Exception):
    """Internal signal: a stage produced NaN/Inf; `component` is the one at fault."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(reason)
        self.component = component
        self.reason = reason


def all_finite(tensors: list[torch.Tensor] | torch.Tensor) -> bool:
    """One host sync for any number of tensors."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return bool(flags.all())
