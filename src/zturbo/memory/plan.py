"""Memory planning: peak GPU memory of a request under each placement plan, the fastest plan that
fits, the one `Layout` an engine loads with (`plan_layout`), and how many images of a request's
shape one batch may hold in the memory free between requests (`batch_room`).

Pure functions of the model's configs, the request and the budget; nothing here moves a tensor
(`memory.placement` does).

The peak is the largest of four stages, each its resident weights plus its activations:
  encode  (text encoder)   weights per plan + hidden states of the prompt tokens
  denoise (transformer)    weights per plan + one block's intermediates for every token, and with
                           a ControlNet its stacked hints and the block samples it hands over
  decode  (VAE)            weights + the full-resolution decoder tensors (or one tile's)
  image   (VAE encoder)    weights + the full-resolution encoder tensors: only requests with an
                           input image run it, but a loaded engine must have room for one
Weights are exact (parameter counts from the configs, built on the meta device); a ControlNet's
are its own (it shares the transformer's embedders and refiners). Activations are counted from
the shapes; the VAE decoder's constant comes from H100 measurements (docs/performance.md) and is
checked against them in tests/test_memory.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..accel import compile as accel_compile
from ..accel.fuse import BLOCK_LISTS, controlnet_blocks, transformer_blocks
from ..accel.quantize import is_block_linear, quantizes, usable_quantizations
from ..config import MEMORY_CHOICES, PLAIN_WEIGHT_PLANS, check_stored_settings
from ..device import GIB
from ..errors import GPUMemoryError, InvalidRequestError
from ..gguf import logical_numel

log = logging.getLogger("zturbo")

# resident: everything on the GPU. te-offload: the text encoder's layers stream through the GPU
# (memory.stream) when a prompt is not in the prompt cache. model-offload: the text encoder and
# transformer take turns on the GPU. block-offload: as te-offload, and the transformer blocks the
# budget cannot hold stream too. sequential: diffusers' leaf-level group offloading, one layer
# at a time.
PLANS = MEMORY_CHOICES[1:]
# The planner's order, fastest first. Streaming only the blocks that do not fit (block-offload)
# beats moving whole models each request (model-offload) in less memory, so model-offload is only
# ever run when asked for; it stays for GPUs where pinned host memory is scarce.
SPEED_ORDER = ("resident", "te-offload", "block-offload", "model-offload", "sequential")
# Plans that run plain transformer weights only (config.PLAIN_WEIGHT_PLANS says why).
UNQUANTIZED_PLANS = PLAIN_WEIGHT_PLANS
# Bytes per weight of the transformer's block linears when quantized (scales are per row: small).
QUANTIZED_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}
# Live full-resolution decoder tensors of `block_out_channels[0]` channels at the VAE's peak
# (eager bf16): 2.6 GiB above the weights at 1024² on an H100, 9.7 GiB at 2048².
VAE_LIVE_TENSORS = 10
# A compiled whole-image decode frees intermediates sooner. Measured on an H100 (bf16, per image,
# docs/performance.md): the static graph the decoder keeps for accel.compile.STATIC_DECODE_SIZE² (1024²)
# holds 5 such tensors, the graph with dynamic height and width that serves every other size 8,
# from 512² to 2048²; eager holds 9.5-10. Tiled decodes measured at the eager count (their
# decoded tiles are held for blending), so they keep it.
VAE_LIVE_TENSORS_STATIC = 5
VAE_LIVE_TENSORS_COMPILED = 8
VAE_TILE = 512  # pixels per side of a decoder tile when tiling
# Per token in a transformer block: FFN phase (w1, w3 outputs and their product) and attention
# phase (q, k, v, float32 RoPE copies of q and k); plus about four residual-width tensors.
RESIDUAL_COPIES = 4
# The VAE encoder's full-resolution tensors of `block_out_channels[0]` channels at its peak: a
# ResNet block's input and three temporaries (conv_in and two ResNet blocks run at full resolution;
# the decoder also holds twice-as-wide tensors there, hence its 10), one more for the norms.
VAE_ENCODE_LIVE_TENSORS = 5
# A ControlNet's residual-width tensors per control layer it holds at its peak: its last control
# block holds the stack of every hint so far and the one-longer stack it returns (2 per layer), and
# the transformer then runs with the scaled block samples (1 per layer) beside its own activations;
# plus the ControlNet's own copies of the unified sequence and its control context.
CONTROL_COPIES_PER_LAYER = 2
CONTROL_EXTRA_COPIES = 4
# The share of the device's free memory a decision made between requests counts on (a step graph's
# pool, an untiled decode, a batch's size): the rest absorbs the estimates' error and fragmentation.
FREE_SHARE = 0.9
# Plans whose transformer weights are off the device between requests and come onto it for the
# denoise stage: model-offload moves them in whole, sequential's group offloading leaf by leaf.
DENOISE_ONLOADED = ("model-offload", "sequential")
# Of those, the plans whose weights come on during the transformer's forward (group offloading's
# hooks) rather than at the start of the stage, where model-offload moves the whole transformer.
FORWARD_ONLOADED = ("sequential",)
# How a plan's name says that CFG's two halves run one after the other (half the activations,
# two transformer calls a step): what a plan takes where the doubled batch does not fit.
SPLIT_CFG = "two-pass-cfg"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs, read from the configs (parameter counts from meta-device modules)."""

    transformer_params: int
    transformer_blocks_params: int  # all blocks together
    transformer_block_params: int  # the largest block
    transformer_linear_params: int  # in blocks: what quantization shrinks
    transformer_fp8_plain_params: int  # of those, what fp8 leaves plain (accel.quantize.FP8_PLAIN_BLOCKS)
    transformer_largest_linear: int
    transformer_block_count: int
    text_encoder_params: int
    text_encoder_embed_params: int  # token embeddings: kept on the CPU while the layers stream
    text_encoder_layers_params: int  # the decoder layers that run, together
    text_encoder_layer_params: int
    text_encoder_layers: int  # that run: all but the last (UNUSED_TEXT_LAYERS)
    text_encoder_unused_params: int  # the last layer: never run, kept off the GPU when layers stream
    vae_params: int
    dim: int
    ffn_dim: int
    text_dim: int
    vae_channels: int  # decoder width at full resolution
    spatial_unit: int  # pixels per token side
    # Per transformer block, in execution order: (weights, weights of its block linears, those of
    # them fp8 quantizes): what each block's streamed bytes are counted from (`block_bytes`).
    transformer_block_weights: tuple[tuple[int, int, int], ...]
    # A ControlNet's own weights (0 without one): all, its blocks' (streamed like the transformer's
    # in block-offload), its largest block, and its control layers (each leaves a hint per step).
    controlnet_params: int = 0
    controlnet_blocks_params: int = 0
    controlnet_block_params: int = 0
    controlnet_layers: int = 0
    # Weights that stay quantized as stored (a GGUF transformer's): their bytes on the device, and
    # how many of `transformer_params` they hold. Such weights are never cast or quantized again;
    # block-offload streams them as stored.
    transformer_stored_bytes: int = 0
    transformer_stored_params: int = 0


@dataclass(frozen=True)
class Estimate:
    plan: str
    quantize: str
    vae_tiling: bool
    stages: dict[str, int]  # peak bytes per stage
    resident_blocks: int = 0  # block-offload: transformer blocks kept on the GPU
    resident_layers: int = 0  # te-offload: text-encoder layers kept on the GPU
    split_cfg: bool = False  # CFG's positive and negative halves run one after the other

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def label(self) -> str:
        extras = [q for q in (self.quantize,) if q != "none"] + (["vae-tiling"] if self.vae_tiling else [])
        extras += [SPLIT_CFG] if self.split_cfg else []
        kept = [f"{self.resident_blocks} blocks"] if self.resident_blocks else []
        kept += [f"{self.resident_layers} text-encoder layers"] if self.resident_layers else []
        plan = self.plan + (f" ({', '.join(kept)} resident)" if kept else "")
        return plan + "".join(f" + {e}" for e in extras)


@dataclass(frozen=True)
class Choice:
    chosen: Estimate | None  # None: nothing fits
    budget: int
    considered: list[Estimate]


# The engine embeds prompts with the input of the text encoder's last layer (hidden_states[-2]) and
# never runs that layer (pipeline.without_last_layer): streamed plans leave it on the CPU.
UNUSED_TEXT_LAYERS = 1


def model_shape(
    transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module, controlnet: Any = None
) -> ModelShape:
    """Counts from modules (real or on the meta device); `controlnet` is a ZImageControlNetModel or
    a `control.ControlNet`, counted by its own parameters."""
    blocks = list(transformer_blocks(transformer))
    linears = [m for n, m in transformer.named_modules() if is_block_linear(m, n)]  # what quantization shrinks
    fp8_plain = [m for n, m in transformer.named_modules() if is_block_linear(m, n) and not quantizes("fp8", m, n)]
    layers = list(text_encoder.layers)
    used, unused = layers[:-UNUSED_TEXT_LAYERS], layers[-UNUSED_TEXT_LAYERS:]
    tc = transformer.config
    return ModelShape(
        transformer_params=_count(transformer),
        transformer_blocks_params=sum(_count(b) for b in blocks),
        transformer_block_params=max(_count(b) for b in blocks),
        transformer_linear_params=sum(logical_numel(m.weight) for m in linears),
        transformer_largest_linear=max(logical_numel(m.weight) for m in linears),
        transformer_fp8_plain_params=sum(logical_numel(m.weight) for m in fp8_plain),
        transformer_block_count=len(blocks),
        text_encoder_params=_count(text_encoder),
        text_encoder_embed_params=_count(text_encoder.embed_tokens),
        text_encoder_layers_params=sum(_count(layer) for layer in used),
        text_encoder_layer_params=max(_count(layer) for layer in used),
        text_encoder_layers=len(used),
        text_encoder_unused_params=sum(_count(layer) for layer in unused),
        vae_params=_count(vae),
        dim=tc.dim,
        ffn_dim=blocks[0].feed_forward.w1.out_features,
        text_dim=text_encoder.config.hidden_size,
        vae_channels=vae.config.block_out_channels[0],
        spatial_unit=(2 ** (len(vae.config.block_out_channels) - 1)) * tc.all_patch_size[0],
        transformer_block_weights=tuple(_block_weights(transformer)),
        **controlnet_counts(getattr(controlnet, "model", controlnet)),
        **stored_counts(transformer),
    )


def _block_weights(transformer: torch.nn.Module) -> list[tuple[int, int, int]]:
    """ModelShape.transformer_block_weights: each block's weights, its block linears' and of those
    what fp8 quantizes (names as `quantizes` sees them: the transformer's own)."""
    out = []
    for list_name in BLOCK_LISTS:
        for i, block in enumerate(getattr(transformer, list_name)):
            names = [(f"{list_name}.{i}.{n}", m) for n, m in block.named_modules()]
            linears = [(n, m) for n, m in names if is_block_linear(m, n)]
            fp8 = [m for n, m in linears if quantizes("fp8", m, n)]
            out.append((_count(block), _weights(m for _, m in linears), _weights(fp8)))
    return out


def _weights(linears: Any) -> int:
    return sum(logical_numel(m.weight) for m in linears)


def controlnet_counts(controlnet: torch.nn.Module | None) -> dict[str, int]:
    """ModelShape's ControlNet fields: its own parameters only (control.own_parameters)."""
    from ..control import own_parameters

    if controlnet is None:
        return {}
    blocks = list(controlnet_blocks(controlnet))
    return {
        "controlnet_params": sum(p.numel() for p in own_parameters(controlnet)),
        "controlnet_blocks_params": sum(_count(b) for b in blocks),
        "controlnet_block_params": max((_count(b) for b in blocks), default=0),
        "controlnet_layers": len(controlnet.control_layers),
    }


def shape_from_source(source: Any, controlnet: str | None = None) -> ModelShape:
    """The shape of a resolved checkpoint and the ControlNet `controlnet` names, from their configs
    and headers alone (no weights are read, but one tensor that tells a 2.0 file from a 2.1)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoConfig

    from ..control import resolve_controlnet
    from ..control.structure import build_meta, resolve_config
    from ..loader import _empty, _text_encoder_class

    transformer = _empty(lambda: ZImageTransformer2DModel.from_config(source.config("transformer")))
    vae = _empty(lambda: AutoencoderKL.from_config(source.config("vae")))
    stored = {}
    if getattr(source, "transformer_file", None) is not None:
        from ..gguf import inspect

        info = inspect(source.transformer_file)  # the header only
        stored = {"transformer_stored_bytes": info.quantized_bytes, "transformer_stored_params": info.quantized_params}
    te_config = AutoConfig.from_pretrained(source.path / "text_encoder")
    text_encoder = _empty(lambda: _text_encoder_class(source.path)._from_config(te_config))
    control = None
    if controlnet is not None:
        control = build_meta(resolve_config(resolve_controlnet(controlnet), source.config("transformer"))[0])
    return replace(model_shape(transformer, text_encoder, vae, control), **stored)


def estimate(
    shape: ModelShape,
    dtype_bytes: dict[str, int],
    *,
    plan: str,
    width: int,
    height: int,
    batch: int = 1,
    cfg: bool = False,
    prompt_tokens: int = 128,
    quantize: str = "none",
    vae_tiling: bool = False,
    resident_blocks: int = 0,
    resident_layers: int = 0,
    compiled_vae: bool = False,
    split_cfg: bool = False,
    shards: int = 1,
) -> Estimate:
    """Peak bytes per stage; `dtype_bytes` is bytes per element for transformer/text_encoder/vae.

    `compiled_vae`: the engine compiles the VAE decoder (which needs less) where the plan is
    `compilable`; otherwise it is estimated eager. `split_cfg`: CFG's halves denoise one after
    the other, so the denoise holds one half's activations. `shards`: processes sharing each
    image's tokens (`transformer_activation`).
    """
    if plan not in PLANS:
        raise ValueError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
    if (quantize != "none" or shape.transformer_stored_params) and plan in UNQUANTIZED_PLANS:
        what = f"{quantize}-quantized" if quantize != "none" else "GGUF"
        raise ValueError(f"plan {plan} runs plain weights only and cannot run a {what} transformer")
    t_e, te_e, v_e = dtype_bytes["transformer"], dtype_bytes["text_encoder"], dtype_bytes["vae"]
    held = _held(shape, dtype_bytes, plan, quantize, resident_blocks, resident_layers)
    vae_compiled = compiled_vae and compilable(plan)
    doubled = cfg and not split_cfg
    denoise = transformer_activation(shape, t_e, width, height, batch, doubled, prompt_tokens, shards)
    denoise += controlnet_activation(shape, t_e, width, height, batch, doubled, prompt_tokens)
    stages = {
        "encode": held[0] + _text_activation(shape, te_e, batch * (2 if cfg else 1), prompt_tokens),
        "denoise": held[1] + denoise,
        "decode": held[2] + vae_activation(shape, v_e, width, height, batch, vae_tiling, vae_compiled),
        "image": held[2] + vae_encode_activation(shape, v_e, width, height, vae_tiling),
    }
    blocks = resident_blocks if plan == "block-offload" else 0
    layers = resident_layers if plan in STREAMED_TE else 0
    return Estimate(plan, quantize, vae_tiling, stages, blocks, layers, split_cfg=cfg and split_cfg)


def _held(
    shape: ModelShape, dtype_bytes: dict[str, int], plan: str, quantize: str, resident_blocks: int, resident_layers: int
) -> tuple[int, int, int]:
    """The weights on the device while encoding, denoising and decoding under `plan`."""
    t_e, te_e, v_e = dtype_bytes["transformer"], dtype_bytes["text_encoder"], dtype_bytes["vae"]
    transformer = _transformer_bytes(shape, t_e, quantize)
    text_encoder = shape.text_encoder_params * te_e
    vae = shape.vae_params * v_e
    # What each stage holds of each component's weights under the plan.
    t_outside = shape.transformer_params - shape.transformer_blocks_params
    te_layers = shape.text_encoder_layers_params + shape.text_encoder_unused_params
    te_outside = shape.text_encoder_params - te_layers  # token embeddings, final norm, rotary tables
    # memory.stream: the streamed layers pass through two slots; the token embeddings stay on the CPU.
    te_kept = resident_layers + min(2, shape.text_encoder_layers - resident_layers)
    te_stream = (te_outside - shape.text_encoder_embed_params + te_kept * shape.text_encoder_layer_params) * te_e
    t_blocks = streamed_transformer_bytes(shape, t_e, quantize, resident_blocks)
    # A ControlNet (its own weights, unquantized) goes where the transformer goes; under
    # block-offload all its blocks stream through two slots of their own.
    control = shape.controlnet_params * t_e
    control_slots = 2 * shape.controlnet_block_params if shape.controlnet_blocks_params else 0
    control_stream = (shape.controlnet_params - shape.controlnet_blocks_params + control_slots) * t_e
    # diffusers leaf-level group offloading: everything outside the layers, plus two layers' worth.
    leaf_te = (te_outside + 2 * shape.text_encoder_layer_params) * te_e
    leaf_t = (t_outside + 2 * shape.transformer_largest_linear) * t_e
    return {
        "resident": (transformer + text_encoder + vae + control,) * 3,
        "te-offload": (transformer + te_stream + vae + control,) * 3,
        "model-offload": (text_encoder, transformer + control, vae),
        "block-offload": (t_blocks + te_stream + vae + control_stream,) * 3,
        "sequential": (leaf_te, leaf_t, vae),
    }[plan]


def block_bytes(shape: ModelShape, elem: int, quantize: str) -> list[int]:
    """Each transformer block's bytes as stored (what block-offload keeps or streams): `elem` bytes
    per weight, but QUANTIZED_BYTES for the block linears `quantize` quantizes, and for a GGUF
    transformer the file's average bytes per quantized weight for all its block linears."""
    if shape.transformer_stored_params:
        per_weight = shape.transformer_stored_bytes / shape.transformer_stored_params
    else:
        per_weight = QUANTIZED_BYTES.get(quantize, elem)
    out = []
    for weights, linear, fp8_linear in shape.transformer_block_weights:
        quantized = fp8_linear if quantize == "fp8" and not shape.transformer_stored_params else linear
        out.append(int((weights - quantized) * elem + quantized * per_weight))
    return out


def streamed_transformer_bytes(shape: ModelShape, elem: int, quantize: str, resident_blocks: int) -> int:
    """The transformer's bytes on the device under block-offload: everything outside the blocks,
    the `resident_blocks` kept, and the two slots the others stream through, each as large as the
    largest of its blocks (memory.stream.BlockStreamer; `streamed_positions` chooses them)."""
    sizes = block_bytes(shape, elem, quantize)
    outside = _transformer_bytes(shape, elem, quantize) - sum(sizes)
    streamed = streamed_positions(len(sizes), len(sizes) - resident_blocks)
    kept = sum(sizes) - sum(sizes[i] for i in streamed)
    order = [sizes[i] for i in streamed]
    return outside + kept + max(order[0::2], default=0) + max(order[1::2], default=0)


def streamed_positions(total: int, streamed: int) -> list[int]:
    """Which of `total` blocks (in execution order) stream: `streamed` of them, evenly spread.

    Spread, because the copy engine then keeps working while the resident blocks in between
    compute; with the resident blocks bunched at the end, only two copies (the two slots) can
    overlap them and the link idles for the rest (docs/performance.md has both measured).
    """
    return [(2 * i + 1) * total // (2 * streamed) for i in range(streamed)] if streamed else []


def choose(
    shape: ModelShape,
    dtype_bytes: dict[str, int],
    budget: int,
    *,
    width: int,
    height: int,
    batch: int = 1,
    cfg: bool = False,
    quantize_options: tuple[str, ...] = (),
    exact: bool = True,
    margin: float = 0.05,
    compiled_vae: bool = False,
    shards: int = 1,
) -> Choice:
    """The fastest plan whose estimate fits `budget` less a margin (5 %, at least 0.5 GiB).

    Order: SPEED_ORDER, each plan without then with VAE tiling; for block-offload, the most
    resident blocks that fit. Under CFG a plan whose doubled batch does not fit is tried with its
    halves in two passes before the next plan. Exact (unquantized) plans come before any quantized
    one, which is tried only when no exact plan fits. `exact=False` skips the exact plans (the user
    asked for a quantization).
    """
    usable = usable_budget(budget, margin)
    request = {"width": width, "height": height, "batch": batch, "cfg": cfg, "compiled_vae": compiled_vae}
    request["shards"] = shards
    considered = []
    for quantize in (("none",) if exact else ()) + quantize_options:
        for plan in SPEED_ORDER:
            if (quantize != "none" or shape.transformer_stored_params) and plan in UNQUANTIZED_PLANS:
                continue
            for est in plan_options(shape, dtype_bytes, usable, plan=plan, quantize=quantize, **request):
                considered.append(est)
                if est.peak <= usable:
                    return Choice(est, budget, considered)
    return Choice(None, budget, considered)


def plan_options(
    shape: ModelShape, dtype_bytes: dict[str, int], usable: int, *, cfg: bool, **request: Any
) -> Iterator[Estimate]:
    """One plan's estimates in the order the planner tries them (`choose`, and an explicit plan in
    `plan_layout`): CFG's halves batched, then in two passes; each without, then with VAE tiling
    (`_options`): two passes call the transformer twice a step (and a streamed plan copies its
    blocks twice), which costs more than a tiled decode."""
    for split in (False, True) if cfg else (False,):
        yield from _options(shape, dtype_bytes, usable, cfg=cfg, split_cfg=split, **request)


def _options(shape: ModelShape, dtype_bytes: dict[str, int], usable: int, **request: Any) -> list[Estimate]:
    """One plan's estimates without, then with VAE tiling (the other way round where tiling keeps
    more transformer blocks resident)."""
    options = [fitting(shape, dtype_bytes, usable, vae_tiling=tiling, **request) for tiling in (False, True)]
    if options[1].resident_blocks > options[0].resident_blocks:
        # A block kept saves a 0.36 GB copy every step; a tiled decode costs less than a
        # few of those. (Not so for text-encoder layers, copied once per new prompt.)
        options.reverse()
    return options


def usable_budget(budget: int, margin: float = 0.05) -> int:
    return budget - max(int(budget * margin), GIB // 2)


def fitting(shape: ModelShape, dtype_bytes: dict[str, int], usable: int, *, plan: str, **request: Any) -> Estimate:
    """The estimate of `plan` with the most resident transformer blocks (block-offload) or
    text-encoder layers (te-offload) that fit `usable`; none if even that does not fit."""
    knob, count = {
        "block-offload": ("resident_blocks", shape.transformer_block_count),
        "te-offload": ("resident_layers", shape.text_encoder_layers),
    }.get(plan, (None, 1))
    if knob is None:
        return estimate(shape, dtype_bytes, plan=plan, **request)
    low, high = 0, count - 1  # at least one streams
    while low < high:  # the peak grows with each resident one: bisect for the largest that fits
        mid = (low + high + 1) // 2
        if estimate(shape, dtype_bytes, plan=plan, **{knob: mid}, **request).peak <= usable:
            low = mid
        else:
            high = mid - 1
    return estimate(shape, dtype_bytes, plan=plan, **{knob: low}, **request)


def _count(module: torch.nn.Module) -> int:
    return sum(logical_numel(p) for p in module.parameters())


def stored_counts(transformer: torch.nn.Module) -> dict[str, int]:
    """ModelShape's stored-quantized fields: the bytes and weights of GGUF parameters."""
    stored = [p for p in transformer.parameters() if hasattr(p, "quant_type")]
    return {
        "transformer_stored_bytes": sum(p.numel() * p.element_size() for p in stored),
        "transformer_stored_params": sum(logical_numel(p) for p in stored),
    }


def _transformer_bytes(shape: ModelShape, elem: int, quantize: str) -> int:
    if shape.transformer_stored_params:  # GGUF: the stored bytes, the rest cast to the dtype
        return shape.transformer_stored_bytes + (shape.transformer_params - shape.transformer_stored_params) * elem
    if quantize == "none":
        return shape.transformer_params * elem
    quantized = shape.transformer_linear_params - (shape.transformer_fp8_plain_params if quantize == "fp8" else 0)
    rest = shape.transformer_params - quantized
    return int(rest * elem + quantized * QUANTIZED_BYTES[quantize])


def _text_activation(shape: ModelShape, elem: int, batch: int, tokens: int) -> int:
    # A layer's input and output and the returned states, plus one MLP's intermediates.
    states = 3 * batch * tokens * shape.text_dim * elem
    mlp = 3 * batch * tokens * 4 * shape.text_dim * elem
    return states + mlp


def transformer_activation(
    shape: ModelShape,
    elem: int,
    width: int,
    height: int,
    batch: int,
    cfg: bool,
    prompt_tokens: int,
    shards: int = 1,
) -> int:
    """Bytes of one transformer pass's activations above its weights (the denoise stage's share).

    With `shards` processes sharing the tokens (`accel.sequence`), each block holds 1/shards of
    them; the whole image's tokens (gathered after the noise refiner) and the whole unified
    sequence (built before its split) are two residual-width tensors of every token on top.
    """
    tokens = (width // shape.spatial_unit) * (height // shape.spatial_unit) + -(-prompt_tokens // 32) * 32
    whole = batch * (2 if cfg else 1) * tokens
    rows = -(-whole // shards)
    gathered = 2 * whole * shape.dim * elem if shards > 1 else 0
    ffn = 3 * shape.ffn_dim * elem
    attention = 3 * shape.dim * elem + 2 * shape.dim * 4
    return rows * (max(ffn, attention) + RESIDUAL_COPIES * shape.dim * elem) + gathered


def controlnet_activation(
    shape: ModelShape, elem: int, width: int, height: int, batch: int, cfg: bool, prompt_tokens: int
) -> int:
    """Bytes a ControlNet adds to a transformer pass's activations (0 without one): its hint
    stacks and block samples, all residual-width tensors over the unified sequence."""
    if not shape.controlnet_layers:
        return 0
    tokens = (width // shape.spatial_unit) * (height // shape.spatial_unit) + -(-prompt_tokens // 32) * 32
    rows = batch * (2 if cfg else 1) * tokens
    copies = CONTROL_COPIES_PER_LAYER * shape.controlnet_layers + CONTROL_EXTRA_COPIES
    return rows * copies * shape.dim * elem


def batch_room(
    shape: ModelShape,
    elem: int,
    *,
    width: int,
    height: int,
    cfg: bool,
    prompt_tokens: int,
    controlled: bool,
    free_bytes: int,
    pool_factor: float = 1.0,
    most: int | None = None,
    shards: int = 1,
) -> int:
    """The most images of one request shape whose denoise activations fit FREE_SHARE of
    `free_bytes`: the transformer's, and the ControlNet's when `controlled`, times `pool_factor`
    (a step graph's pool holds more than one eager pass). At least 1, since a lone job always runs
    (the engine's leaner-plan retry handles one that does not fit); at most `most` when given.

    The activations grow with the batch's rows and nothing else, so one image's divides the room.
    The decode sets no limit: it runs one image at a time (only its float32 output grows with the
    batch), and the engine tiles it where it would not fit.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width {width} and height {height} must be positive pixel counts")
    if prompt_tokens < 0 or free_bytes < 0:
        raise ValueError(f"prompt_tokens {prompt_tokens} and free_bytes {free_bytes} must be 0 or more")
    if pool_factor < 1.0:
        raise ValueError(f"pool_factor {pool_factor} must be at least 1.0 (a pool holds a whole pass)")
    if most is not None and most < 1:
        raise ValueError(f"most {most} must be at least 1 image")
    args = (shape, elem, width, height, 1, cfg, prompt_tokens)
    one = transformer_activation(*args, shards) + (controlnet_activation(*args) if controlled else 0)
    room = max(1, int(free_bytes * FREE_SHARE // (one * pool_factor)))
    return room if most is None else min(room, most)


def denoise_onload(shape: ModelShape, dtype_bytes: dict[str, int], layout: Layout, *, staged: bool = False) -> int:
    """Bytes of weights the denoise stage brings onto the device that are not there yet: under
    DENOISE_ONLOADED plans, what that stage holds of the transformer and the ControlNet (`_held`);
    0 under the plans that keep their weights and streaming slots allocated. `staged`: the stage
    has begun (`Placement.stage`), so only FORWARD_ONLOADED plans' weights are still to come."""
    if layout.plan not in (FORWARD_ONLOADED if staged else DENOISE_ONLOADED):
        return 0
    return _held(shape, dtype_bytes, layout.plan, layout.quantize, layout.resident_blocks, layout.resident_layers)[1]


def vae_encode_activation(shape: ModelShape, elem: int, width: int, height: int, tiling: bool) -> int:
    """Bytes encoding one input image needs above the VAE's weights (the pipeline encodes one image
    at a time): the float32 pixels and the encoder's full-resolution tensors (or one tile's)."""
    pixels = min(width * height, VAE_TILE * VAE_TILE) if tiling else width * height
    return 3 * width * height * 4 + VAE_ENCODE_LIVE_TENSORS * pixels * shape.vae_channels * elem


def vae_activation(
    shape: ModelShape, elem: int, width: int, height: int, batch: int, tiling: bool, compiled: bool = False
) -> int:
    """Bytes the decode stage needs above the VAE's weights (`compiled`: the decoder is compiled)."""
    image = batch * 3 * width * height * 4  # the float32 image the decode returns
    pixels = min(width * height, VAE_TILE * VAE_TILE) if tiling else width * height
    live = VAE_LIVE_TENSORS
    if compiled and not tiling:
        static = width == height == accel_compile.STATIC_DECODE_SIZE  # the decoder's static graph
        live = VAE_LIVE_TENSORS_STATIC if static else VAE_LIVE_TENSORS_COMPILED
    return image + live * pixels * shape.vae_channels * elem  # pipeline.decode: one image at a time


def dtype_bytes(dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    return {k: torch.empty((), dtype=v).element_size() for k, v in dtypes.items()}


# Plans that stream the text encoder (memory.stream).
STREAMED_TE = ("te-offload", "block-offload")
# Plans whose transformer forward runs through diffusers group offloading hooks: not compiled.
STREAMED_PLANS = ("sequential",)
# Plans that keep as many text-encoder layers or transformer blocks resident as the budget allows.
TUNABLE_PLANS = ("te-offload", "block-offload")
# The request size the planner plans a load for.
PLANNED_SIZE = 1024


@dataclass(frozen=True)
class Layout:
    """The memory layout an engine runs with: where the weights live (`plan`, and under te-offload
    or block-offload how many text-encoder layers or transformer blocks stay resident), whether the
    decode starts tiled, and the transformer's quantization. `plan_layout` decides it at load;
    `leaner` gives the next one after running out of memory."""

    plan: str = "resident"
    resident_blocks: int = 0  # block-offload: transformer blocks kept on the device
    resident_layers: int = 0  # te-offload, block-offload: text-encoder layers kept on the device
    vae_tiling: bool = False
    quantize: str = "none"
    # CFG's positive and negative halves run one after the other: the doubled batch did not fit.
    split_cfg: bool = False

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"plan {self.plan!r} is not one of {', '.join(PLANS)}")
        if self.resident_blocks < 0 or self.resident_layers < 0:
            raise ValueError(f"resident blocks {self.resident_blocks} and layers {self.resident_layers} must be >= 0")


def layout_of(est: Estimate) -> Layout:
    return Layout(est.plan, est.resident_blocks, est.resident_layers, est.vae_tiling, est.quantize, est.split_cfg)


def leaner(layout: Layout, guided: bool = False) -> Layout | None:
    """The next layout that holds less on the device, or None: for a `guided` (CFG) request,
    first the same weights with CFG's halves in two passes. A quantized transformer stops at
    block-offload (UNQUANTIZED_PLANS)."""
    if guided and not layout.split_cfg:
        return replace(layout, split_cfg=True)
    if layout.resident_blocks or layout.resident_layers:
        return replace(layout, resident_blocks=0, resident_layers=0)
    following = {
        "resident": "te-offload",
        "te-offload": "block-offload",
        "model-offload": "block-offload",
        "block-offload": "sequential",
    }
    target = following.get(layout.plan)
    if target is None or (layout.quantize != "none" and target in UNQUANTIZED_PLANS):
        return None
    return replace(layout, plan=target)


def compilable(plan: str) -> bool:
    """Whether the engine compiles under `plan` (`eager_reason` says why not)."""
    return eager_reason(plan) is None


def eager_reason(plan: str) -> str | None:
    """Why the engine runs eagerly under `plan`, or None where it compiles: diffusers' group
    offloading (sequential) wraps the blocks' forwards itself, and compiling them too is not
    supported. Every other plan compiles whatever its weights (bf16, fp8, int8, GGUF)."""
    if plan in STREAMED_PLANS:
        return f"the {plan} plan's group-offload hooks wrap the blocks' forwards"
    return None


def fusable(plan: str) -> bool:
    """Whether `plan` may fuse projections: only where no block's weights move. A fused tensor is
    a new device copy (a plain attribute) that streamed or shared blocks' views and `Module.to`
    would not reach. Fusing the resident blocks of a streamed plan after placement was measured:
    ~40 ms less at 8 GiB, but 1.1 GiB of the 16 GiB cap left reserved and unusable around the
    freed projections, so the decode ran out of memory."""
    return plan == "resident"


# ---------------------------------------------------------------------------------------------
# The load-time policy


def plan_layout(
    config: Any, source: Any, dtypes: dict[str, torch.dtype], budget: int | None, caps: Any, *, compiled_vae: bool
) -> Layout:
    """The layout to load with: `config.memory`, or the fastest that fits `budget` bytes (None:
    no device budget, the memory is the host's). An explicit te-offload or block-offload keeps as
    many layers or blocks resident as the budget allows, its options tried in `choose`'s order
    (`plan_options`).

    Quantization is `config.quantize`; with `--quantize none` and `--memory auto`, a quantized
    layout is chosen only when no exact one fits. A GGUF transformer is never quantized again and
    runs under no plain-weight plan, so where none of its plans fits that is a GPUMemoryError, as
    it is for a requested quantization. The planned request is a 1024² image at the model's
    default guidance (`ModelSource.profile`).
    """
    if config.quantize != "none" and config.memory in UNQUANTIZED_PLANS:
        raise InvalidRequestError(
            f"--quantize {config.quantize} cannot be combined with --memory {config.memory} (diffusers' group "
            "offloading), which runs plain weights only; use --memory block-offload, which streams the quantized "
            "weights, or auto, resident, te-offload or model-offload"
        )
    if getattr(source, "transformer_file", None) is not None:
        _check_stored(config, source.transformer_file, dtypes["transformer"])
    tunable = config.memory in TUNABLE_PLANS
    if budget is None or (config.memory != "auto" and not tunable):
        return Layout(config.memory if config.memory != "auto" else "resident", quantize=config.quantize)
    shape = shape_from_source(source, getattr(config, "controlnet", None))
    sizes = dtype_bytes(dtypes)
    # A model whose default request guides (the base model) is planned for its batch of two.
    cfg = source.profile(config.preset).profile.guidance > 0
    request = {"width": PLANNED_SIZE, "height": PLANNED_SIZE, "cfg": cfg, "compiled_vae": compiled_vae}
    request["shards"] = getattr(config, "parallel", 1)  # each process plans for its share of the tokens
    if tunable:
        usable = usable_budget(budget)
        options = list(plan_options(shape, sizes, usable, plan=config.memory, quantize=config.quantize, **request))
        fits = [est for est in options if est.peak <= usable]
        return layout_of(fits[0] if fits else min(options, key=lambda est: est.peak))
    exact = config.quantize == "none"
    stored = getattr(source, "transformer_file", None) if shape.transformer_stored_params else None
    if stored is not None:
        options: tuple[str, ...] = ()  # GGUF weights stay as stored: no quantization to fall back to
    else:
        options = usable_quantizations(caps, dtypes["transformer"]) if exact else (config.quantize,)
    choice = choose(shape, sizes, budget, quantize_options=options, exact=exact, **request)
    return _chosen(choice, config.quantize, stored)


def _check_stored(config: Any, path: Any, dtype: torch.dtype) -> None:
    """A GGUF transformer stays quantized as stored: no second quantization, no plain-weight plan
    (sequential), and no float16 (its overflow guard rescales weights in place)."""
    from ..gguf import is_gguf

    if not is_gguf(path):
        return
    if dtype is torch.float16:
        raise InvalidRequestError(
            f"the GGUF transformer {path} cannot run in float16: the float16 overflow guard rescales weights, "
            "which GGUF keeps quantized; use --transformer-dtype bfloat16 (or float32 where bfloat16 is slow)"
        )
    check_stored_settings(config, path)


def _chosen(choice: Choice, quantize: str, stored: Any = None) -> Layout:
    """The layout of `choice`'s estimate; where none fits, the leanest plan (sequential), which
    runs plain weights only: a transformer quantized by `quantize` or stored quantized (`stored`,
    a GGUF file) has no plan leaner than those considered, so that is an error naming the need."""
    budget = choice.budget
    if choice.chosen is None and (quantize != "none" or stored is not None):
        least = min(choice.considered, key=lambda e: e.peak)
        need = f"about {least.peak / GIB:.2f} GiB even as {least.label()}, and the budget is {budget / GIB:.2f} GiB"
        if stored is None:
            raise GPUMemoryError(
                f"--quantize {quantize} needs {need}; use --quantize none, whose sequential plan "
                "streams the weights layer by layer and fits in less"
            )
        raise GPUMemoryError(
            f"the GGUF transformer {stored} needs {need}; free GPU memory or raise --vram-budget, use a "
            "smaller GGUF quantization, or use a safetensors transformer, whose sequential plan streams "
            "plain weights layer by layer and fits in less"
        )
    if choice.chosen is None:
        log.warning("no memory plan fits %.1f GiB even at %d²; trying the leanest", budget / GIB, PLANNED_SIZE)
        return Layout(PLANS[-1], vae_tiling=True, quantize=quantize)
    est = choice.chosen
    log.info("memory plan %s: estimated peak %.1f GiB of %.1f GiB", est.label(), est.peak / GIB, budget / GIB)
    return layout_of(est)
