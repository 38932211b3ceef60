"""zturbo.memory.stream on the CPU: streamed blocks compute what they computed before, in any call order."""

from __future__ import annotations

import itertools

import torch

from zturbo.memory.stream import BlockStreamer, streamable


class Block(torch.nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 8))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def blocks(n: int = 5) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    # Unequal sizes: each of the two slots is sized by its largest block.
    return [Block(8 + 2 * i, float(i + 1)) for i in range(n)]


def run(mods: list[torch.nn.Module], x: torch.Tensor, order: list[int]) -> torch.Tensor:
    # Weights are only valid inside a block's forward: the slot is reused right after it.
    for i in order:
        x = mods[i](x)
    return x


def test_streamed_blocks_compute_the_same_in_order_and_out_of_order():
    plain, streamed = blocks(), blocks()
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    x = torch.randn(3, 8)
    for order in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [2, 2, 0]):
        assert torch.equal(run(streamed, x, order), run(plain, x, order)), order
    # Every block's weights now point into one of the two slots.
    slots = {s.untyped_storage().data_ptr() for s in streamer.slots}
    assert all(p.untyped_storage().data_ptr() in slots for m in streamed for p in m.parameters())


def test_remove_restores_ordinary_modules():
    plain, streamed = blocks(), blocks()
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    streamer.remove()
    x = torch.randn(3, 8)
    assert torch.equal(run(streamed, x, [4, 3, 2, 1, 0]), run(plain, x, [4, 3, 2, 1, 0]))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in streamed)


def test_quantized_weights_are_not_streamable():
    class Subclass(torch.Tensor):
        pass

    block = torch.nn.Linear(4, 4)
    assert streamable(block)
    block.weight = torch.nn.Parameter(block.weight.detach().as_subclass(Subclass))
    assert not streamable(block)


def test_streamed_blocks_are_spread_evenly():
    from zturbo.memory.placement import streamed_positions

    for total in (4, 34):
        for n in range(total + 1):
            chosen = streamed_positions(total, n)
            assert len(set(chosen)) == n and all(0 <= i < total for i in chosen)
            gaps = [b - a for a, b in itertools.pairwise(chosen)]
            assert not gaps or max(gaps) - min(gaps) <= 1  # no run of resident blocks longer than needed
