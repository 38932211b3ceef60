"""Weight streaming: blocks whose weights live in pinned host memory and pass through the GPU.

The block-offload and te-offload plans run on this. Each streamed block's parameters and buffers
are packed back to back into one pinned host buffer, and its tensors are re-pointed, for good, at
views of one of two device slots (alternating along the execution order). Before a block runs,
the compute stream waits for its copy; after it ran, the next block that shares its slot is
copied in on a side stream, so that copy overlaps the other slot's block. One copy per block,
because on an H100 (PCIe 5) one 512 MiB pinned copy runs at 55 GB/s and the same bytes as 8 MiB
tensors at 33 GB/s (`scripts/bench_pcie.py`).

Quantized weights stream as they are stored, so a block of 8-bit weights moves half the bytes of
a bf16 one: a torchao weight (a tensor subclass) is packed as its inner tensors (data and scales)
and rebuilt around views of the slot with `__tensor_unflatten__`; a GGUF weight is a plain tensor
of raw bytes with a type tag, streamed like any other.

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


@dataclass(frozen=True)
class _Leaf:
    """A plain tensor's bytes in a packed buffer: at `offset`, laid out as `shape` and `stride`."""

    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Wrapped:
    """A tensor subclass (torchao's quantized weights) packed as its inner tensors, rebuilt around
    views of the buffer with `__tensor_unflatten__`."""

    cls: type
    context: Any
    size: torch.Size
    stride: tuple[int, ...]
    inner: dict[str, _Leaf | _Wrapped]


@dataclass
class _Tensor:
    module: torch.nn.Module
    name: str
    is_param: bool
    packed: _Leaf | _Wrapped


@dataclass
class _Block:
    module: torch.nn.Module
    slot: int
    host: torch.Tensor  # uint8, pinned when streaming to CUDA
    tensors: list[_Tensor] = field(default_factory=list)
    ready: Any = None  # CUDA event: this block's bytes are in its slot


def streamable(block: torch.nn.Module) -> bool:
    """Whether every tensor of `block` can be packed: strided ones, plain or quantized (a sparse
    tensor cannot)."""
    return all(_strided(t) for t in _tensors(block))


def _strided(tensor: torch.Tensor) -> bool:
    if _is_wrapper(tensor):
        return all(_strided(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.layout == torch.strided


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
                _set(t, _build(t.packed, b.host))
        self.blocks.clear()
        self.slots.clear()

    def host_view(self, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        """The host copy of `module`'s tensor `name` if a streamed block holds it (what to edit:
        the device slot is refilled from it)."""
        for b in self.blocks:
            for t in b.tensors:
                if t.module is module and t.name == name:
                    return _build(t.packed, b.host)
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
                self.tensors[name] += _pack(module, host, self.arena, offset)
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
                _set(t, _build(t.packed, self.hosts[name]))
        self.tensors.clear()

    def host_view(self, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        """As `BlockStreamer.host_view`."""
        for group, entries in self.tensors.items():
            for t in entries:
                if t.module is module and t.name == name:
                    return _build(t.packed, self.hosts[group])
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


def _pack(module: torch.nn.Module, host: torch.Tensor, target: torch.Tensor, start: int = 0) -> list[_Tensor]:
    """Copy `module`'s tensors back to back (aligned) into `host` from byte `start` on, and
    re-point them, for good, at the same offsets in `target` (device memory). A quantized weight
    packs its inner tensors (what it stores: 8-bit or 4-bit data and its scales)."""
    entries, offset = [], start
    for owner, name, tensor, is_param in _named_tensors(module):
        packed, offset = _layout(tensor, offset)
        _copy_into(packed, tensor.detach(), host)
        entry = _Tensor(owner, name, is_param, packed)
        _set(entry, _build(packed, target))
        entries.append(entry)
    return entries


def _layout(tensor: torch.Tensor, offset: int) -> tuple[_Leaf | _Wrapped, int]:
    """Where `tensor`'s bytes go from `offset` on, and the offset after them."""
    if _is_wrapper(tensor):
        names, context = tensor.__tensor_flatten__()
        inner: dict[str, _Leaf | _Wrapped] = {}
        for name in names:
            inner[name], offset = _layout(getattr(tensor, name), offset)
        return _Wrapped(type(tensor), context, tensor.shape, tuple(tensor.stride()), inner), offset
    # Kept strides: a quantized weight's kernels may expect its inner tensors transposed.
    stride = tuple(tensor.stride()) if _dense(tensor) else tuple(torch.empty(tensor.shape, device="meta").stride())
    leaf = _Leaf(offset, tensor.shape, stride, tensor.dtype)
    return leaf, offset + _aligned(tensor.numel() * tensor.element_size())


def _is_wrapper(tensor: torch.Tensor) -> bool:
    """A tensor subclass made of inner tensors (torchao's); GGUF's parameters are plain bytes
    with a type tag, streamed as plain tensors."""
    return hasattr(type(tensor), "__tensor_flatten__")


def _dense(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s elements fill exactly `numel` places of its storage (strides permuted)."""
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True) if n)
    return tensor.numel() == 0 or span == tensor.numel()


def _copy_into(packed: _Leaf | _Wrapped, tensor: torch.Tensor, buffer: torch.Tensor) -> None:
    if isinstance(packed, _Wrapped):
        for name, inner in packed.inner.items():
            _copy_into(inner, getattr(tensor, name), buffer)
        return
    _leaf_view(buffer, packed).copy_(tensor)


def _build(packed: _Leaf | _Wrapped, buffer: torch.Tensor) -> torch.Tensor:
    """The tensor `packed` describes, made of views of `buffer`."""
    if isinstance(packed, _Leaf):
        return _leaf_view(buffer, packed)
    inner = {name: _build(p, buffer) for name, p in packed.inner.items()}
    return packed.cls.__tensor_unflatten__(inner, packed.context, packed.size, packed.stride)


def _leaf_view(buffer: torch.Tensor, leaf: _Leaf) -> torch.Tensor:
    nbytes = leaf.shape.numel() * leaf.dtype.itemsize
    return buffer[leaf.offset : leaf.offset + nbytes].view(leaf.dtype).as_strided(leaf.shape, leaf.stride)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for *_, t, _ in _named_tensors(module)]


def _named_tensors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor, bool]]:
    out = []
    for owner in module.modules():
        out += [(owner, n, p, True) for n, p in owner._parameters.items() if p is not None]
        out += [(owner, n, b, False) for n, b in owner._buffers.items() if b is not None]
    return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_size(module: torch.nn.Module) -> int:
    """Bytes of `module`'s tensors packed back to back (each inner tensor aligned to ALIGN): for
    quantized weights, their stored size."""
    offset = 0
    for tensor in _tensors(module):
        _, offset = _layout(tensor, offset)
    return offset


def _set(t: _Tensor, value: torch.Tensor) -> None:
    if not t.is_param:
        t.module._buffers[t.name] = value
    elif isinstance(t.packed, _Leaf):  # the same Parameter (a GGUF one keeps its type tag)
        t.module._parameters[t.name].data = value
    else:  # a subclass is rebuilt around the views, so a new Parameter holds it
        t.module._parameters[t.name] = torch.nn.Parameter(value, requires_grad=False)
