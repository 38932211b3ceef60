"""The transformer's repeated blocks, and fused projections: q/k/v and the SwiGLU's w1/w3 as one GEMM each.

Fusing changes no result: the separate weights become views into the concatenated tensor, so the
state dict keeps its keys and in-place changes (the float16 guard's scaling of w3) reach the fused tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")
# A ControlNet's own blocks (diffusers' ZImageControlNetModel), in the order a step runs them:
# the control refiner blocks (absent under 2.0's arrangement, which runs the control layers in
# their place), then the control layers.
CONTROL_BLOCK_LISTS = ("control_noise_refiner", "control_layers")
FUSED_QKV = "zturbo_fused_qkv"  # attribute of an attention module whose q/k/v weights are fused


def transformer_blocks(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for name in BLOCK_LISTS:
        yield from getattr(transformer, name)


def controlnet_blocks(controlnet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A ControlNet's own blocks; the transformer's refiners it shares are the transformer's."""
    for name in CONTROL_BLOCK_LISTS:
        yield from getattr(controlnet, name, None) or ()


def is_control_block(block: torch.nn.Module) -> bool:
    """A block that takes (control context, hidden states, ...) and stacks its hints (diffusers'
    ZImageControlTransformerBlock), unlike the (hidden states, ...) blocks of the transformer."""
    return hasattr(block, "after_proj")


def fuse_projections(transformer: torch.nn.Module | None, blocks: Iterable[torch.nn.Module] | None = None) -> None:
    """Concatenate q/k/v and the SwiGLU's w1/w3 weights per block, so each pair/triple is one GEMM:
    in all the transformer's blocks, or in `blocks` (a ControlNet's)."""
    for block in transformer_blocks(transformer) if blocks is None else blocks:
        attn, ffn = block.attention, block.feed_forward
        if getattr(attn, FUSED_QKV, None) is not None:
            continue
        setattr(attn, FUSED_QKV, _concat_as_views(attn.to_q, attn.to_k, attn.to_v))
        w13 = _concat_as_views(ffn.w1, ffn.w3)
        ffn.forward = _fused_swiglu(ffn, w13)


def unfuse_projections(transformer: torch.nn.Module | None, blocks: Iterable[torch.nn.Module] | None = None) -> None:
    """Back to one product per projection, in all blocks or in `blocks` (before quantizing the
    separate linears, or before a block's weights move into streaming memory: the fused tensor is
    a copy the streamed views would not reach)."""
    for block in transformer_blocks(transformer) if blocks is None else blocks:
        if getattr(block.attention, FUSED_QKV, None) is not None:
            delattr(block.attention, FUSED_QKV)
            del block.feed_forward.forward


def _concat_as_views(*linears: torch.nn.Linear) -> torch.Tensor:
    fused = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _fused_swiglu(ffn: torch.nn.Module, w13: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return ffn.w2(ffn._forward_silu_gating(gate, up))  # w2's hooks (the fp16 guard) still run

    return forward
