"""float16 overflow guard for one Z-Image transformer instance (and a ControlNet's blocks beside it).

Z-Image's activations leave float16's range (±65504) in the SwiGLU product, in the FFN and
attention outputs and in the final projection. Every block output passes an RMSNorm before it is
added back to the residual stream, so only the direction of those tensors matters, not their
scale. Two ways to keep them finite, both applied to hooks and weights of the instance given,
never to diffusers' classes:

- "scale": divide the weights of `w3` (hence the SwiGLU product and the FFN output) and of the
  attention's `to_out` by a power of two, and divide the following RMSNorm's eps by its square, so
  the normalised result is the same as unscaled, up to rounding. No extra kernels at run time.
  Clamps stay behind it as a backstop, so the result is finite whatever the activations do.
- "clamp": clamp those tensors to ±65504 (ComfyUI and SD.Next do this). Exact while nothing
  overflows, distorted where it does.

Either way the timestep embedder, caption embedder and final layer compute in float32 (they are
small, and the final layer's output is the velocity itself, which no norm follows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

FP16_MAX = 65504.0
VARIANTS = ("scale", "clamp")
DEFAULT_VARIANT = "scale"
# Powers of two, so scaling and unscaling the weights is exact, except for the few weights that
# scaling pushes into float16's subnormal range (|w| < 2^-14 * factor): they come back within
# factor * 2^-24.
FFN_SCALE = 32.0
ATTENTION_SCALE = 8.0
# Module prefixes loaded and kept in float32 when the transformer runs in float16.
FLOAT32_MODULES = ("t_embedder.", "cap_embedder.", "all_final_layer.")


@dataclass
class Fp16Guard:
    """What was done to one transformer; `remove()` undoes all of it (before a cast to bf16/fp32)."""

    variant: str
    transformer: torch.nn.Module
    handles: list[Any] = field(default_factory=list)
    scaled: list[tuple[torch.nn.Module, torch.nn.Module, float]] = field(default_factory=list)

    def describe(self) -> str:
        return describe(self.variant)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for linear, norm, factor in self.scaled:
            linear.weight.mul_(factor)
            norm.eps *= factor * factor
        self.handles.clear()
        self.scaled.clear()


def describe(variant: str = DEFAULT_VARIANT) -> str:
    """One line for metadata and `zturbo info`."""
    if variant == "scale":
        how = f"w3 weights /{FFN_SCALE:g} and attention to_out /{ATTENTION_SCALE:g} ahead of their RMSNorms"
        return f"{how}; clamp to ±65504 as backstop; embedders and final layer in float32"
    return "clamp SwiGLU product, FFN and attention outputs to ±65504; embedders and final layer in float32"


def install_fp16_guard(
    transformer: torch.nn.Module, variant: str = DEFAULT_VARIANT, blocks: Iterable[torch.nn.Module] = ()
) -> Fp16Guard:
    """Guard a float16 transformer in place; its FLOAT32_MODULES are made float32 if they are not.

    `blocks`: more blocks of the same kind to guard, a ControlNet's own (`accel.fuse.controlnet_blocks`):
    they are Z-Image transformer blocks whose outputs pass the same RMSNorms, and their hints join
    the transformer's float16 stream.
    """
    if variant not in VARIANTS:
        raise ValueError(f"fp16 guard variant {variant!r} is not one of {', '.join(VARIANTS)}")
    guard = Fp16Guard(variant, transformer)
    for prefix in FLOAT32_MODULES:  # already float32 when the loader kept them; a no-op then
        getattr(transformer, prefix.rstrip(".")).float()
    from .accel.fuse import transformer_blocks

    for block in (*transformer_blocks(transformer), *blocks):
        ffn, attention = block.feed_forward, block.attention
        if variant == "scale":
            _scale(guard, ffn.w3, block.ffn_norm2, FFN_SCALE)
            _scale(guard, attention.to_out[0], block.attention_norm2, ATTENTION_SCALE)
        guard.handles.append(ffn.w2.register_forward_pre_hook(_clamp_input))  # the SwiGLU product
        guard.handles.append(ffn.w2.register_forward_hook(_clamp_output))
        guard.handles.append(attention.to_out[0].register_forward_hook(_clamp_output))
    for module in (transformer.cap_embedder, *transformer.all_final_layer.values()):
        guard.handles.append(module.register_forward_pre_hook(_to_float32, with_kwargs=True))
    # The caption embedder's output joins the float16 stream; the final layer's stays float32.
    guard.handles.append(transformer.cap_embedder.register_forward_hook(_to_float16))
    return guard


def is_float32_key(key: str) -> bool:
    """Whether a transformer state-dict key belongs to a module kept in float32 under float16."""
    return key.startswith(FLOAT32_MODULES)


def _scale(guard: Fp16Guard, linear: torch.nn.Module, norm: torch.nn.Module, factor: float) -> None:
    # RMSNorm(x / s, eps / s²) == RMSNorm(x, eps): the block's output is unchanged.
    linear.weight.div_(factor)
    norm.eps /= factor * factor
    guard.scaled.append((linear, norm, factor))


def _clamp_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].clamp_(-FP16_MAX, FP16_MAX), *args[1:])


def _clamp_output(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.clamp_(-FP16_MAX, FP16_MAX)


def _to_float32(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    def cast(v: Any) -> Any:
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _to_float16(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.clamp(-FP16_MAX, FP16_MAX).half()
