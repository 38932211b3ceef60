"""Writers of tiny GGUF transformers as city96 publishes Z-Image's (test helpers).

`write_gguf` takes a diffusers-layout transformer state dict, renames it into the original
(ComfyUI) layout city96's converter keeps (fused `attention.qkv`, `x_embedder`, `final_layer`,
`attention.out`, `q_norm`/`k_norm`) and stores each tensor as the converter does: 2-D weights
whose rows fit the type's blocks quantized with the gguf package (Q4_K, which it cannot make, with
the benchmark writer's encoder), the rest as F32 (1-D) or F16.
`dequantized` reads such a file back with the gguf package's own numpy dequantizer, in diffusers'
key layout: the weights an image made from the file should match.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from zturbo.bench.ggufwrite import original_keys, quantize_q4_k


def original_layout(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """diffusers keys -> Z-Image's original keys, q/k/v fused into one qkv weight (the benchmark
    writer's layout, `zturbo.bench.ggufwrite.original_keys`)."""
    out: dict[str, np.ndarray] = {}
    for key, sources in original_keys(state).items():
        out[key] = torch.cat([state[s].detach().float() for s in sources]).numpy()
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
            writer.add_tensor(key, quantize_q4_k(torch.from_numpy(array)).numpy(), raw_dtype=kind)
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


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights in float32 by the gguf package's dequantizer, in diffusers' key layout."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from gguf import GGUFReader, quants

    tensors = {}
    for t in GGUFReader(path).tensors:
        array = quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        tensors[t.name] = torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]))
    return convert_z_image_transformer_checkpoint_to_diffusers(tensors)
