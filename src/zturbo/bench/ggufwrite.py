"""GGUF transformers written from weights in memory, fast enough for a real-size benchmark file.

The gguf package quantizes Q8_0 in numpy (minutes for 6B weights on one core) and no K-quant at
all, so both types are encoded here in torch, on the device the weights are on, one tensor at a
time. The tensor infos go first (their sizes follow from the shapes) and each tensor's bytes are
then streamed into the file, so the host holds one quantized tensor at a time, not the file.

The layout is the one city96's Z-Image files have, which zturbo's loader and diffusers'
`from_single_file` both convert: the original (ComfyUI) keys with fused `attention.qkv`, 2-D
linear weights quantized (a K-quant falls back to Q8_0 where rows fit no 256-weight
super-block), everything else F32.

Both encoders round each weight to the nearest step of scales taken from its block's range (no
search for the best scales, as llama.cpp's quantizer does): every block is valid and decodes each
weight close to the written one (`quantize_q8_0` and `quantize_q4_k` give their bounds), which is
all a speed or memory measurement needs.

`gguf_components` builds the random model around such a file, loaded back as `--transformer
FILE.gguf` loads one: the transformer of the `--gguf-caps` rows (`bench.memory`) and of the int8 probe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidRequestError
from . import common

QTYPES = ("Q8_0", "Q4_K")
# Weights per block and bytes per block, as ggml defines the types.
BLOCKS: dict[str, tuple[int, int]] = {"Q8_0": (32, 34), "Q4_K": (256, 144)}
_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = ("to_q", "to_k", "to_v")


def check_qtype(qtype: str) -> str:
    if qtype not in QTYPES:
        raise InvalidRequestError(f"GGUF type {qtype!r} cannot be written here; the writer makes {', '.join(QTYPES)}")
    return qtype


def original_keys(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Each original-layout key and the diffusers keys it is made of (q, k and v for a fused qkv)."""
    out: dict[str, tuple[str, ...]] = {}
    for key in state:
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        sources: tuple[str, ...] = (key,)
        if ".attention.to_q." in key:
            sources = tuple(key.replace("to_q", name) for name in _QKV)
            key = key.replace(".to_q.", ".qkv.")
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key] = sources
    return out


def tensor_type(key: str, shape: tuple[int, ...], qtype: str) -> str:
    """What a tensor is stored as: linear weights quantized (Q8_0 where `qtype`'s blocks do not
    fit a row, F32 where no block does), the rest F32."""
    if not key.endswith(".weight") or len(shape) != 2:
        return "F32"
    for name in (qtype, "Q8_0"):
        if shape[-1] % BLOCKS[name][0] == 0:
            return name
    return "F32"


def stored_bytes(shape: tuple[int, ...], kind: str) -> int:
    if kind == "F32":
        return 4 * _numel(shape)
    weights, size = BLOCKS[kind]
    return _numel(shape) // weights * size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0, on `weight`'s device: per 32 weights an fp16 scale d = max|w| / 127 and 32
    int8 values round(w / d). Returns uint8 rows (rows, cols / 32 * 34), the bytes GGUF stores."""
    rows = weight.shape[0]
    blocks = weight.float().reshape(-1, 32)
    d = (blocks.abs().amax(-1) / 127).to(torch.float16)
    # Rounded against the stored fp16 scale, so every weight is within half a step of its decoding.
    d32 = d.float()
    inverse = torch.where(d32 > 0, 1 / torch.where(d32 > 0, d32, 1.0), 0.0)  # an all-zero block: d = 0, q = 0
    q = (blocks * inverse[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale = d.view(torch.uint8).reshape(-1, 2)
    return torch.cat([scale, q.view(torch.uint8)], dim=1).reshape(rows, -1)


def quantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_K, on `weight`'s device: per 256 weights fp16 d and dmin, eight 6-bit sub-block
    scales and mins packed in 12 bytes, then 128 bytes of 4-bit values (sub-blocks 2c and 2c+1
    share 32 bytes, low and high nibble). A weight decodes as d * scale * q - dmin * min.
    Returns uint8 rows (rows, cols / 256 * 144).

    A sub-block's step d * scale is its range / 15 rounded up to a multiple of d (at least d
    where the range is not 0), so the range always fits 15 steps: a sub-block whose range is
    small beside its super-block's largest keeps a step of d rather than 0, which would decode
    it to one constant. Its min is the nearest multiple of dmin to its lowest weight (or 0), so
    each weight decodes within max(d * scale, dmin) / 2 of the written one."""
    rows = weight.shape[0]
    sub = weight.float().reshape(-1, 8, 32)  # (super-blocks, sub-blocks, weights)
    low = sub.amin(-1).clamp(max=0)
    scale = (sub.amax(-1) - low) / 15
    d = _fp16_at_least(scale.amax(-1) / 63)  # else the largest sub-block's 63 steps fall short of its range
    dmin = ((-low).amax(-1) / 63).to(torch.float16)
    sc = _six_bits(scale, d, torch.ceil)
    mn = _six_bits(-low, dmin, torch.round)
    step = d.float()[:, None] * sc.float()
    offset = dmin.float()[:, None] * mn.float()
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    q = ((sub + offset[..., None]) / safe_step[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = torch.empty(sub.shape[0], 12, dtype=torch.uint8, device=sub.device)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    head = [d.view(torch.uint8).reshape(-1, 2), dmin.view(torch.uint8).reshape(-1, 2), packed]
    return torch.cat([*head, qs], dim=1).reshape(rows, -1)


def _fp16_at_least(values: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 `values` as the nearest float16 not below each."""
    half = values.to(torch.float16)
    above = (half.view(torch.int16) + 1).view(torch.float16)  # the next float16 up, for non-negative ones
    return torch.where(half.float() < values, above, half)


def _six_bits(
    values: torch.Tensor, unit: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`values` (super-blocks, 8) in multiples of each super-block's fp16 `unit`, rounded by
    `rounding`, 0..63 (0 where the unit is 0)."""
    unit32 = unit.float()[:, None]
    ratio = torch.where(unit32 > 0, values / torch.where(unit32 > 0, unit32, 1.0), torch.zeros_like(values))
    return rounding(ratio).clamp(0, 63).to(torch.uint8)


def encode(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """`tensor` as the bytes (or F32 values) GGUF stores for `kind`, still on its device."""
    if kind == "Q8_0":
        return quantize_q8_0(tensor)
    if kind == "Q4_K":
        return quantize_q4_k(tensor)
    return tensor.float()


def write_transformer(path: Path, state: Mapping[str, torch.Tensor], qtype: str) -> dict[str, Any]:
    """A GGUF file of the diffusers-layout transformer `state`, linear weights as `qtype`.

    Encodes on the tensors' device; returns the tensor count per stored type, the file's bytes
    and the seconds it took."""
    import gguf

    check_qtype(qtype)
    started = time.perf_counter()
    layout = original_keys(state)
    kinds = {key: tensor_type(key, _shape(state, sources), qtype) for key, sources in layout.items()}
    writer = gguf.GGUFWriter(str(path), arch="lumina2")  # the architecture name city96's files carry
    for key, sources in layout.items():
        shape, kind = _shape(state, sources), kinds[key]
        raw = None if kind == "F32" else gguf.GGMLQuantizationType[kind]
        # Quantized tensors are given as their uint8 rows; GGUFWriter records the weights' shape.
        stored = shape if kind == "F32" else (shape[0], stored_bytes(shape, kind) // shape[0])
        dtype = np.dtype(np.float32 if kind == "F32" else np.uint8)
        writer.add_tensor_info(key, stored, dtype, stored_bytes(shape, kind), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for key, sources in layout.items():
            tensor = torch.cat([state[s] for s in sources]) if len(sources) > 1 else state[sources[0]]
            writer.write_tensor_data(encode(tensor, kinds[key]).cpu().numpy())
    writer.close()
    counts: dict[str, int] = {}
    for kind in kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"qtype": qtype, "types": counts, "bytes": path.stat().st_size, "write_s": time.perf_counter() - started}


def _shape(state: Mapping[str, torch.Tensor], sources: tuple[str, ...]) -> tuple[int, ...]:
    first = tuple(state[sources[0]].shape)
    return (sum(state[s].shape[0] for s in sources), *first[1:]) if len(sources) > 1 else first


def gguf_components(qtype: str, root: Path) -> Callable[[torch.device, torch.dtype, bool], Any]:
    """A builder for `bench.memory.capped_engine`: the random components with their transformer
    written to a GGUF file of `qtype` under `root` (its caller's, to remove) and loaded back from
    it, as `--transformer FILE.gguf` loads one."""
    from .. import gguf

    check_qtype(qtype)

    def build(device: torch.device, dtype: torch.dtype, tiny: bool) -> Any:
        components = common.random_components(device, dtype, tiny)
        config, path = dict(components.transformer.config), root / f"transformer-{qtype}.gguf"
        write_transformer(path, components.transformer.state_dict(), qtype)
        components = dataclasses.replace(components, transformer=None)
        common.release_device_memory()
        transformer, info = gguf.load_transformer(path, config, device, dtype)
        return dataclasses.replace(components, transformer=transformer, transformer_weights=info.describe())

    return build
