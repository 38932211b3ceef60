"""The benchmark's GGUF writer: its Q8_0 and Q4_K files read back with the gguf package to what was written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zturbo.bench import ggufwrite
from zturbo.errors import InvalidRequestError

pytest.importorskip("gguf")


def read_back(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each tensor's GGML type and its values, dequantized by the gguf package, in the stored shape."""
    from gguf import GGUFReader, quants

    out = {}
    for t in GGUFReader(path).tensors:
        values = quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type.name, values.reshape([int(d) for d in reversed(t.shape)]))
    return out


def state() -> dict[str, torch.Tensor]:
    """A transformer-like state in diffusers' key layout: rows 512 wide (whole Q4_K super-blocks),
    rows 64 wide (Q8_0 blocks only), a norm and a pad token (never quantized)."""
    g = torch.Generator().manual_seed(0)
    attention = {f"layers.0.attention.{n}.weight": torch.randn(64, 64, generator=g) for n in ("to_q", "to_k", "to_v")}
    return attention | {
        "layers.0.attention.to_out.0.weight": torch.randn(64, 64, generator=g),
        "layers.0.attention.norm_q.weight": torch.rand(64, generator=g) + 0.5,
        "layers.0.feed_forward.w1.weight": torch.randn(96, 512, generator=g) * 0.02,
        "x_pad_token": torch.randn(1, 64, generator=g),
    }


def original(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What each stored tensor should hold: q, k and v fused, keys renamed as city96's files have them."""
    qkv = torch.cat([weights[f"layers.0.attention.{n}.weight"] for n in ("to_q", "to_k", "to_v")])
    return {
        "layers.0.attention.qkv.weight": qkv.numpy(),
        "layers.0.attention.out.weight": weights["layers.0.attention.to_out.0.weight"].numpy(),
        "layers.0.attention.q_norm.weight": weights["layers.0.attention.norm_q.weight"].numpy(),
        "layers.0.feed_forward.w1.weight": weights["layers.0.feed_forward.w1.weight"].numpy(),
        "x_pad_token": weights["x_pad_token"].numpy(),
    }


def test_a_q8_0_file_reads_back_in_the_original_layout_within_q8_0s_step(tmp_path):
    weights = state()
    written = ggufwrite.write_transformer(tmp_path / "t.gguf", weights, "Q8_0")
    stored, expected = read_back(tmp_path / "t.gguf"), original(weights)
    assert sorted(stored) == sorted(expected)
    assert written["types"] == {"Q8_0": 3, "F32": 2} and written["bytes"] == (tmp_path / "t.gguf").stat().st_size
    for key, (kind, values) in stored.items():
        want = expected[key]
        assert values.shape == want.shape, key
        if kind == "F32":  # the norm and the pad token, exactly
            assert key in ("layers.0.attention.q_norm.weight", "x_pad_token")
            np.testing.assert_array_equal(values, want)
            continue
        assert kind == "Q8_0"
        blocks, got = want.reshape(-1, 32), values.reshape(-1, 32)
        half_step = np.abs(blocks).max(-1, keepdims=True) / 127 / 2
        assert (np.abs(got - blocks) <= half_step * 1.001 + 1e-7).all(), key  # the scale is fp16


def test_a_q4_k_file_holds_q4_k_blocks_that_decode_to_the_written_weights(tmp_path):
    weights = state()
    written = ggufwrite.write_transformer(tmp_path / "t.gguf", weights, "Q4_K")
    stored, expected = read_back(tmp_path / "t.gguf"), original(weights)
    # Rows of 64 fit no 256-weight super-block: those fall back to Q8_0, as K-quant files do.
    assert {key: kind for key, (kind, _) in stored.items()} == {
        "layers.0.attention.qkv.weight": "Q8_0",
        "layers.0.attention.out.weight": "Q8_0",
        "layers.0.attention.q_norm.weight": "F32",
        "layers.0.feed_forward.w1.weight": "Q4_K",
        "x_pad_token": "F32",
    }
    assert written["types"] == {"Q8_0": 2, "Q4_K": 1, "F32": 2}
    want, got = expected["layers.0.feed_forward.w1.weight"], stored["layers.0.feed_forward.w1.weight"][1]
    # Each 32-weight sub-block spans its range in 15 steps of 4 bits; packing a scale, a min or a
    # nibble into the wrong place misses by a whole range.
    sub, decoded = want.reshape(-1, 32), got.reshape(-1, 32)
    span = sub.max(-1, keepdims=True) - np.minimum(sub.min(-1, keepdims=True), 0)
    assert (np.abs(decoded - sub) <= span / 15).all()
    assert np.linalg.norm(decoded - sub) / np.linalg.norm(sub) < 0.1


@pytest.mark.parametrize("qtype", ggufwrite.QTYPES)
def test_all_zero_weights_are_stored_with_finite_scales(tmp_path, qtype):
    ggufwrite.write_transformer(tmp_path / "z.gguf", {"a.weight": torch.zeros(4, 512)}, qtype)
    kind, values = read_back(tmp_path / "z.gguf")["a.weight"]
    assert kind == qtype
    np.testing.assert_array_equal(values, np.zeros((4, 512), np.float32))


def test_a_type_the_writer_cannot_make_is_named(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"'Q5_K'.*Q8_0, Q4_K"):
        ggufwrite.write_transformer(tmp_path / "t.gguf", state(), "Q5_K")
    assert not (tmp_path / "t.gguf").exists()


def test_a_q4_k_sub_block_with_a_small_range_beside_a_large_one_keeps_its_values(tmp_path):
    """One sub-block spans [-1, 1], so the super-block's unit d is (2 / 15) / 63; the next spans
    0.4 x 15 d (its step rounds to 0 units of d) and the one after 1.4 x 15 d (it rounds to 1, and
    its range would not fit 15 steps of d). Each must decode within half its step."""
    d = float(np.float16(2 / 15 / 63))
    weight = torch.zeros(1, 256)
    weight[0, :32] = torch.linspace(-1, 1, 32)
    weight[0, 32:64] = torch.linspace(0, 0.4 * 15 * d, 32)
    weight[0, 64:96] = torch.linspace(0, 1.4 * 15 * d, 32)
    ggufwrite.write_transformer(tmp_path / "t.gguf", {"a.weight": weight}, "Q4_K")
    kind, values = read_back(tmp_path / "t.gguf")["a.weight"]
    assert kind == "Q4_K"
    for first, ratio in ((32, 0.4), (64, 1.4)):
        want, got = weight[0, first : first + 32].numpy(), values[0, first : first + 32]
        assert np.ptp(got) > 0, ratio  # not one constant
        step = np.ceil(ratio) * d  # the smallest multiple of d whose 15 steps span the range
        np.testing.assert_allclose(got, want, rtol=0, atol=step / 2 * 1.001)
    np.testing.assert_array_equal(values[0, 96:], 0)
