"""Memory planning: peak GPU memory of a request under each placement plan, and the fastest plan that fits.

Pure functions of the model's configs and the request; nothing here moves a tensor.

The peak is the largest of three stages, each its resident weights plus its activations:
  encode  (text encoder)   weights per plan + hidden states of the prompt tokens
  denoise (transformer)    weights per plan + one block's intermediates for every token
  decode  (VAE)            weights + the full-resolution decoder tensors (or one tile's)
Weights are exact (parameter counts from the configs, built on the meta device). Activations are
counted from the shapes; the VAE's constant comes from H100 measurements (docs/performance.md)
and is checked against them in tests/test_memory.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..accel.compile import (
    BLOCK_LISTS,
    STATIC_DECODE_SIZE,
    is_block_linear,
    quantizes,
    transformer_blocks,
    unfuse_projections,
)
from ..config import MEMORY_CHOICES

GIB = 2**30
# resident: everything on the GPU. te-offload: the text encoder's layers stream through the GPU
# (zturbo.stream) when a prompt is not in the prompt cache. model-offload: the text encoder and
# transformer take turns on the GPU. block-offload: as te-offload, and the transformer blocks the
# budget cannot hold stream too. sequential: diffusers' leaf-level group offloading, one layer
# at a time.
PLANS = MEMORY_CHOICES[1:]
# The planner's order, fastest first. Streaming only the blocks that do not fit (block-offload)
# beats moving whole models each request (model-offload) in less memory, so model-offload is only
# ever run when asked for; it stays for GPUs where pinned host memory is scarce.
SPEED_ORDER = ("resident", "te-offload", "block-offload", "model-offload", "sequential")
# Plans whose transformer weights are streamed as raw bytes: no quantized (tensor-subclass) weights.
UNQUANTIZED_PLANS = ("block-offload", "sequential")
# Bytes per weight of the transformer's block linears when quantized (scales are per row: small).
QUANTIZED_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}
# Live full-resolution decoder tensors of `block_out_channels[0]` channels at the VAE's peak
# (eager bf16): 2.6 GiB above the weights at 1024² on an H100, 9.7 GiB at 2048².
VAE_LIVE_TENSORS = 10
# A compiled whole-image decode frees intermediates sooner. Measured on an H100 (bf16, per image,
# docs/performance.md): the static graph the decoder keeps for accel.STATIC_DECODE_SIZE² (1024²)
# holds 5 such tensors, the graph with dynamic height and width that serves every other size 8,
# from 512² to 2048²; eager holds 9.5-10. Tiled decodes measured at the eager count (their
# decoded tiles are held for blending), so they keep it.
VAE_LIVE_TENSORS_STATIC = 5
VAE_LIVE_TENSORS_COMPILED = 8
VAE_TILE = 512  # pixels per side of a decoder tile when tiling
# Per token in a transformer block: FFN phase (w1, w3 outputs and their product) and attention
# phase (q, k, v, float32 RoPE copies of q and k); plus about four residual-width tensors.
RESIDUAL_COPIES = 4


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs, read from the configs (parameter counts from meta-device modules)."""

    transformer_params: int
    transformer_blocks_params: int  # all blocks together
    transformer_block_params: int  # the largest block
    transformer_linear_params: int  # in blocks: what quantization shrinks
    transformer_fp8_plain_params: int  # of those, what fp8 leaves plain (accel.FP8_PLAIN_BLOCKS)
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


@dataclass(frozen=True)
class Estimate:
    plan: str
    quantize: str
    vae_tiling: bool
    stages: dict[str, int]  # peak bytes per stage
    resident_blocks: int = 0  # block-offload: transformer blocks kept on the GPU
    resident_layers: int = 0  # te-offload: text-encoder layers kept on the GPU

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def label(self) -> str:
        extras = [q for q in (self.quantize,) if q != "none"] + (["vae-tiling"] if self.vae_tiling else [])
        kept = [f"{self.resident_blocks} blocks"] if self.resident_blocks else []
        kept += [f"{self.resident_layers} text-encoder layers"] if self.resident_layers else []
        plan = self.plan + (f" ({', '.join(kept)} resident)" if kept else "")
        return plan + "".join(f" + {e}" for e in extras)


@dataclass(frozen=True)
class Choice:
    chosen: Estimate | None  # None: nothing fits
    budget: int
    considered: list[Estimate]


# te-offload: the last transformer blocks whose memory text-encoder layers borrow while encoding.
# Their weights come back during the first step, overlapping the blocks before them: 8 blocks
# (2.7 GB, ~50 ms at 55 GB/s) behind 26 blocks' compute (~70 ms at 1024² on an H100).
SHARED_BLOCKS = 8

# The engine embeds prompts with the input of the text encoder's last layer (hidden_states[-2]) and
# never runs that layer (engine._without_last_layer): streamed plans leave it on the CPU.
UNUSED_TEXT_LAYERS = 1


def model_shape(transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> ModelShape:
    """Counts from modules (real or on the meta device)."""
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
        transformer_linear_params=sum(m.weight.numel() for m in linears),
        transformer_largest_linear=max(m.weight.numel() for m in linears),
        transformer_fp8_plain_params=sum(m.weight.numel() for m in fp8_plain),
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
    )


def shape_from_source(source: Any) -> ModelShape:
    """The shape of a resolved checkpoint, from its configs alone (no weights are read)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoConfig

    from ..loader import _empty, _text_encoder_class

    transformer = _empty(lambda: ZImageTransformer2DModel.from_config(source.config("transformer")))
    vae = _empty(lambda: AutoencoderKL.from_config(source.config("vae")))
    te_config = AutoConfig.from_pretrained(source.path / "text_encoder")
    text_encoder = _empty(lambda: _text_encoder_class(source.path)._from_config(te_config))
    return model_shape(transformer, text_encoder, vae)


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
) -> Estimate:
    """Peak bytes per stage; `dtype_bytes` is bytes per element for transformer/text_encoder/vae.

    `compiled_vae`: the engine compiles the VAE decoder (which needs less) where the plan is
    `compilable`; otherwise it is estimated eager.
    """
    if plan not in PLANS:
        raise ValueError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
    if quantize != "none" and plan in UNQUANTIZED_PLANS:
        raise ValueError(f"plan {plan} streams plain weights and cannot run a {quantize}-quantized transformer")
    t_e, te_e, v_e = dtype_bytes["transformer"], dtype_bytes["text_encoder"], dtype_bytes["vae"]
    transformer = _transformer_bytes(shape, t_e, quantize)
    text_encoder = shape.text_encoder_params * te_e
    vae = shape.vae_params * v_e
    # What each stage holds of each component's weights under the plan.
    t_outside = shape.transformer_params - shape.transformer_blocks_params
    te_layers = shape.text_encoder_layers_params + shape.text_encoder_unused_params
    te_outside = shape.text_encoder_params - te_layers  # token embeddings, final norm, rotary tables
    # zturbo.stream: the streamed layers pass through two slots; the token embeddings stay on the CPU.
    te_kept = resident_layers + min(2, shape.text_encoder_layers - resident_layers)
    te_stream = (te_outside - shape.text_encoder_embed_params + te_kept * shape.text_encoder_layer_params) * te_e
    streamed = shape.transformer_block_count - resident_blocks
    t_blocks = (t_outside + (resident_blocks + min(2, streamed)) * shape.transformer_block_params) * t_e
    # diffusers leaf-level group offloading: everything outside the layers, plus two layers' worth.
    leaf_te = (te_outside + 2 * shape.text_encoder_layer_params) * te_e
    leaf_t = (t_outside + 2 * shape.transformer_largest_linear) * t_e
    held = {
        "resident": (transformer + text_encoder + vae,) * 3,
        "te-offload": (transformer + te_stream + vae,) * 3,
        "model-offload": (text_encoder, transformer, vae),
        "block-offload": (t_blocks + te_stream + vae,) * 3,
        "sequential": (leaf_te, leaf_t, vae),
    }[plan]
    stages = {
        "encode": held[0] + _text_activation(shape, te_e, batch * (2 if cfg else 1), prompt_tokens),
        "denoise": held[1] + transformer_activation(shape, t_e, width, height, batch, cfg, prompt_tokens),
        "decode": held[2]
        + vae_activation(shape, v_e, width, height, batch, vae_tiling, compiled_vae and compilable(plan)),
    }
    blocks = resident_blocks if plan == "block-offload" else 0
    return Estimate(plan, quantize, vae_tiling, stages, blocks, resident_layers if plan in STREAMED_TE else 0)


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
) -> Choice:
    """The fastest plan whose estimate fits `budget` less a margin (5 %, at least 0.5 GiB).

    Order: SPEED_ORDER, each plan without then with VAE tiling; for block-offload, the most
    resident blocks that fit. Exact (unquantized) plans come before any quantized one, which is
    tried only when no exact plan fits. `exact=False` skips the exact plans (the user asked for a
    quantization).
    """
    usable = usable_budget(budget, margin)
    request = {"width": width, "height": height, "batch": batch, "cfg": cfg, "compiled_vae": compiled_vae}
    considered = []
    for quantize in (("none",) if exact else ()) + quantize_options:
        for plan in SPEED_ORDER:
            if quantize != "none" and plan in UNQUANTIZED_PLANS:
                continue
            options = [
                fitting(shape, dtype_bytes, usable, plan=plan, quantize=quantize, vae_tiling=tiling, **request)
                for tiling in (False, True)
            ]
            if options[1].resident_blocks > options[0].resident_blocks:
                # A block kept saves a 0.36 GB copy every step; a tiled decode costs less than a
                # few of those. (Not so for text-encoder layers, copied once per new prompt.)
                options.reverse()
            for est in options:
                considered.append(est)
                if est.peak <= usable:
                    return Choice(est, budget, considered)
    return Choice(None, budget, considered)


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


# ---------------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _transformer_bytes(shape: ModelShape, elem: int, quantize: str) -> int:
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
    shape: ModelShape, elem: int, width: int, height: int, batch: int, cfg: bool, prompt_tokens: int
) -> int:
    """Bytes of one transformer pass's activations above its weights (the denoise stage's share)."""
    tokens = (width // shape.spatial_unit) * (height // shape.spatial_unit) + -(-prompt_tokens // 32) * 32
    rows = batch * (2 if cfg else 1) * tokens
    ffn = 3 * shape.ffn_dim * elem
    attention = 3 * shape.dim * elem + 2 * shape.dim * 4
    return rows * (max(ffn, attention) + RESIDUAL_COPIES * shape.dim * elem)


def set_vae_tiling(vae: torch.nn.Module, on: bool, tile: int = VAE_TILE) -> None:
    """diffusers' tiled decode with `tile`-pixel tiles (25 % overlap, blended).

    Above one tile the decoder then holds one tile's activations instead of the whole image's.
    (`engine.decode` decodes one image at a time, tiled or not.)
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    vae.use_tiling = on


def vae_activation(
    shape: ModelShape, elem: int, width: int, height: int, batch: int, tiling: bool, compiled: bool = False
) -> int:
    """Bytes the decode stage needs above the VAE's weights (`compiled`: the decoder is compiled)."""
    image = batch * 3 * width * height * 4  # the float32 image the decode returns
    pixels = min(width * height, VAE_TILE * VAE_TILE) if tiling else width * height
    live = VAE_LIVE_TENSORS
    if compiled and not tiling:
        static = width == height == STATIC_DECODE_SIZE  # accel._compile_decoder's static graph
        live = VAE_LIVE_TENSORS_STATIC if static else VAE_LIVE_TENSORS_COMPILED
    return image + live * pixels * shape.vae_channels * elem  # engine.decode: one image at a time


def dtype_bytes(dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    return {k: torch.empty((), dtype=v).element_size() for k, v in dtypes.items()}


def inject_oom(module: torch.nn.Module, times: int = 1) -> None:
    """Test hook: the next `times` forward calls of `module` raise a CUDA out-of-memory error."""
    remaining = [times]

    def hook(_module: torch.nn.Module, _args: object) -> None:
        remaining[0] -= 1
        if remaining[0] <= 0:
            handle.remove()
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by zturbo.memory.inject_oom)")

    handle = module.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------------------------
# Executing a plan

CPU = torch.device("cpu")
# Components whose weights live on the CPU between uses, per plan (streamed ones included).
OFFLOADED = {
    "resident": (),
    "te-offload": ("text_encoder",),
    "model-offload": ("text_encoder", "transformer"),
    "block-offload": ("text_encoder", "transformer"),
    "sequential": ("text_encoder", "transformer"),
}


# Plans that stream the text encoder with zturbo.stream.
STREAMED_TE = ("te-offload", "block-offload")
# Plans whose transformer forward runs through diffusers group offloading hooks: not compiled.
STREAMED_PLANS = ("sequential",)


def homes(plan: str, device: torch.device) -> dict[str, torch.device]:
    """Where the loader puts each component's weights for `plan`."""
    return {c: CPU if c in OFFLOADED[plan] else device for c in ("transformer", "text_encoder", "vae")}


def leaner(
    plan: str, resident_blocks: int = 0, resident_layers: int = 0, quantized: bool = False
) -> tuple[str, int, int] | None:
    """The next (plan, resident blocks, resident layers) that holds less on the GPU, or None.
    A quantized transformer has none among the streaming plans, which move plain weights only."""
    if resident_blocks or resident_layers:
        return plan, 0, 0
    following = {"resident": "te-offload", "te-offload": "block-offload", "model-offload": "block-offload"}
    following["block-offload"] = "sequential"
    target = following.get(plan)
    if target is None or (quantized and target in UNQUANTIZED_PLANS):
        return None
    return target, 0, 0


class Placement:
    """Keeps the engine's modules where its plan wants them.

    resident: all on the device. te-offload: the text encoder's layers stream through the device
    (zturbo.stream) and its token embeddings are looked up on the CPU. model-offload: the text
    encoder and transformer take turns on the device (`stage()` moves them). block-offload: as
    te-offload, and the transformer's first blocks stream too, the last `resident_blocks` stay.
    sequential: diffusers' leaf-level group offloading with a prefetching CUDA stream. The VAE
    (0.2 GB) always stays on the device.
    """

    def __init__(
        self,
        components: Any,
        device: torch.device,
        plan: str = "resident",
        resident_blocks: int = 0,
        resident_layers: int = 0,
    ) -> None:
        if plan not in PLANS:
            raise ValueError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
        self.components = components
        self.device = device
        self.plan = "resident"
        self.resident_blocks = 0
        self.resident_layers = 0
        self.streamers: dict[str, Any] = {}
        self._embed_hooks: list[Any] = []
        self.change(plan, resident_blocks, resident_layers)

    @property
    def shared_layers(self) -> int:
        """te-offload: the text-encoder layers that take turns with transformer blocks."""
        arena = self.streamers.get("arena")
        return len(arena.modules["text_encoder"]) if arena else 0

    def describe(self) -> str:
        if self.plan == "block-offload":
            total = sum(1 for _ in transformer_blocks(self.components.transformer))
            return f"block-offload ({self.resident_blocks}/{total} blocks resident)"
        if self.plan == "te-offload" and (self.resident_layers or self.shared_layers):
            total = len(self.components.text_encoder.layers) - UNUSED_TEXT_LAYERS
            arena = self.streamers.get("arena")
            lenders = len(arena.modules["transformer"]) if arena else 0
            shared = f", {self.shared_layers} sharing memory with {lenders} blocks" if arena else ""
            return f"te-offload ({self.resident_layers}/{total} text-encoder layers resident{shared})"
        return self.plan

    def change(self, plan: str, resident_blocks: int = 0, resident_layers: int = 0) -> None:
        """Move to `plan`; plans only get leaner, never back (group offloading is not undone)."""
        c = self.components
        self._stop_streaming()
        if "transformer" in OFFLOADED[plan]:
            unfuse_projections(c.transformer)  # fused tensors would stay behind on the device
        for name in OFFLOADED[plan]:
            torch.nn.Module.to(getattr(c, name), CPU)
        resident_layers = resident_layers if plan in STREAMED_TE else 0
        if plan in STREAMED_TE:
            self._stream_text_encoder(resident_layers, share=plan == "te-offload")
        if plan == "block-offload":
            self._stream_transformer(resident_blocks)
        if plan == "sequential":
            from diffusers.hooks import apply_group_offloading

            for module in (c.transformer, c.text_encoder):
                apply_group_offloading(
                    module,
                    onload_device=self.device,
                    offload_device=CPU,
                    offload_type="leaf_level",
                    use_stream=self.device.type == "cuda",
                )
        self.plan = plan
        self.resident_blocks = resident_blocks if plan == "block-offload" else 0
        self.resident_layers = resident_layers

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Streamed weights back in their modules (on the CPU) for the body, e.g. a dtype cast."""
        if not self.streamers:
            yield
            return
        self._stop_streaming()
        yield
        self.change(self.plan, self.resident_blocks, self.resident_layers)

    def stage(self, name: str) -> None:
        """Before `name` (encode, denoise, decode): under model-offload, only its module on the
        device; under te-offload, the shared memory starts filling for what comes next."""
        arena = self.streamers.get("arena")
        if arena is not None and name in ("decode", "denoise"):
            # After denoising, the shared blocks are done until the next image: the encoder's
            # layers come in during the decode, in case the next prompt is new.
            arena.prefetch("text_encoder" if name == "decode" else "transformer")
        if self.plan != "model-offload":
            return
        c = self.components
        wanted = {"encode": c.text_encoder, "denoise": c.transformer}.get(name)
        for module in (c.text_encoder, c.transformer):
            if module is not wanted:
                torch.nn.Module.to(module, CPU)
        if wanted is not None:
            torch.nn.Module.to(wanted, self.device)

    def _stream_text_encoder(self, resident_layers: int, share: bool = False) -> None:
        from .stream import BlockStreamer

        te = self.components.text_encoder
        _move_all_but(te, ("embed_tokens", "layers"), self.device)  # the small rest: final norm, rotary tables
        embed = te.embed_tokens
        torch.nn.Module.to(embed, CPU)  # 0.8 GB for a lookup of a few hundred rows: done on the CPU
        self._embed_hooks = [
            embed.register_forward_pre_hook(lambda _m, args: tuple(a.to(CPU) for a in args)),
            embed.register_forward_hook(lambda _m, _a, out: out.to(self.device, non_blocking=True)),
        ]
        layers = list(te.layers)
        for layer in layers[-UNUSED_TEXT_LAYERS:]:
            torch.nn.Module.to(layer, CPU)  # never runs: stays where no copy reaches it
        layers = layers[:-UNUSED_TEXT_LAYERS]
        chosen = set(streamed_positions(len(layers), len(layers) - resident_layers))
        for i, layer in enumerate(layers):
            torch.nn.Module.to(layer, CPU if i in chosen else self.device)
        streamed = [x for i, x in enumerate(layers) if i in chosen]
        if share:
            streamed = self._share_transformer_memory(streamed)
        self.streamers["text_encoder"] = BlockStreamer(streamed, self.device)

    def _share_transformer_memory(self, streamed: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """Give the last SHARED_BLOCKS transformer blocks' memory to as many of the `streamed`
        text-encoder layers (the last ones) as fit in it, and return the layers still streamed.

        A new prompt then copies fewer layers while it waits: the shared layers come in during the
        previous image's decode, the blocks return during the first step (zturbo.stream.SharedArena).
        """
        from .stream import SharedArena, packed_size, streamable

        blocks = list(self.components.transformer.layers)[-SHARED_BLOCKS:]
        if not streamed or not blocks or not all(streamable(b) for b in blocks):
            return streamed  # quantized weights cannot be packed as raw bytes
        room = sum(packed_size(b) for b in blocks)
        shared: list[torch.nn.Module] = []
        for layer in reversed(streamed):
            room -= packed_size(layer)
            if room < 0:
                break
            shared.insert(0, layer)
        if not shared:
            return streamed
        unfuse_projections(self.components.transformer, blocks)
        for block in blocks:
            torch.nn.Module.to(block, CPU)  # free their device memory before the arena takes it
        self.streamers["arena"] = SharedArena({"transformer": blocks, "text_encoder": shared}, self.device)
        return [layer for layer in streamed if all(layer is not x for x in shared)]

    def _stream_transformer(self, resident_blocks: int) -> None:
        from .stream import BlockStreamer

        transformer = self.components.transformer
        blocks = list(transformer_blocks(transformer))
        if not 0 <= resident_blocks < len(blocks):
            raise ValueError(f"resident_blocks {resident_blocks} is not in 0..{len(blocks) - 1}")
        _move_all_but(transformer, BLOCK_LISTS, self.device)  # embedders, final layer, pad tokens
        chosen = set(streamed_positions(len(blocks), len(blocks) - resident_blocks))
        # Already unfused: change() unfuses the whole transformer for every plan that offloads it.
        streamed = [b for i, b in enumerate(blocks) if i in chosen]
        for i, block in enumerate(blocks):
            torch.nn.Module.to(block, CPU if i in chosen else self.device)
        self.streamers["transformer"] = BlockStreamer(streamed, self.device)

    def _stop_streaming(self) -> None:
        for streamer in self.streamers.values():
            streamer.remove()
        self.streamers.clear()
        for hook in self._embed_hooks:
            hook.remove()
        self._embed_hooks = []


def compilable(plan: str) -> bool:
    """Whether the engine compiles under `plan`: diffusers' group offloading (sequential) wraps the
    blocks' forwards itself, and compiling them too is not supported."""
    return plan not in STREAMED_PLANS


def fusable(plan: str) -> bool:
    """Whether `plan` may fuse projections: only where no block's weights move. A fused tensor is
    a new device copy (a plain attribute) that streamed or shared blocks' views and `Module.to`
    would not reach. Fusing the resident blocks of a streamed plan after placement was measured
    (session 9): ~40 ms less at 8 GiB, but 1.1 GiB of the 16 GiB cap left reserved and unusable
    around the freed projections, so the decode ran out of memory."""
    return plan == "resident"


def streamed_positions(total: int, streamed: int) -> list[int]:
    """Which of `total` blocks (in execution order) stream: `streamed` of them, evenly spread.

    Spread, because the copy engine then keeps working while the resident blocks in between
    compute; with the resident blocks bunched at the end, only two copies (the two slots) can
    overlap them and the link idles for the rest (docs/performance.md has both measured).
    """
    return [(2 * i + 1) * total // (2 * streamed) for i in range(streamed)] if streamed else []


def _move_all_but(module: torch.nn.Module, skip: tuple[str, ...], device: torch.device) -> None:
    """Move `module`'s own tensors and its children but those named in `skip` (left where they are)."""
    for name, child in module.named_children():
        if name not in skip:
            torch.nn.Module.to(child, device)
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)
