"""Weight streaming: blocks whose weights live in pinned host memory and pass through the GPU.

The block-offload and te-offload plans run on this. Each streamed block's parameters and buffers
are packed back to back into one pinned host buffer, and its tensors are re-pointed, for good, at
views of one of two device slots (alternating along the execution order). Before a block runs,
the compute stream waits for its copy; after it ran, the next block that shares its slot is
copied in on a side stream, so that copy overlaps the other slot's block. One copy per block,
because on an H100 (PCIe 5) one 512 MiB pinned copy runs at 55 GB/s and the same bytes as 8 MiB
tensors at 33 GB/s (`scripts/bench_pcie.py`).

Blocks the budget allows stay resident and are not touched. The slot views never move, so the
blocks' forwards can be compiled; only the hooks around them run eagerly.

`SharedArena` is the same idea for two groups that take turns in one device buffer (te-offload:
the last transformer blocks and some text-encoder layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN = 256  # bytes: each tensor's offset in a slot, for aligned kernel loads


@dataclass
class _Tensor:
    module: torch.nn.Module
    name: str
    is_param: bool
    offset: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class _Block:
    module: torch.nn.Module
    slot: int
    host: torch.Tensor  # uint8, pinned when streaming to CUDA
    tensors: list[_Tensor] = field(default_factory=list)
    ready: Any = None  # CUDA event: this block's bytes are in its slot


def streamable(block: torch.nn.Module) -> bool:
    """Plain tensors only: quantized (tensor-subclass) weights cannot be packed as raw bytes."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in _tensors(block))


class BlockStreamer:
    """Streams `blocks` (in execution order) through two device slots; see the module docstring."""

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.blocks: list[_Block] = []
        sizes = [packed_size(b) for b in blocks]
        slot_bytes = [max(sizes[i::2], default=0) for i in range(2)]
        self.slots = [torch.empty(n, dtype=torch.uint8, device=device) for n in slot_bytes]
        self.owner: list[int | None] = [None, None]  # which block's bytes each slot holds (or will)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_free: list[Any] = [None, None]  # event: the slot's last block finished computing
        self._handles: list[Any] = []
        for i, (module, size) in enumerate(zip(blocks, sizes, strict=True)):
            self.blocks.append(self._pack(module, i % 2, size))
            self._handles.append(module.register_forward_pre_hook(self._before(i)))
            self._handles.append(module.register_forward_hook(self._after(i)))

    def remove(self) -> None:
        """Back to ordinary modules with their weights on the CPU (for a change of plan)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still write into slots about to be freed
        for h in self._handles:
            h.remove()
        for b in self.blocks:
            for t in b.tensors:
                _set(t, _view(b.host, t))
        self.blocks.clear()
        self.slots.clear()

    def host_view(self, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        """The host copy of `module`'s tensor `name` if a streamed block holds it (what to edit:
        the device slot is refilled from it)."""
        for b in self.blocks:
            for t in b.tensors:
                if t.module is module and t.name == name:
                    return _view(b.host, t)
        return None

    def invalidate(self) -> None:
        """Host copies changed: every block is copied in again before it next runs."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.owner = [None, None]

    # -- packing -------------------------------------------------------------------------------

    def _pack(self, module: torch.nn.Module, slot: int, size: int) -> _Block:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
        return _Block(module, slot, host, _pack(module, host, self.slots[slot]))

    # -- hooks ---------------------------------------------------------------------------------

    def _before(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            block = self.blocks[i]
            if self.owner[block.slot] != i:  # first call, or the order changed (an error mid-forward)
                self._load(i)
            if self.cuda and block.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(block.ready)

        return hook

    def _after(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            slot = self.blocks[i].slot
            if self.cuda:
                self.slot_free[slot] = torch.cuda.current_stream(self.device).record_event()
            following = self._next_in_slot(i)
            if following != i:
                self._load(following)

        return hook

    def _next_in_slot(self, i: int) -> int:
        n = len(self.blocks)
        return next((j % n for j in range(i + 1, i + n + 1) if self.blocks[j % n].slot == self.blocks[i].slot), i)

    def _load(self, i: int) -> None:
        """Copy block i into its slot: on the side stream after the slot's last user finished."""
        block = self.blocks[i]
        slot = self.slots[block.slot]
        self.owner[block.slot] = i
        if not self.cuda:
            slot[: block.host.numel()].copy_(block.host)
            return
        assert self.copy_stream is not None
        with torch.cuda.stream(self.copy_stream):
            if self.slot_free[block.slot] is not None:
                self.copy_stream.wait_event(self.slot_free[block.slot])
            slot[: block.host.numel()].copy_(block.host, non_blocking=True)
            block.ready = self.copy_stream.record_event()


class SharedArena:
    """Device memory that two groups of modules take turns in: the last transformer blocks while
    denoising, text-encoder layers while encoding (te-offload).

    Both groups' tensors are views of the same arena, for good; the bytes in it say which group
    can run. Each group is packed into one pinned host buffer and refilled with one copy on a side
    stream, after everything already queued on the compute stream (the other group's last use).
    A module's forward pre-hook fills the arena with its group if the other one is there and makes
    the compute stream wait for the copy, so the weights are right whatever called the module;
    `prefetch` starts the copy early (the engine's stages call it), so it overlaps other work:
    the encoder's layers come in during the VAE decode, the blocks during the first step's
    earlier blocks.
    """

    def __init__(self, groups: dict[str, Sequence[torch.nn.Module]], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        sizes = {name: sum(packed_size(m) for m in modules) for name, modules in groups.items()}
        self.arena = torch.empty(max(sizes.values(), default=0), dtype=torch.uint8, device=device)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.modules = {name: list(modules) for name, modules in groups.items()}
        self.hosts: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, list[_Tensor]] = {}
        self.holder: str | None = None  # whose bytes the arena holds (or will, once `ready`)
        self.ready: Any = None  # CUDA event: the holder's bytes have arrived
        self.fills = 0  # arena refills so far (a test and diagnostics counter)
        self._handles: list[Any] = []
        for name, modules in groups.items():
            host = torch.empty(sizes[name], dtype=torch.uint8, pin_memory=self.cuda)
            self.hosts[name], self.tensors[name], offset = host, [], 0
            for module in modules:
                packed = _pack(module, host[offset:], self.arena[offset:])
                for t in packed:
                    t.offset += offset
                self.tensors[name] += packed
                offset += packed_size(module)
                self._handles.append(module.register_forward_pre_hook(self._before(name)))
        first = next(iter(groups), None)
        if first is not None:
            self.prefetch(first)

    def prefetch(self, name: str) -> None:
        """Start filling the arena with group `name` (after the compute stream's queued work)."""
        if self.holder == name:
            return
        host = self.hosts[name]
        self.holder = name
        self.fills += 1
        if not self.cuda:
            self.arena[: host.numel()].copy_(host)
            return
        assert self.copy_stream is not None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.arena[: host.numel()].copy_(host, non_blocking=True)
            self.ready = self.copy_stream.record_event()

    def remove(self) -> None:
        """Back to ordinary modules with their weights on the CPU (for a change of plan)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still write into an arena about to be freed
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, entries in self.tensors.items():
            for t in entries:
                _set(t, _view(self.hosts[name], t))
        self.tensors.clear()

    def host_view(self, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        """As `BlockStreamer.host_view`."""
        for group, entries in self.tensors.items():
            for t in entries:
                if t.module is module and t.name == name:
                    return _view(self.hosts[group], t)
        return None

    def invalidate(self) -> None:
        """Host copies changed: the arena is filled again before its next use."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.holder = None

    def _before(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            self.prefetch(name)
            if self.cuda and self.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready)

        return hook


def _pack(module: torch.nn.Module, host: torch.Tensor, target: torch.Tensor) -> list[_Tensor]:
    """Copy `module`'s tensors back to back (aligned) into `host` and re-point them, for good, at
    the same offsets in `target` (device memory)."""
    entries, offset = [], 0
    for owner, name, tensor, is_param in _named_tensors(module):
        entry = _Tensor(owner, name, is_param, offset, tensor.shape, tensor.dtype)
        _view(host, entry).copy_(tensor.detach())
        _set(entry, _view(target, entry))
        entries.append(entry)
        offset += _aligned(tensor)
    return entries


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for *_, t, _ in _named_tensors(module)]


def _named_tensors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor, bool]]:
    out = []
    for owner in module.modules():
        out += [(owner, n, p, True) for n, p in owner._parameters.items() if p is not None]
        out += [(owner, n, b, False) for n, b in owner._buffers.items() if b is not None]
    return out


def _aligned(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN


def packed_size(module: torch.nn.Module) -> int:
    """Bytes of `module`'s tensors packed back to back (each aligned to ALIGN)."""
    return sum(_aligned(t) for t in _tensors(module))


def _view(buffer: torch.Tensor, t: _Tensor) -> torch.Tensor:
    nbytes = t.shape.numel() * torch.empty((), dtype=t.dtype).element_size()
    return buffer[t.offset : t.offset + nbytes].view(t.dtype).view(t.shape)


def _set(t: _Tensor, value: torch.Tensor) -> None:
    if t.is_param:
        t.module._parameters[t.name].data = value
    else:
        t.module._buffers[t.name] = value
