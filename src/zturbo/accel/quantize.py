"""Quantization of the transformer's block linears with torchao (fp8, int8, int4), and which
quantizations a device and dtype can run."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..config import QUANTIZE_CHOICES
from ..errors import DeviceError
from .fuse import BLOCK_LISTS

QUANTIZED = "zturbo_quantized"  # attribute on a transformer whose block linears are quantized
# Kept plain under fp8: the caption refiner's products have one row per caption token (tens), where
# fp8 gains nothing, and its unmodulated blocks are a graph of their own, which costs over a
# minute to compile in fp8 and seconds in bf16. Weight-only modes shrink it: they are for memory.
FP8_PLAIN_BLOCKS = ("context_refiner",)
PREFERENCE = ("fp8", "int8", "int4")  # fastest first
# torchao (0.18) quantizes and multiplies int4 weights with the kernels of Meta's mslk package, which
# it imports from here at import time, swallowing any failure; quantizing then fails deep inside
# (`Int4Tensor.from_hp`: "Requires mslk >= 1.0.0"). On PyPI the package is mslk-cuda: the name
# mslk itself is an empty placeholder.
INT4_KERNELS = "mslk.quantize.shuffle"
INT4_INSTALL = "pip install mslk-cuda (the release built for your PyTorch)"


def is_block_linear(module: torch.nn.Module, name: str) -> bool:
    """A block projection (what quantization changes); adaLN's (B, 256)-input linears are not."""
    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith(tuple(f"{b}." for b in BLOCK_LISTS))
        and ("adaLN" not in name)
    )


def quantizes(mode: str, module: torch.nn.Module, name: str) -> bool:
    """Whether `mode` quantizes the transformer's submodule `name`."""
    return is_block_linear(module, name) and not (mode == "fp8" and name.startswith(FP8_PLAIN_BLOCKS))


def check_quantize(quantize: str, caps: Any, transformer_dtype: torch.dtype | None = None) -> None:
    """Refuse a quantization the device or the transformer dtype cannot run, naming what would."""
    if quantize not in QUANTIZE_CHOICES:
        raise DeviceError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "fp8" and not caps.fp8:
        raise DeviceError(
            f"--quantize fp8 needs a GPU with fp8 matrix units (compute capability 8.9 or newer); "
            f"{caps.name} has none. Use --quantize int8 or none"
        )
    if quantize == "int4" and not caps.device.startswith("cuda"):
        raise DeviceError(f"--quantize int4 needs a CUDA GPU (its kernels are CUDA-only); {caps.name} is not one")
    if quantize == "int4":
        missing = int4_kernels_missing()
        if missing is not None:
            raise DeviceError(
                f"--quantize int4 needs torchao's int4 kernels from the mslk package, and {INT4_KERNELS} does not "
                f"import here ({missing}); {INT4_INSTALL}, or use --quantize int8"
            )
    if quantize in ("fp8", "int4") and transformer_dtype not in (None, torch.bfloat16):
        raise DeviceError(f"--quantize {quantize} computes with bfloat16 activations; use --transformer-dtype bfloat16")
    if quantize == "int8" and transformer_dtype is torch.float16:
        raise DeviceError("--quantize int8 does not combine with the float16 overflow guard; use bfloat16 or float32")


def int4_kernels_missing() -> str | None:
    """Why torchao's int4 kernels cannot load here (the import torchao makes, and its error), or None."""
    try:
        module = importlib.import_module(INT4_KERNELS)
    except Exception as e:  # as torchao catches it: absent, or its CUDA library built for another PyTorch
        return f"{type(e).__name__}: {e}"
    if not hasattr(module, "int4_row_quantize_zp"):  # what Int4Tensor.from_hp calls
        return "it has no int4_row_quantize_zp: an mslk older than 1.0"
    return None


def usable_quantizations(caps: Any, transformer_dtype: torch.dtype) -> tuple[str, ...]:
    """Quantizations this device can run (torchao installed), fastest first, for the memory planner."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return ()
    usable = []
    for mode in PREFERENCE:
        try:
            check_quantize(mode, caps, transformer_dtype)
        except DeviceError:
            continue
        usable.append(mode)
    return tuple(usable)


def quantize_transformer(
    transformer: torch.nn.Module, mode: str, device: torch.device | None = None, home: torch.device | None = None
) -> None:
    """The block linears in place with torchao: fp8 (e4m3 weights, per-row dynamic activations;
    not the caption refiner's, see FP8_PLAIN_BLOCKS), int8 or int4 (weight-only; int4 in groups of
    128 along the input).

    With `device`, the transformer (on the CPU) is moved there one block at a time, each block
    quantized on arrival: the device never holds more than one block of plain weights, so a
    transformer whose plain weights exceed the device's memory loads when its quantized ones fit,
    and the freed plain blocks leave no holes larger than one block. With `home` as well (the CPU,
    where the plans that stream or offload the transformer keep it), each block goes back there
    once quantized, and so does the rest: the device holds one block at a time.
    """
    try:
        from torchao import quantization as tq
    except ImportError as e:
        raise DeviceError(f"--quantize {mode} needs torchao (pip install 'zturbo[quant]'): {e}") from None
    config = _torchao_config(tq, mode)
    if device is None:
        tq.quantize_(transformer, config, filter_fn=lambda m, fqn: quantizes(mode, m, fqn))
    else:
        for list_name in BLOCK_LISTS:
            for i, block in enumerate(getattr(transformer, list_name)):
                torch.nn.Module.to(block, device)
                prefix = f"{list_name}.{i}."
                tq.quantize_(block, config, filter_fn=lambda m, fqn, p=prefix: quantizes(mode, m, p + fqn))
                if home is not None:
                    torch.nn.Module.to(block, home)
        torch.nn.Module.to(transformer, home or device)  # the rest: embedders, final layer (kept dtypes)
    setattr(transformer, QUANTIZED, mode)


def requantize_(weight: torch.Tensor, plain: torch.Tensor, mode: str) -> None:
    """Quantize `plain` as `quantize_transformer` does and copy the result into the quantized
    `weight`'s own tensors, in place: compiled code and CUDA graphs keep reading the same memory."""
    from torchao import quantization as tq

    linear = torch.nn.Linear(plain.shape[1], plain.shape[0], bias=False, device=plain.device, dtype=plain.dtype)
    linear.weight = torch.nn.Parameter(plain, requires_grad=False)
    tq.quantize_(linear, _torchao_config(tq, mode))
    fresh = linear.weight
    names, _ = weight.__tensor_flatten__()
    if fresh.__tensor_flatten__()[0] != names:
        raise TypeError(f"re-quantizing gave {type(fresh).__name__}, the weight is {type(weight).__name__}")
    for name in names:
        getattr(weight, name).copy_(getattr(fresh, name))


def _torchao_config(tq: Any, mode: str) -> Any:
    # set_inductor_config=False: by default each config switches on Inductor's coordinate-descent
    # tuning process-wide, and every Triton kernel compiled afterwards (the fp8 blocks, the VAE
    # decoder, the text encoder) is then tuned one candidate at a time in this process: on an H100
    # the fp8 first image took minutes, most of it tuning kernels (scripts/probe_fp8_compile.py).
    if mode == "fp8":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), set_inductor_config=False)
    if mode == "int8":
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    return tq.Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)
