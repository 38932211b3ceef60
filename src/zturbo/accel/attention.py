"""The attention kernel of the compiled transformer blocks: FlashAttention 3 where it is installed
and the GPU is a Hopper (compute capability 9.x), PyTorch's SDPA otherwise (cuDNN's flash kernel
on an H100, 570 TFLOP/s on a block's shape against 338 for SDPA's own flash backend).

FA3 is the `flash_attn_interface` module that flash-attention's `hopper/` build installs. zturbo
calls it through a custom op of its own, `zturbo::flash_attention_3`, so dynamo never traces FA3's
Python: whichever FA3 version is installed, a compiled block sees one opaque call. Before first
use the op is checked once on the device against SDPA, on the strided layout the blocks pass (q,
k and v as views of one fused projection); an error or a mismatch keeps SDPA, with one warning.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("zturbo")

FLASH_ATTENTION_3_DEVICES = ("cuda",)  # device types FA3's kernels take (the CPU tests' stand-in adds "cpu")
CHECK_TOLERANCE = 1e-2  # relative error against SDPA on the check's random bf16 inputs


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v (B, S, H, D) -> (B, S, H, D) with PyTorch's scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, flash3: Any = None
) -> torch.Tensor:
    """(B, S, H, D) attention with `flash3` (from `flash_attention_3()`) where it applies: CUDA
    tensors (an engine on the CPU of a Hopper machine must not reach it), no mask (FA3's dense call
    has none) and half-precision inputs; SDPA otherwise."""
    usable = q.device.type in FLASH_ATTENTION_3_DEVICES and q.dtype in (torch.bfloat16, torch.float16)
    if flash3 is not None and usable and mask is None:
        return flash3(q, k, v)
    return sdpa(q, k, v, mask)


def flash_attention_3(enabled: bool = True) -> Any:
    """The FA3 op for the current CUDA device, or None: not `enabled` (`AccelOptions.flash_attention_3`),
    no CUDA, not a Hopper, FA3 not installed, or its check failed. Call it outside compiled code (it
    may import and run FA3)."""
    if not enabled or not torch.cuda.is_available():
        return None
    if not runs_on(torch.cuda.get_device_capability()):
        return None
    return checked(torch.device("cuda", torch.cuda.current_device()))


def runs_on(capability: tuple[int, int] | None) -> bool:
    """Whether FA3's kernels run on a GPU of this compute capability: Hopper (9.x) only."""
    return capability is not None and capability[0] == 9


@functools.cache
def checked(device: torch.device) -> Any:
    """The op if `flash_attn_interface` imports and agrees with SDPA on `device`; else None."""
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError:
        return None
    op = _op()
    try:
        error = _check(op, device)
    except Exception as e:  # an FA3 build that cannot run here: keep SDPA
        log.warning("attention: FlashAttention 3 is installed but failed its check (%s); using SDPA", e)
        return None
    if not error <= CHECK_TOLERANCE:
        log.warning("attention: FlashAttention 3 differs from SDPA by %.2e (relative); using SDPA", error)
        return None
    log.info("attention: FlashAttention 3 (relative difference from SDPA %.1e)", error)
    return op


def _check(op: Any, device: torch.device) -> float:
    """Relative difference between `op` and SDPA on q, k, v taken from one fused projection."""
    generator = torch.Generator(device=device).manual_seed(0)
    heads, dim, tokens = 4, 128, 300  # 300: not a multiple of FA3's tile sizes
    qkv = torch.randn(2, tokens, 3 * heads * dim, generator=generator, device=device, dtype=torch.bfloat16)
    q, k, v = (t.unflatten(-1, (heads, dim)) for t in qkv.chunk(3, dim=-1))
    got, want = op(q, k, v).float(), sdpa(q, k, v).float()
    return float((got - want).norm() / want.norm())


@functools.cache
def _op() -> Any:
    """Register `zturbo::flash_attention_3(q, k, v) -> out`, all (B, S, H, D), once per process."""

    @torch.library.custom_op("zturbo::flash_attention_3", mutates_args=())
    def flash_attention_3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q, k, v)
        # Older FA3 builds return (out, softmax_lse).
        return (out[0] if isinstance(out, tuple) else out).contiguous()

    @flash_attention_3.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape)

    return flash_attention_3
