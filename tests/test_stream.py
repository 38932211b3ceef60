"""zturbo.memory.stream on the CPU: streamed blocks compute what they computed before, in any call order."""

from __future__ import annotations

import itertools

import pytest
import torch

from zturbo.accel.quantize import INT4_INSTALL, int4_kernels_missing
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


def int8_blocks(n: int = 5) -> list[torch.nn.Module]:
    """`blocks()` with their linears quantized by torchao (int8 weight-only runs on the CPU)."""
    from torchao import quantization as tq

    mods = blocks(n)
    for m in mods:
        tq.quantize_(m, tq.Int8WeightOnlyConfig(set_inductor_config=False))
    return mods


def test_int8_blocks_stream_their_quantized_bytes_and_compute_the_same():
    pytest.importorskip("torchao")
    plain, streamed = int8_blocks(), int8_blocks()
    weight = streamed[1].net[0].weight
    assert type(weight).__name__ == "Int8Tensor"
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    x = torch.randn(3, 8)
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [2, 2, 0]):
        assert torch.equal(run(streamed, x, order), run(plain, x, order)), order
    # Still quantized, its inner tensors now views of a slot.
    weight = streamed[1].net[0].weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    slots = {s.untyped_storage().data_ptr() for s in streamer.slots}
    assert weight.qdata.untyped_storage().data_ptr() in slots
    # The host buffer holds what the block stores: int8 data and float32 scales, not float32 weights.
    for block, packed in zip(plain, streamer.blocks, strict=True):
        assert packed.host.numel() == sum(_aligned(t) for t in _stored_tensors(block))
    # A wide linear: a quarter of its float32 bytes, and a little for the per-row scales.
    from torchao import quantization as tq

    wide = torch.nn.Linear(512, 512, bias=False)
    tq.quantize_(wide, tq.Int8WeightOnlyConfig(set_inductor_config=False))
    host = BlockStreamer([wide], torch.device("cpu")).blocks[0].host
    assert 512 * 512 <= host.numel() <= 512 * 512 * 1.01


def _stored_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        names = t.__tensor_flatten__()[0] if hasattr(type(t), "__tensor_flatten__") else None
        out += [getattr(t, n) for n in names] if names else [t]
    return out


def _aligned(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // 256) * 256


def test_remove_gives_back_quantized_weights_on_the_host():
    pytest.importorskip("torchao")
    plain, streamed = int8_blocks(), int8_blocks()
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    host = streamer.host_view(streamed[2].net[2], "weight")
    assert type(host).__name__ == "Int8Tensor"
    assert host.qdata.untyped_storage().data_ptr() == streamer.blocks[2].host.untyped_storage().data_ptr()
    streamer.remove()
    x = torch.randn(3, 8)
    assert torch.equal(run(streamed, x, [4, 3, 2, 1, 0]), run(plain, x, [4, 3, 2, 1, 0]))


def test_what_can_be_streamed():
    class Subclass(torch.Tensor):
        pass

    block = torch.nn.Linear(4, 4)
    assert streamable(block)
    block.weight = torch.nn.Parameter(block.weight.detach().as_subclass(Subclass))  # a tagged plain tensor
    assert streamable(block)
    block.register_buffer("sparse", torch.eye(4).to_sparse())
    assert not streamable(block)


def test_streamed_blocks_are_spread_evenly():
    from zturbo.memory.placement import streamed_positions

    for total in (4, 34):
        for n in range(total + 1):
            chosen = streamed_positions(total, n)
            assert len(set(chosen)) == n and all(0 <= i < total for i in chosen)
            gaps = [b - a for a, b in itertools.pairwise(chosen)]
            assert not gaps or max(gaps) - min(gaps) <= 1  # no run of resident blocks longer than needed


class Wide(torch.nn.Module):
    """A block whose linears every torchao mode quantizes (widths in multiples of 128)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def quantized_wide_blocks(mode: str, n: int = 4) -> list[torch.nn.Module]:
    """bf16 blocks quantized on the GPU as Engine.load does for a streamed transformer, then sent
    back to the CPU (their home under block-offload)."""
    from torchao import quantization as tq

    from zturbo.accel.quantize import _torchao_config

    torch.manual_seed(0)
    mods = [Wide().to("cuda", torch.bfloat16) for _ in range(n)]
    for m in mods:
        tq.quantize_(m, _torchao_config(tq, mode))
    return mods


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 and int4 kernels need a CUDA GPU")
@pytest.mark.parametrize("mode", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_quantized_blocks_stream_through_gpu_slots(mode, compiled):
    pytest.importorskip("torchao")
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    if mode == "int4" and (missing := int4_kernels_missing()) is not None:
        pytest.skip(f"int4 needs torchao's kernels from mslk ({INT4_INSTALL}): {missing}")
    resident, streamed = quantized_wide_blocks(mode), quantized_wide_blocks(mode)
    for m in streamed:
        torch.nn.Module.to(m, "cpu")  # a quantized weight's inner tensors move with it
    streamer = BlockStreamer(streamed, torch.device("cuda"))
    kind = type(streamed[0].up.weight)
    assert kind is type(resident[0].up.weight) and kind not in (torch.Tensor, torch.nn.Parameter)
    assert streamed[0].up.weight.device.type == "cuda"
    plain_bytes = sum(p.numel() * 2 for m in streamed for p in m.parameters())
    assert sum(b.host.numel() for b in streamer.blocks) < plain_bytes * (0.3 if mode == "int4" else 0.55)
    if compiled:  # the slot views never move: compiled forwards keep reading them
        for m in (*resident, *streamed):
            m.forward = torch.compile(m.forward)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for order in ([0, 1, 2, 3], [0, 1, 2, 3], [2, 0, 3]):
            got, want = run(streamed, x, order), run(resident, x, order)
            if compiled:
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            else:
                assert torch.equal(got, want), order
