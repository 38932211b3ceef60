"""Context parallel for one image: the transformer's tokens split across N processes.

Every process holds the whole model and runs the same step. The patch embedding, the timestep
embedding and the two caption-refiner blocks (a few dozen tokens) run whole on every process.
The image's tokens are split through the two noise-refiner blocks and gathered after them; the
unified sequence (image tokens, then caption tokens) is then split again through the 30 main
layers. Each split pads to a multiple of N and gives every process a contiguous 1/N. Attention is
Ulysses: an all-to-all trades the token split for a head split, each process attends over all
tokens with its share of the heads, and a second all-to-all trades back. The final layer's output
is all-gathered, so every process ends the step with the whole prediction and the sampling loop,
the scheduler and the VAE run unchanged.

Z-Image has 30 heads, which 4 and 8 do not divide: the heads are padded with zeros to a multiple
of N (32 for 4 and 8; a zero query and key attend uniformly over zero values, and the padded heads
are dropped after the return trip), costing 2/30 more attention work on 4 or 8 processes. Padded
tokens are masked out as keys and dropped after the gather.

The collectives are PyTorch's functional ones (`torch.distributed._functional_collectives`):
dynamo traces them into compiled blocks and, on NCCL, CUDA graphs capture them; on the CPU the same
code runs on gloo. diffusers' own context-parallel attention (`ContextParallelConfig`) was not used:
its plain Ulysses refuses 30 heads on 4 or 8 processes, and its "Ulysses anything" mode gathers the
shard sizes with a host sync on every attention call, which no CUDA graph can capture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from ..errors import InvalidRequestError

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
SHARDED = "zturbo_sequence_shards"  # attribute of a transformer whose tokens are split


@dataclass(frozen=True)
class Shards:
    """This process's place among the `size` processes that share one image's tokens."""

    group: Any  # the torch.distributed process group of those processes
    rank: int  # this process's rank in `group`
    size: int


def check_shards(parallel: int, shards: Shards | None) -> None:
    """An engine of `parallel` processes needs this process's place among them, and no other."""
    size = shards.size if shards is not None else 1
    if size != parallel:
        raise InvalidRequestError(
            f"parallel {parallel} needs {parallel} processes joined in one group (zturbo.distributed.launch), "
            f"but this process was given a group of {size}"
        )


def first_processes(value: Any, shards: Shards) -> Any:
    """`value` as the group's first process has it, on every process: what each process was asked
    may differ where it drew something at random (a seed), and all must compute the same image."""
    box = [value]
    dist.broadcast_object_list(box, group=shards.group, group_src=0)
    return box[0]


def padded(length: int, size: int) -> int:
    """`length` rounded up to a multiple of `size`."""
    return -(-length // size) * size


def ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, shards: Shards, attend: Attend) -> Any:
    """Attention of this process's tokens against every process's, heads split across processes.

    q, k, v: (B, S/N, H, D), this process's tokens; mask: None or (B, 1, 1, S) over all tokens.
    Returns (B, S/N, H, D), what whole-sequence attention gives for these tokens.
    """
    heads = q.shape[2]
    pad = padded(heads, shards.size) - heads
    q, k, v = (_to_heads(F.pad(t, (0, 0, 0, pad)) if pad else t, shards) for t in (q, k, v))
    out = _to_tokens(attend(q, k, v, mask), shards)
    return out[:, :, :heads] if pad else out


def _to_heads(x: torch.Tensor, shards: Shards) -> torch.Tensor:
    """(B, S/N, Hp, D) -> (B, S, Hp/N, D): every process's tokens, this process's heads."""
    b, s, h, d = x.shape
    n = shards.size
    send = x.reshape(b, s, n, h // n, d).permute(2, 1, 0, 3, 4).contiguous()  # chunk j goes to rank j
    got = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, shards.group))
    return got.permute(2, 0, 1, 3, 4).reshape(b, n * s, h // n, d)  # chunk j: rank j's tokens


def _to_tokens(x: torch.Tensor, shards: Shards) -> torch.Tensor:
    """(B, S, Hp/N, D) -> (B, S/N, Hp, D), the inverse of `_to_heads`."""
    b, s, h, d = x.shape
    n = shards.size
    send = x.reshape(b, n, s // n, h, d).transpose(0, 1).contiguous()  # chunk j: rank j's tokens
    got = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, shards.group))
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h, d)  # chunk j: rank j's heads


def shard_tokens(transformer: torch.nn.Module, shards: Shards) -> None:
    """Split `transformer`'s image tokens through the noise refiner, and its unified sequence
    through the main layers, across `shards`; attention aside (the blocks' processors do their
    part, `accel.compile.install_sequence`). Idempotent."""
    if getattr(transformer, SHARDED, None) is not None:
        return
    image: dict[str, int] = {}
    refiner = list(transformer.noise_refiner)
    for i, block in enumerate(refiner):
        block.register_forward_pre_hook(functools.partial(_split_refiner_input, shards, image, i == 0))
    refiner[-1].register_forward_hook(functools.partial(_gather_hook, shards, image))
    unified: dict[str, int] = {}
    build = transformer._build_unified_sequence
    transformer._build_unified_sequence = functools.partial(_shard_unified, build, shards, unified)
    for final in transformer.all_final_layer.values():
        final.register_forward_hook(functools.partial(_gather_hook, shards, unified))
    setattr(transformer, SHARDED, shards)


def _split_refiner_input(shards: Shards, state: dict[str, int], first: bool, module: Any, args: tuple) -> tuple:
    """A noise-refiner block's (x, mask, freqs, ...) as this process's image tokens: x is split
    at the first block (the next ones get the previous one's split output), the rotary table at
    every block (each gets the whole one)."""
    x, mask, freqs, adaln, noise, *rest = args
    if noise is not None:
        raise InvalidRequestError("context parallel runs the plain Z-Image transformer, not its omni mode")
    if first:
        state["length"] = x.shape[1]
        x = _split(x, state["length"], shards)
    mask = _padded_mask(mask, x.shape[0], state["length"], shards, x.device)
    return (x, mask, _split(freqs, state["length"], shards), adaln, noise, *rest)


def _shard_unified(build: Callable[..., Any], shards: Shards, state: dict[str, int], *args: Any, **kwargs: Any) -> Any:
    """diffusers' unified sequence, padded to a multiple of N tokens, as this process's slice (the
    mask stays whole: after the all-to-all every process attends over all keys)."""
    unified, freqs, mask, noise = build(*args, **kwargs)
    if noise is not None:
        raise InvalidRequestError("context parallel runs the plain Z-Image transformer, not its omni mode")
    state["length"] = length = unified.shape[1]
    mask = _padded_mask(mask, unified.shape[0], length, shards, unified.device)
    return _split(unified, length, shards), _split(freqs, length, shards), mask, noise


def _split(x: torch.Tensor, length: int, shards: Shards) -> torch.Tensor:
    """This process's contiguous share of x's `length` tokens (dim 1), padded to a multiple of N."""
    total = padded(length, shards.size)
    if total != length:
        x = F.pad(x, (0,) * (2 * (x.ndim - 2)) + (0, total - length))
    local = total // shards.size
    return x[:, shards.rank * local : (shards.rank + 1) * local]


def _padded_mask(mask: Any, batch: int, length: int, shards: Shards, device: torch.device) -> Any:
    """The keys' mask (B, S) over all processes' tokens, the padding masked out; None where there
    is neither padding nor a mask."""
    total = padded(length, shards.size)
    if total == length:
        return mask
    real = mask if mask is not None else torch.ones((batch, length), dtype=torch.bool, device=device)
    return F.pad(real, (0, total - length), value=False)


def _gather_hook(shards: Shards, state: dict[str, int], module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
    """A block's output (B, S/N, C) on every process -> (B, S, C) of all tokens, padding dropped."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the older torch name
    whole = funcol.wait_tensor(gather(out.transpose(0, 1).contiguous(), 0, shards.group))
    return whole[: state["length"]].transpose(0, 1)
