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
        else:
            writer.add_tensor(key, quants.quantize(array.astype(np.float32), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _type_for(array: np.ndarray, qtype: str) -> str:
    import gguf

    if array.ndim < 2:
        return "F32"
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return qtype if array.shape[-1] % block == 0 else "F16"


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights in float32 by the gguf package's dequantizer, in diffusers' key layout."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from gguf import GGUFReader, quants

    tensors = {}
    for t in GGUFReader(path).tensors:
        array = quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        tensors[t.name] = torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]))
    return convert_z_image_transformer_checkpoint_to_diffusers(tensors)
