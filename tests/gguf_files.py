"""Writers of tiny GGUF transformers as city96 publishes Z-Image's (test helpers).

`write_gguf` takes a diffusers-layout transformer state dict, renames it into the original
(ComfyUI) layout city96's converter keeps (fused `attention.qkv`, `x_embedder`, `final_layer`,
`attention.out`, `q_norm`/`k_norm`) and stores each tensor as the converter does: 2-D weights
whose rows fit the type's blocks quantized with the gguf package, the rest as F32 (1-D) or F16.
`dequantized` reads such a file back with the gguf package's own numpy dequantizer, in diffusers'
key layout: the weights an image made from the file should match.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)


def original_layout(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """diffusers keys -> Z-Image's original keys, q/k/v fused into one qkv weight."""
    out: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        array = tensor.detach().float().numpy()
        if ".attention.to_q." in key:
            parts = [state[key.replace("to_q", name)].float().numpy() for name in ("to_q", "to_k", "to_v")]
            key, array = key.replace(".to_q.", ".qkv."), np.concatenate(parts)
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key] = array
    return out


def write_gguf(path: Path, state: Mapping[str, torch.Tensor], qtype: str, *, odd: dict[str, str] | None = None) -> Path:
    """A GGUF transformer of `state` with its quantizable weights as `qtype` (a GGML type name);
    `odd` stores the named original-layout keys as other types (to write an unreadable one)."""
    import gguf
    from gguf import quants

    writer = gguf.GGUFWriter(str(path), arch="lumina2")
    for key, array in original_layout(state).items():
        name = (odd or {}).get(key) or _type_for(array, qtype)
        kind = gguf.GGMLQuantizationType[name]
        if name == "F32":
            writer.add_tensor(key, array.astype(np.float32))
        elif name == "F16":
            writer.add_tensor(key, array.astype(np.float16))
        elif name == "Q4_K":  # the gguf package quantizes no K-quant in Python
            writer.add_tensor(key, quantize_q4_k(array), raw_dtype=kind)
        else:
            writer.add_tensor(key, quants.quantize(array.astype(np.float32), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _type_for(array: np.ndarray, qtype: str) -> str:
    """As K-quant files are made: rows too short for 256-weight super-blocks fall back to Q8_0,
    rows that fit no block stay F16."""
    import gguf

    if array.ndim < 2:
        return "F32"
    for name in (qtype, "Q8_0"):
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        if array.shape[-1] % block == 0:
            return name
    return "F16"


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """A plain (non-optimising) Q4_K encoder in ggml's block layout: per 256 weights, fp16 d and
    dmin, eight 6-bit sub-block scales and mins packed in 12 bytes, then 4-bit values; a weight
    decodes as d * scale * q - dmin * min. Returns the uint8 rows GGUFWriter takes."""
    rows = array.astype(np.float32).reshape(-1, 8, 32)  # (super-blocks, sub-blocks, weights)
    low = np.minimum(rows.min(-1), 0.0)
    scale = (rows.max(-1) - low) / 15
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum(-low.min(-1), 1e-8) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / d16.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-low / dmin16.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    step = (d16.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin16.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.round((rows + offset) / step), 0, 15).astype(np.uint8)
    scales = np.empty((rows.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2c and 2c+1 share 32 bytes
    blocks = np.concatenate(
        [d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), scales, qs], axis=1
    )  # 144 bytes per 256 weights
    return blocks.reshape(array.shape[0], -1)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights in float32 by the gguf package's dequantizer, in diffusers' key layout."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from gguf import GGUFReader, quants

    tensors = {}
    for t in GGUFReader(path).tensors:
        array = quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        tensors[t.name] = torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]))
    return convert_z_image_transformer_checkpoint_to_diffusers(tensors)
