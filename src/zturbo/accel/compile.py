"""Speed: torch.compile of the repeated transformer blocks and the VAE decoder, fp8 linears.

Everything here acts on the engine's module instances and can be undone (`Accel.revert_compile`), so a
compilation failure costs one warning and the eager path, never the request.

The attention processor installed on compiled blocks computes exactly what diffusers'
`ZSingleStreamAttnProcessor` does, with rotary embeddings in real float32 arithmetic instead of
complex64: Inductor does not fuse complex operations, so the diffusers form leaves separate
kernels and copies around every attention call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..config import QUANTIZE_CHOICES
from ..errors import DeviceError
from . import attention, kernels
from .graphs import EncoderGraphs, StepGraphs

log = logging.getLogger("zturbo")


class RealRopeAttnProcessor:
    """Z-Image single-stream attention (q/k RMSNorm, RoPE, SDPA), compile-friendly.

    On CUDA with Triton, the q/k norms and the rotation run as one fused kernel
    (`kernels.qk_norm_rope`), and on a Hopper with FlashAttention 3 installed, attention runs in
    FA3 (`zturbo.attention`); both are decided here, outside compiled code.
    """

    def __init__(self) -> None:
        self.norm_rope = kernels.fused_op() if FUSED_NORM_ROPE else None
        self.flash3 = attention.flash_attention_3()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        fused = getattr(attn, FUSED_QKV, None)
        if fused is not None:  # one matrix product instead of three
            q, k, v = F.linear(hidden_states, fused).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = q.unflatten(-1, (attn.heads, -1))  # (B, S, H, D)
        k = k.unflatten(-1, (attn.heads, -1))
        v = v.unflatten(-1, (attn.heads, -1))
        if self.norm_rope is not None and q.is_cuda and freqs_cis is not None and _fusable_norms(attn):
            cos_sin = torch.view_as_real(freqs_cis)  # (B, S, D/2, 2) float32
            q, k = self.norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos_sin, attn.norm_q.eps)
        else:
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            if freqs_cis is not None:
                cos_sin = torch.view_as_real(freqs_cis).unsqueeze(2)  # (B, S, 1, D/2, 2) float32
                q, k = kernels.rope(q, cos_sin), kernels.rope(k, cos_sin)
        q, k = q.to(dtype), k.to(dtype)
        mask = attention_mask
        if mask is not None and mask.ndim == 2:  # (B, S) -> (B, 1, 1, S), as diffusers does
            mask = mask[:, None, None, :]
        out = attention.attend(q, k, v, mask, self.flash3).flatten(2, 3).to(dtype)  # (B, S, H*D)
        return attn.to_out[0](out)


FUSED_QKV = "zturbo_fused_qkv"
FUSED_NORM_ROPE = True  # the Triton q/k norm + RoPE kernel where it can run (a switch for A/B runs)
GRAPH_TEXT_ENCODER = True  # CUDA graphs for the compiled text encoder (zturbo.graphs; a switch for A/B runs)
GRAPH_STEPS = True  # CUDA graphs for the compiled transformer's steps (zturbo.graphs; a switch for A/B runs)


def _fusable_norms(attn: Any) -> bool:
    """Both q/k norms are plain RMSNorms (weight, no bias, one eps): what the fused kernel computes."""
    norms = (attn.norm_q, attn.norm_k)
    return (
        all(
            type(n).__name__ == "RMSNorm"
            and getattr(n, "weight", None) is not None
            and getattr(n, "bias", None) is None
            for n in norms
        )
        and attn.norm_q.eps == attn.norm_k.eps
    )


def fuse_projections(transformer: torch.nn.Module) -> None:
    """Concatenate q/k/v and the SwiGLU's w1/w3 weights per block, so each pair/triple is one GEMM.

    The separate weights become views into the concatenated tensor: no extra memory, the state
    dict keeps its keys, and the float16 guard's in-place scaling of w3 reaches the fused tensor.
    """
    for block in transformer_blocks(transformer):
        attn, ffn = block.attention, block.feed_forward
        if getattr(attn, FUSED_QKV, None) is not None:
            continue
        setattr(attn, FUSED_QKV, _concat_as_views(attn.to_q, attn.to_k, attn.to_v))
        w13 = _concat_as_views(ffn.w1, ffn.w3)
        ffn.forward = _fused_swiglu(ffn, w13)


def unfuse_projections(transformer: torch.nn.Module, blocks: Iterable[torch.nn.Module] | None = None) -> None:
    """Back to one product per projection, in all blocks or in `blocks` (before quantizing the
    separate linears, or before a block's weights move into streaming memory: the fused tensor is
    a copy the streamed views would not reach)."""
    for block in transformer_blocks(transformer) if blocks is None else blocks:
        if getattr(block.attention, FUSED_QKV, None) is not None:
            delattr(block.attention, FUSED_QKV)
            del block.feed_forward.forward


def _concat_as_views(*linears: torch.nn.Linear) -> torch.Tensor:
    fused = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _fused_swiglu(ffn: torch.nn.Module, w13: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return ffn.w2(ffn._forward_silu_gating(gate, up))  # w2's hooks (the fp16 guard) still run

    return forward


@dataclass
class Accel:
    """What was applied to one engine's modules; `describe()` is what users and metadata see."""

    compiled: list[torch.nn.Module] = field(default_factory=list)
    processors: list[tuple[Any, Any]] = field(default_factory=list)  # (attention, previous processor)
    quantize: str = "none"
    fused: torch.nn.Module | None = None  # the transformer whose projections were fused
    encoder_graphs: EncoderGraphs | None = None  # CUDA graphs of the compiled text encoder
    step_graphs: StepGraphs | None = None  # CUDA graphs of the compiled transformer's steps

    @property
    def compiling(self) -> bool:
        return bool(self.compiled)

    @property
    def attention(self) -> str:
        """The attention kernel of the transformer blocks: FA3, SDPA (compiled blocks), or diffusers'."""
        if not self.processors:
            return "diffusers"
        flash3 = any(getattr(attn.processor, "flash3", None) for attn, _ in self.processors)
        return "flash_attention_3" if flash3 else "sdpa"

    def describe(self) -> dict[str, Any]:
        return {"compiled": self.compiling, "quantize": self.quantize, "attention": self.attention}

    def revert_compile(self) -> None:
        """Back to eager: drop compiled forwards, unfuse, restore diffusers' attention processors."""
        for module in self.compiled:
            del module.forward  # the instance attribute; the class's forward shows through again
        for attn, previous in self.processors:
            attn.set_processor(previous)
        if self.fused is not None:
            unfuse_projections(self.fused)
            self.fused = None
        self.compiled.clear()
        self.processors.clear()
        self.encoder_graphs = None  # they replay the compiled kernels
        if self.step_graphs is not None:  # a request may hold a bound step call: switch it off too
            self.step_graphs.disable("compilation was reverted")
            self.step_graphs = None


def resolve_compile(setting: str, device: torch.device) -> bool:
    """'auto' compiles on CUDA only: elsewhere compile time is rarely won back."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


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
    if quantize in ("fp8", "int4") and transformer_dtype not in (None, torch.bfloat16):
        raise DeviceError(f"--quantize {quantize} computes with bfloat16 activations; use --transformer-dtype bfloat16")
    if quantize == "int8" and transformer_dtype is torch.float16:
        raise DeviceError("--quantize int8 does not combine with the float16 overflow guard; use bfloat16 or float32")


def apply(
    components: Any, *, compile_: bool, quantize: str, fuse: bool = True, backend: Any = "inductor", vae: bool = True
) -> Accel:
    """Fuse projections (unquantized only), quantize, then compile the engine's modules in place.

    `backend` is torch.compile's. Fusion needs the compile-friendly processor, so it comes with
    compilation. `vae=False` leaves the VAE decoder eager (a benchmark diagnostic).
    """
    accel = Accel(quantize=quantize)
    if quantize != "none":
        unfuse_projections(components.transformer)
        if getattr(components.transformer, QUANTIZED, None) != quantize:  # not already, at load
            quantize_transformer(components.transformer, quantize)
    elif compile_ and fuse:
        fuse_projections(components.transformer)
        accel.fused = components.transformer
    if compile_:
        _use_persistent_compile_cache()
        compile_transformer(accel, components.transformer, backend)
        # The text encoder is launch-bound at prompt lengths (36 layers of ~20 small kernels each):
        # compiled layers launch a handful of fused kernels instead.
        for layer in components.text_encoder.layers:
            layer.forward = _decoder_layer_without_inner_hooks(layer)
            # Round where eager rounds: 36 layers of bf16 otherwise drift from the eager embeddings.
            _compile_block(accel, layer, backend, options={"emulate_precision_casts": True})
        if backend == "inductor" and GRAPH_TEXT_ENCODER:
            # Still launch-bound once compiled (~40 ms of launches per prompt): replayed as graphs.
            accel.encoder_graphs = EncoderGraphs()
        if backend == "inductor" and GRAPH_STEPS:
            accel.step_graphs = StepGraphs()  # host-bound at small sizes and in fp8 (zturbo.graphs)
        if vae:
            _compile_decoder(accel, components.vae, backend)
    return accel


def compile_transformer(accel: Accel, transformer: torch.nn.Module, backend: Any = "inductor") -> None:
    """Each block compiled on its own (regional compilation), with the compile-friendly attention
    processor; both recorded in `accel` so that `revert_compile` undoes them."""
    for block in transformer_blocks(transformer):
        attn = block.attention
        accel.processors.append((attn, attn.processor))
        attn.set_processor(RealRopeAttnProcessor())
        _compile_block(accel, block, backend)


BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def is_block_linear(module: torch.nn.Module, name: str) -> bool:
    """A block projection (what quantization changes); adaLN's (B, 256)-input linears are not."""
    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith(tuple(f"{b}." for b in BLOCK_LISTS))
        and ("adaLN" not in name)
    )


# Kept plain under fp8: the caption refiner's products have one row per caption token (tens), where
# fp8 gains nothing, and its unmodulated blocks are a graph of their own, which costs over a
# minute to compile in fp8 and seconds in bf16. Weight-only modes shrink it: they are for memory.
FP8_PLAIN_BLOCKS = ("context_refiner",)


def quantizes(mode: str, module: torch.nn.Module, name: str) -> bool:
    """Whether `mode` quantizes the transformer's submodule `name`."""
    return is_block_linear(module, name) and not (mode == "fp8" and name.startswith(FP8_PLAIN_BLOCKS))


def transformer_blocks(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for name in BLOCK_LISTS:
        yield from getattr(transformer, name)


# The VAE decoder's one static graph: the size `Engine.warmup` decodes (and the memory planner
# plans for, `memory.vae_activation`). Pixels per side.
STATIC_DECODE_SIZE = 1024


def _compile_decoder(accel: Accel, vae: torch.nn.Module, backend: Any) -> None:
    """Two compiled decoders: a static graph for STATIC_DECODE_SIZE² and one graph with dynamic
    height and width for every other size.

    Left to itself (dynamic=None), torch.compile would replace the static graph with a dynamic one
    the first time a second size is decoded, and that graph then serves the warm-up size too. Both
    decode equally fast, but the static graph frees intermediates sooner: at 1024² on an H100 it
    holds 5 full-resolution tensors, the dynamic one 8 (0.75 GiB more; docs/performance.md). Kept
    apart, the warm-up size always gets the leaner graph, so the planner can count on it.
    """
    decoder = vae.decoder
    eager = decoder.forward
    static_side = STATIC_DECODE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)  # in latents
    # Two functions, hence two code objects: torch.compile caches its graphs per code object.
    static = torch.compile(lambda z, *a, **k: eager(z, *a, **k), fullgraph=True, backend=backend, dynamic=False)
    dynamic = torch.compile(lambda z, *a, **k: eager(z, *a, **k), fullgraph=True, backend=backend, dynamic=None)

    def forward(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if z.shape[-2:] == (static_side, static_side):
            return static(z, *args, **kwargs)
        for dim in (-2, -1):  # dynamic from the first other size: no throw-away static graph
            torch._dynamo.maybe_mark_dynamic(z, z.ndim + dim)
        return dynamic(z, *args, **kwargs)

    decoder.forward = forward
    accel.compiled.append(decoder)


def _compile_block(accel: Accel, block: torch.nn.Module, backend: Any, options: dict[str, Any] | None = None) -> None:
    """Compile a transformer block or text-encoder layer with its token dimension dynamic from the
    first call.

    Transformer blocks see three token counts per forward (the image, the caption, both) and both
    kinds of block a new one per prompt length. Left to itself (dynamic=None), torch.compile first
    builds a static graph and throws it away at the second count; with fp8 each such graph costs one
    to two minutes. With dynamic=True every dimension becomes symbolic and the kernels get slower
    (H100, 1024²: 0.923 s per image, against 0.855 s with dynamic=None). So only the token
    dimensions are marked.
    """
    inductor = {"options": options} if options and backend == "inductor" else {}
    compiled = torch.compile(block.forward, fullgraph=True, backend=backend, dynamic=None, **inductor)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _mark_token_dims(x.shape[1], (x, *args, *kwargs.values()))  # x: (B, tokens, dim)
        return compiled(x, *args, **kwargs)

    block.forward = forward
    accel.compiled.append(block)


def _decoder_layer_without_inner_hooks(layer: torch.nn.Module) -> Any:
    """A transformers decoder layer's forward (pre-norm attention, pre-norm MLP, both residual) that
    calls its attention's `forward` rather than the module.

    transformers (5.x) hangs output-capturing hooks on every attention module, and they read a
    ContextVar, which dynamo cannot trace. The layer's own hooks (which capture the hidden states
    the prompt embeddings are read from) stay outside the compiled graph and still run.
    """
    attn, mlp = layer.self_attn, layer.mlp
    norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm

    def forward(
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        kwargs.pop("use_cache", None)
        kwargs.pop("position_ids", None)  # RoPE comes in position_embeddings
        attended, _ = attn.forward(
            norm_in(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attended
        return hidden_states + mlp(norm_post(hidden_states))

    return forward


def _mark_token_dims(tokens: int, values: Any) -> None:
    """Mark every non-batch dimension of size `tokens` dynamic, in tensors nested in tuples/lists:
    masks ((B, S) or (B, 1, S, S)), RoPE tables ((B, S, ...) or a (cos, sin) pair), noise masks."""
    for value in values:
        if isinstance(value, (tuple, list)):
            _mark_token_dims(tokens, value)
        elif isinstance(value, torch.Tensor):
            for dim in range(1, value.ndim):
                if value.shape[dim] == tokens:
                    torch._dynamo.maybe_mark_dynamic(value, dim)


QUANTIZED = "zturbo_quantized"  # attribute on a transformer whose block linears are quantized


def quantize_transformer(transformer: torch.nn.Module, mode: str, device: torch.device | None = None) -> None:
    """The block linears in place with torchao: fp8 (e4m3 weights, per-row dynamic activations;
    not the caption refiner's, see FP8_PLAIN_BLOCKS), int8 or int4 (weight-only; int4 in groups of
    128 along the input).

    With `device`, the transformer (on the CPU) is moved there one block at a time, each block
    quantized on arrival: the device never holds more than one block of plain weights, so a
    transformer whose plain weights exceed the device's memory loads when its quantized ones fit,
    and the freed plain blocks leave no holes larger than one block.
    """
    try:
        from torchao import quantization as tq
    except ImportError as e:
        raise DeviceError(f"--quantize {mode} needs torchao (pip install 'zturbo[quant]'): {e}") from None
    # set_inductor_config=False: by default each config switches on Inductor's coordinate-descent
    # tuning process-wide, and every Triton kernel compiled afterwards (the fp8 blocks, the VAE
    # decoder, the text encoder) is then tuned one candidate at a time in this process: on an H100
    # the fp8 first image took minutes, most of it tuning kernels (scripts/probe_fp8_compile.py).
    configs = {
        "fp8": lambda: tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), set_inductor_config=False),
        "int8": lambda: tq.Int8WeightOnlyConfig(set_inductor_config=False),
        "int4": lambda: tq.Int4WeightOnlyConfig(group_size=128, set_inductor_config=False),
    }
    config = configs[mode]()
    if device is None:
        tq.quantize_(transformer, config, filter_fn=lambda m, fqn: quantizes(mode, m, fqn))
    else:
        for list_name in BLOCK_LISTS:
            for i, block in enumerate(getattr(transformer, list_name)):
                torch.nn.Module.to(block, device)
                prefix = f"{list_name}.{i}."
                tq.quantize_(block, config, filter_fn=lambda m, fqn, p=prefix: quantizes(mode, m, p + fqn))
        torch.nn.Module.to(transformer, device)  # the rest: embedders, final layer (kept dtypes)
    setattr(transformer, QUANTIZED, mode)


def compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'compilation failed', as opposed to errors of the request itself."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - every supported torch has it
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # pragma: no cover - older torch wraps Inductor errors in dynamo's
        pass
    return tuple(errors)


def _use_persistent_compile_cache() -> None:
    """Inductor's caches default to /tmp; keep them with zturbo's cache so restarts reuse them."""
    from ..tiny import cache_root

    try:  # torch writes its default into the environment once Inductor has looked it up
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default: str | None = default_cache_dir()
    except ImportError:  # pragma: no cover - layout of other torch versions
        default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
