"""GGUF transformers (city96's quantizations of Z-Image: Q8_0, Q4_K, ...), through diffusers' GGUF support.

The quantized linears stay quantized on the device (diffusers' `GGUFLinear`, which dequantizes its
weight at every call); the tensors stored as F32/F16/BF16 (norms, embedders, the linears a
quantizer left alone) are cast to the compute dtype like any checkpoint's. The file is memory
mapped and read one tensor at a time, so no dequantized copy of it exists on the host.

Keys come in the original (ComfyUI) layout, as city96's converter writes them, with fused
`attention.qkv`; diffusers' single-file conversion maps them. Files already in diffusers' key
layout load as they are.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

SUFFIX = ".gguf"
# Stored as plain floats: cast to the compute dtype at load, never dequantized per call.
PLAIN_TYPES = ("F32", "F16", "BF16")
# A key only diffusers' layout has: such a file needs no conversion.
_DIFFUSERS_KEY = "all_x_embedder."


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF transformer file holds, from its header (no tensor data is read)."""

    path: Path
    types: dict[str, int]  # tensor count per GGML type
    type_params: dict[str, int]  # weights per GGML type
    quantized_bytes: int  # of the tensors that stay quantized on the device
    quantized_params: int  # the weights those bytes encode

    @property
    def quantization(self) -> str:
        """The GGML type of most of the quantized weights (K-quant files mix in a few others)."""
        quantized = {t: n for t, n in self.type_params.items() if t not in PLAIN_TYPES}
        return max(quantized, key=quantized.__getitem__) if quantized else "+".join(sorted(self.types))

    def describe(self) -> dict[str, Any]:
        """For the images' metadata."""
        return {
            "file": self.path.name,
            "format": "gguf",
            "quantization": self.quantization,
            "types": dict(sorted(self.types.items())),
            "bytes": self.path.stat().st_size,
        }


def readable_types() -> tuple[str, ...]:
    """The GGML types diffusers can dequantize, plus the plain ones."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return PLAIN_TYPES + tuple(t.name for t in SUPPORTED_GGUF_QUANT_TYPES if t.name not in PLAIN_TYPES)


def _reader(path: Path) -> Any:  # gguf.GGUFReader
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(
            f"{path} is a GGUF file, and reading one needs the gguf package: pip install 'zturbo[gguf]'"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"GGUF transformer {path} does not exist")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); download it again") from None


def _type_name(tensor: Any) -> str:
    return getattr(tensor.tensor_type, "name", str(tensor.tensor_type))


def _check_types(path: Path, tensors: list[Any]) -> None:
    readable = readable_types()
    for tensor in tensors:
        name = _type_name(tensor)
        if name not in readable:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is stored as {name}, a GGUF type zturbo cannot read; "
                f"readable types: {', '.join(readable)}"
            )


def header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGML type name and shape (torch's order: GGUF stores it innermost first) per key, from the
    header alone, as `singlefile` reads a safetensors header; an unreadable file is refused."""
    tensors = _reader(Path(path)).tensors
    return {t.name: (_type_name(t), tuple(int(d) for d in reversed(t.shape.tolist()))) for t in tensors}


def inspect(path: str | Path) -> GGUFInfo:
    """The file's types and the size of its quantized weights; unreadable types are named."""
    path = Path(path)
    tensors = list(_reader(path).tensors)
    _check_types(path, tensors)
    # What load_transformer keeps quantized: linear weights (2-D). Quantized pad tokens and the
    # like are dequantized at load.
    quantized = [t for t in tensors if _type_name(t) not in PLAIN_TYPES and _linear_weight(t)]
    return GGUFInfo(
        path=path,
        types=dict(Counter(_type_name(t) for t in tensors)),
        type_params=_sum_by_type(tensors),
        quantized_bytes=sum(int(t.n_bytes) for t in quantized),
        quantized_params=sum(int(t.n_elements) for t in quantized),
    )


def _sum_by_type(tensors: list[Any]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for t in tensors:
        totals[_type_name(t)] += int(t.n_elements)
    return dict(totals)


def _linear_weight(tensor: Any) -> bool:
    return tensor.name.endswith(".weight") and len(tensor.shape) == 2


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, keyed as stored, as a view of the memory-mapped file: quantized ones as
    diffusers' GGUFParameter (bytes, with their type), plain ones as they are."""
    import gguf
    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter

    reader = _reader(path)
    tensors = list(reader.tensors)
    _check_types(path, tensors)
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # The map is read-only; every tensor is copied before anything could write to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for t in tensors:
            data = torch.from_numpy(t.data)
            if _type_name(t) in ("F32", "F16"):
                out[t.name] = data
            else:  # BF16 too: diffusers' dequantizer reads its raw bytes
                out[t.name] = GGUFParameter(data, quant_type=gguf.GGMLQuantizationType(int(t.tensor_type)))
    return out


def _diffusers_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(key.startswith(_DIFFUSERS_KEY) for key in tensors):
        return tensors
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(dict(tensors))


def load_transformer(
    path: str | Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, GGUFInfo]:
    """A ZImageTransformer2DModel of `config` with the weights of the GGUF file at `path`, on
    `device`: quantized linears as diffusers' GGUFLinear computing in `dtype`, the rest in `dtype`.
    Keys are checked strictly, quantized shapes against the module's."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear, dequantize_gguf_tensor

    path = Path(path)
    info = inspect(path)
    state = _diffusers_keys(_tensors(path))
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, real buffers
        model = ZImageTransformer2DModel.from_config(config)
    # Only linears whose weights are quantized become GGUFLinear; BF16 ones are cast like F16's.
    _replace_with_gguf_linear(model, dtype, {k: v for k, v in state.items() if _stays_quantized(v)})
    expected = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of ZImageTransformer2DModel)")
        quantized = _stays_quantized(tensor) and _is_gguf_linear_weight(model, key)
        shape = tuple(tensor.quant_shape) if isinstance(tensor, GGUFParameter) else tuple(tensor.shape)
        if shape != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {shape}, the model expects {tuple(expected[key].shape)} "
                "(the file is not a Z-Image transformer of this configuration)"
            )
        if quantized:
            data = tensor.as_tensor().to(device, copy=True)
            _owner(model, key)._parameters["weight"] = GGUFParameter(data, quant_type=tensor.quant_type)
            continue
        if isinstance(tensor, GGUFParameter):  # BF16, or a quantized tensor outside a linear
            tensor = dequantize_gguf_tensor(tensor.to(device))
        owner, leaf = _owner(model, key), key.rpartition(".")[2]
        value = tensor.to(device=device, dtype=dtype, copy=True)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {shown}")
    model.to(device)  # the real non-persistent buffers (rotary tables)
    model.eval().requires_grad_(False)
    return model, info


def _stays_quantized(tensor: torch.Tensor) -> bool:
    quant_type = getattr(tensor, "quant_type", None)
    return quant_type is not None and quant_type.name not in PLAIN_TYPES


def _owner(model: torch.nn.Module, key: str) -> torch.nn.Module:
    return model.get_submodule(key.rpartition(".")[0])


def _is_gguf_linear_weight(model: torch.nn.Module, key: str) -> bool:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    owner_name, _, leaf = key.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(owner_name), GGUFLinear)


def stores_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds GGUF-quantized weights (which no plain-tensor path may touch)."""
    return any(hasattr(p, "quant_type") for p in module.parameters())


def logical_numel(param: torch.Tensor) -> int:
    """The weights a parameter holds: a GGUF parameter's decoded shape, not its byte count."""
    shape = getattr(param, "quant_shape", None)
    return math.prod(shape) if shape is not None else param.numel()
