"""Speed: torch.compile of the repeated transformer (and ControlNet) blocks, the text encoder and the VAE.

Every speed lever is a field of `AccelOptions`, passed to `apply` in plain sight; nothing here is
switched through module state. Everything acts on the engine's module instances and can be undone
(`Accel.revert_compile`), so a compilation failure costs one warning and the eager path, never the
request.

The attention processor installed on compiled blocks computes exactly what diffusers'
`ZSingleStreamAttnProcessor` does, with rotary embeddings in real float32 arithmetic instead of
complex64: Inductor does not fuse complex operations, so the diffusers form leaves separate
kernels and copies around every attention call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from ..gguf import stores_quantized
from . import attention, kernels, sequence
from .fuse import (
    BLOCK_LISTS,
    FUSED_QKV,
    controlnet_blocks,
    fuse_projections,
    is_control_block,
    transformer_blocks,
    unfuse_projections,
)
from .graphs import EncoderGraphs, StepGraphs
from .quantize import QUANTIZED, quantize_transformer

# Inductor's options for int8 weight-only blocks. Its pattern matcher rewrites torchao's int8 product,
# torch.mm(x, w.to(bf16)) * scale, into aten._weight_int8pack_mm, a kernel written for a few rows at a
# time (decoding LLMs): on CUDA one thread per output element without tensor cores, where a block
# here multiplies thousands of tokens; on the CPU the tiny test model crashed in it. Without the
# pattern matcher the product stays a cuBLAS (or oneDNN) matmul, as it is eagerly. Inductor has no
# switch for that one rewrite, so its other pattern passes (no-op removal, pad_mm, batch fusion)
# are off for these blocks too: with all of them on, an H100's first 1024² image had not finished
# after 150 s; with them off it took 26 s, compiling included (docs/performance.md).
INT8_INDUCTOR_OPTIONS = MappingProxyType({"pattern_matcher": False})

# The VAE decoder's one static graph: the size `Engine.warmup` decodes and the memory planner
# plans for (`memory.plan.vae_activation`). Pixels per side.
STATIC_DECODE_SIZE = 1024


@dataclass(frozen=True)
class AccelOptions:
    """What `apply` does to an engine's modules. The defaults are the fastest measured choices;
    the benchmark turns single fields off for its A/B rows."""

    compile: bool = False  # torch.compile the transformer's and ControlNet's blocks, text-encoder layers and VAE
    quantize: str = "none"  # the transformer's block linears: none, fp8, int8 or int4
    fuse: bool = True  # one GEMM for q/k/v and for w1/w3 (unquantized and compiled only)
    backend: Any = "inductor"  # torch.compile's backend
    vae: bool = True  # compile the VAE decoder (False: a benchmark diagnostic)
    vae_encoder: bool = True  # compile the VAE encoder too (input images); with `vae`
    fused_norm_rope: bool = True  # the Triton q/k RMSNorm + RoPE kernel where it can run
    flash_attention_3: bool = True  # FA3 where it is installed and passes its check
    graph_text_encoder: bool = True  # CUDA graphs for the compiled text encoder (Inductor only)
    graph_steps: bool = True  # CUDA graphs for the compiled transformer's steps (Inductor only)
    int8_patterns: bool = False  # Inductor's pattern matcher on int8 blocks (a probe's A/B; see INT8_INDUCTOR_OPTIONS)


class RealRopeAttnProcessor:
    """Z-Image single-stream attention (q/k RMSNorm, RoPE, SDPA), compile-friendly.

    `norm_rope` is the fused Triton q/k norm + rotation op (`kernels.fused_op()`) and `flash3` the
    FlashAttention 3 op (`attention.flash_attention_3()`), each None where it does not run; both
    are resolved outside compiled code. With `shards`, the block's tokens are this process's share
    of the sequence and attention runs across processes (`sequence.ulysses`).
    """

    def __init__(self, norm_rope: Any = None, flash3: Any = None, shards: sequence.Shards | None = None) -> None:
        self.norm_rope = norm_rope
        self.flash3 = flash3
        self.shards = shards

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        q, k, v = self._project(attn, hidden_states)
        q, k = self._norm_rope(attn, q, k, freqs_cis)
        q, k = q.to(dtype), k.to(dtype)
        mask = attention_mask
        if mask is not None and mask.ndim == 2:  # (B, S) -> (B, 1, 1, S), as diffusers does
            mask = mask[:, None, None, :]
        attend = functools.partial(attention.attend, flash3=self.flash3)
        if self.shards is not None:  # these are this process's tokens: attend across processes
            attend = functools.partial(sequence.ulysses, shards=self.shards, attend=attend)
        out = attend(q, k, v, mask)
        return attn.to_out[0](out.flatten(2, 3).to(dtype))  # (B, S, H*D)

    @staticmethod
    def _project(attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, S, H, D)."""
        fused = getattr(attn, FUSED_QKV, None)
        if fused is not None:  # one matrix product instead of three
            q, k, v = F.linear(hidden_states, fused).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        return tuple(t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))  # type: ignore[return-value]

    def _norm_rope(
        self, attn: Any, q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm_rope is not None and q.is_cuda and freqs_cis is not None and _fusable_norms(attn):
            cos_sin = torch.view_as_real(freqs_cis)  # (B, S, D/2, 2) float32
            return self.norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos_sin, attn.norm_q.eps)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            cos_sin = torch.view_as_real(freqs_cis).unsqueeze(2)  # (B, S, 1, D/2, 2) float32
            q, k = kernels.rope(q, cos_sin), kernels.rope(k, cos_sin)
        return q, k


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


@dataclass
class Accel:
    """What was applied to one engine's modules; `describe()` is what users and metadata see."""

    options: AccelOptions = field(default_factory=AccelOptions)
    compiled: list[torch.nn.Module] = field(default_factory=list)
    processors: list[tuple[Any, Any]] = field(default_factory=list)  # (attention, previous processor)
    fused: torch.nn.Module | None = None  # the transformer whose projections were fused
    fused_blocks: list[torch.nn.Module] = field(default_factory=list)  # a ControlNet's fused blocks
    encoder_graphs: EncoderGraphs | None = None  # CUDA graphs of the compiled text encoder
    step_graphs: StepGraphs | None = None  # CUDA graphs of the compiled transformer's steps
    sharded: torch.nn.Module | None = None  # the transformer whose main layers split their tokens

    @property
    def quantize(self) -> str:
        return self.options.quantize

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
        unfuse_projections(None, self.fused_blocks)
        self.fused_blocks.clear()
        self.compiled.clear()
        self.processors.clear()
        self.encoder_graphs = None  # they replay the compiled kernels
        if self.step_graphs is not None:  # a request may hold a bound step call: switch it off too
            self.step_graphs.disable("compilation was reverted")
            self.step_graphs = None
        if self.sharded is not None:  # the restored processors attend locally: split them again
            install_sequence(self, self.sharded, getattr(self.sharded, sequence.SHARDED))


def resolve_compile(setting: str, device: torch.device) -> bool:
    """'auto' compiles on CUDA only: elsewhere compile time is rarely won back."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def apply(components: Any, options: AccelOptions, shards: sequence.Shards | None = None) -> Accel:
    """Fuse projections (unquantized only), quantize, then compile the engine's modules in place;
    with `shards`, the transformer's main layers split their tokens across processes.

    Fusion needs the compile-friendly processor, so it comes with compilation. A ControlNet's
    blocks are fused and compiled as the transformer's are (they stay unquantized).
    """
    accel = Accel(options)
    transformer = components.transformer
    controlnet = getattr(components, "controlnet", None)
    control = list(controlnet_blocks(controlnet.model)) if controlnet is not None else []
    if options.quantize != "none":
        unfuse_projections(transformer)
        if getattr(transformer, QUANTIZED, None) != options.quantize:  # not already, at load
            quantize_transformer(transformer, options.quantize)
    elif options.compile and options.fuse and not stores_quantized(transformer):
        # Fused projections are plain GEMMs: GGUF weights stay in their dequantizing linears.
        fuse_projections(transformer)
        accel.fused = transformer
        fuse_projections(None, control)
        accel.fused_blocks = control
    if options.compile:
        compile_transformer(accel, transformer)
        compile_blocks(accel, control)
        compile_text_encoder(accel, components.text_encoder)
        if options.vae:
            _compile_decoder(accel, components.vae)
        if options.vae and options.vae_encoder:
            _compile_encoder(accel, components.vae)
    if shards is not None:
        install_sequence(accel, transformer, shards)
    return accel


def install_sequence(accel: Accel, transformer: torch.nn.Module, shards: sequence.Shards) -> None:
    """Split `transformer`'s tokens across `shards`: its token slicing and gathering
    (`sequence.shard_tokens`), and processors that attend across processes on its noise-refiner
    blocks and main layers (the compiled ones keep their kernels; eager blocks get the
    compile-friendly processor)."""
    sequence.shard_tokens(transformer, shards)
    for block in [*transformer.noise_refiner, *transformer.layers]:
        processor = block.attention.processor
        if isinstance(processor, RealRopeAttnProcessor):
            processor.shards = shards
        else:
            block.attention.set_processor(RealRopeAttnProcessor(shards=shards))
    accel.sharded = transformer


def compile_transformer(accel: Accel, transformer: torch.nn.Module) -> None:
    """Each block compiled on its own (regional compilation), with the compile-friendly attention
    processor, and the parts outside the blocks that hold GGUF weights (`gguf_parts`); all
    recorded in `accel` so that `revert_compile` undoes them."""
    options = accel.options
    int8 = getattr(transformer, QUANTIZED, None) == "int8" and not options.int8_patterns  # the weights, as they are
    compile_blocks(accel, transformer_blocks(transformer), INT8_INDUCTOR_OPTIONS if int8 else None)
    for part in gguf_parts(transformer):
        part.forward = _leading_dims_dynamic(part.forward, options.backend)
        accel.compiled.append(part)
    if options.backend == "inductor" and options.graph_steps:
        accel.step_graphs = StepGraphs()  # host-bound at small sizes and in fp8 (accel.graphs)


def gguf_parts(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's parts outside its blocks that hold GGUF weights (a GGUF file's timestep
    MLP, caption and patch embedders, final layer), to compile whole.

    A GGUF linear dequantizes its weight at every call, and several of diffusers' dequantizers
    (Q4_K, Q5_K, Q6_K, Q4_0, ...; not Q8_0) build small index tensors from Python lists as they
    go: run eagerly on CUDA, each is a copy from pageable host memory, which a step's CUDA-graph
    capture (`graphs.StepGraphs`) refuses. Traced, the lists are constants that Inductor writes
    into its kernels. The blocks are compiled anyway; these parts run in the transformer's eager
    forward. Each part is a module of its own class, so each compiles to graphs of its own code
    (torch.compile's recompile limit counts per code object).
    """
    parts = []
    for name, child in transformer.named_children():
        if name in BLOCK_LISTS:
            continue
        containers = (torch.nn.ModuleDict, torch.nn.ModuleList)  # per patch size: the modules in them run
        members = list(child.children()) if isinstance(child, containers) else [child]
        parts += [m for m in members if stores_quantized(m)]
    return parts


def compile_blocks(
    accel: Accel, blocks: Iterable[torch.nn.Module], inductor_options: Mapping[str, Any] | None = None
) -> None:
    """Transformer-style blocks (the transformer's or a ControlNet's) compiled one by one with the
    compile-friendly attention processor, recorded in `accel`; `inductor_options` for the blocks
    that are not a ControlNet's control blocks (those stay unquantized)."""
    options = accel.options
    norm_rope = kernels.fused_op() if options.fused_norm_rope else None
    flash3 = attention.flash_attention_3(options.flash_attention_3)
    for block in blocks:
        attn = block.attention
        accel.processors.append((attn, attn.processor))
        attn.set_processor(RealRopeAttnProcessor(norm_rope, flash3))
        if is_control_block(block):
            _compile_control_block(accel, block)
        else:
            _compile_block(accel, block, inductor_options)


def _compile_control_block(accel: Accel, block: torch.nn.Module) -> None:
    """A ControlNet block compiled around its hint stack.

    diffusers' ZImageControlTransformerBlock takes the stack of every hint so far and returns it
    one longer, so each control layer sees another stack depth; a depth cannot be dynamic (the
    block unbinds the stack), and 15 layers would make 16 graphs, past torch.compile's limit of
    8 per function. Its computation between unstacking and stacking is a transformer block's
    (diffusers writes it as ZImageTransformerBlock's with x -> c), so that runs compiled as one
    (a graph shared by every control block) and the stacking around it stays eager.
    """
    from diffusers.models.controlnets.controlnet_z_image import ZImageTransformerBlock

    # The transformer block's forward on this block's modules (every control block shares its graph).
    core = _token_dynamic(ZImageTransformerBlock.forward.__get__(block), accel.options.backend)

    def forward(
        c: torch.Tensor, x: torch.Tensor, attn_mask: Any, freqs_cis: Any, adaln_input: Any = None
    ) -> torch.Tensor:
        if block.block_id == 0:
            c, hints = block.before_proj(c) + x, []
        else:
            *hints, c = torch.unbind(c)
        c = core(c, attn_mask, freqs_cis, adaln_input)
        return torch.stack([*hints, block.after_proj(c), c])

    block.forward = forward
    accel.compiled.append(block)


def compile_text_encoder(accel: Accel, text_encoder: torch.nn.Module) -> None:
    """The encoder's layers compiled (launch-bound at prompt lengths: 36 layers of ~20 small
    kernels each become a handful of fused kernels), then replayed as CUDA graphs."""
    for layer in text_encoder.layers:
        layer.forward = _decoder_layer_without_inner_hooks(layer)
        # Round where eager rounds: 36 layers of bf16 otherwise drift from the eager embeddings.
        _compile_block(accel, layer, inductor_options={"emulate_precision_casts": True})
    if accel.options.backend == "inductor" and accel.options.graph_text_encoder:
        # Still launch-bound once compiled (~40 ms of launches per prompt): replayed as graphs.
        accel.encoder_graphs = EncoderGraphs()


def _compile_decoder(accel: Accel, vae: torch.nn.Module) -> None:
    """Two compiled decoders: a static graph for STATIC_DECODE_SIZE² and one graph with dynamic
    height and width for every other size.

    Left to itself (dynamic=None), torch.compile would replace the static graph with a dynamic one
    the first time a second size is decoded, and that graph then serves the warm-up size too. Both
    decode equally fast, but the static graph frees intermediates sooner: at 1024² on an H100 it
    holds 5 full-resolution tensors, the dynamic one 8 (0.75 GiB more; docs/performance.md). Kept
    apart, the warm-up size always gets the leaner graph, so the planner can count on it.
    """
    decoder, backend = vae.decoder, accel.options.backend
    eager = decoder.forward
    side = STATIC_DECODE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)  # in latents
    # Two functions, hence two code objects: torch.compile caches its graphs per code object.
    static = torch.compile(lambda z, *a, **k: eager(z, *a, **k), fullgraph=True, backend=backend, dynamic=False)
    dynamic = torch.compile(lambda z, *a, **k: eager(z, *a, **k), fullgraph=True, backend=backend, dynamic=None)

    def forward(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if z.shape[-2:] == (side, side):
            return static(z, *args, **kwargs)
        for dim in (-2, -1):  # dynamic from the first other size: no throw-away static graph
            torch._dynamo.maybe_mark_dynamic(z, z.ndim + dim)
        return dynamic(z, *args, **kwargs)

    decoder.forward = forward
    accel.compiled.append(decoder)


def _compile_encoder(accel: Accel, vae: torch.nn.Module) -> None:
    """The VAE encoder (input images, control images) compiled with dynamic height and width from
    its first call: one graph for every size."""
    encoder = vae.encoder
    compiled = torch.compile(encoder.forward, fullgraph=True, backend=accel.options.backend, dynamic=None)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        for dim in (-2, -1):
            torch._dynamo.maybe_mark_dynamic(x, x.ndim + dim)
        return compiled(x, *args, **kwargs)

    encoder.forward = forward
    accel.compiled.append(encoder)


def _compile_block(accel: Accel, block: torch.nn.Module, inductor_options: Mapping[str, Any] | None = None) -> None:
    """Compile a transformer block or text-encoder layer with its token dimension dynamic from the
    first call, with `inductor_options` for Inductor.

    Transformer blocks see three token counts per forward (the image, the caption, both) and both
    kinds of block a new one per prompt length. Left to itself (dynamic=None), torch.compile first
    builds a static graph and throws it away at the second count; with fp8 each such graph costs one
    to two minutes. With dynamic=True every dimension becomes symbolic and the kernels get slower
    (H100, 1024²: 0.923 s per image, against 0.855 s with dynamic=None). So only the token
    dimensions are marked.
    """
    block.forward = _token_dynamic(block.forward, accel.options.backend, inductor_options)
    accel.compiled.append(block)


def _token_dynamic(fn: Any, backend: Any, inductor_options: Mapping[str, Any] | None = None) -> Any:
    """`fn(x, ...)` compiled, x's token dimension (and every other dimension of that size) marked
    dynamic on each call (see `_compile_block`)."""
    extra = {"options": dict(inductor_options)} if inductor_options and backend == "inductor" else {}
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=None, **extra)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _mark_token_dims(x.shape[1], (x, *args, *kwargs.values()))  # x: (B, tokens, dim)
        return compiled(x, *args, **kwargs)

    return forward


def _leading_dims_dynamic(fn: Any, backend: Any) -> Any:
    """`fn` compiled, every dimension but the last of each tensor argument marked dynamic on each
    call: tokens and batch vary, the last is a weight's width (see `_compile_block`)."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=None)

    def forward(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                for dim in range(value.ndim - 1):
                    torch._dynamo.maybe_mark_dynamic(value, dim)
        return compiled(*args, **kwargs)

    return forward


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
