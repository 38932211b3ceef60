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

from dataclasses import dataclass
from typing import Any

import torch

from .config import MEMORY_CHOICES

GIB = 2**30
# Fastest first. resident: everything on the GPU. te-offload: the text encoder runs on the CPU
# (repeated prompts hit the prompt cache). model-offload: one component on the GPU at a time.
# block-offload: transformer and text-encoder blocks streamed in, two at a time. sequential:
# one linear layer at a time.
PLANS = MEMORY_CHOICES[1:]
# Bytes per weight of the transformer's block linears when quantized (scales are per row: small).
QUANTIZED_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}
# Live full-resolution decoder tensors of `block_out_channels[0]` channels at the VAE's peak
# (eager bf16): 2.6 GiB above the weights at 1024² on an H100, 9.7 GiB at 2048².
VAE_LIVE_TENSORS = 10
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
    transformer_largest_linear: int
    text_encoder_params: int
    text_encoder_layers_params: int  # all decoder layers together
    text_encoder_layer_params: int
    text_encoder_layers: int
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

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def label(self) -> str:
        extras = [q for q in (self.quantize,) if q != "none"] + (["vae-tiling"] if self.vae_tiling else [])
        return self.plan + "".join(f" + {e}" for e in extras)


@dataclass(frozen=True)
class Choice:
    chosen: Estimate | None  # None: nothing fits
    budget: int
    considered: list[Estimate]


def model_shape(transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> ModelShape:
    """Counts from modules (real or on the meta device)."""
    from .accel import is_block_linear, transformer_blocks

    blocks = list(transformer_blocks(transformer))
    linears = [m for n, m in transformer.named_modules() if is_block_linear(m, n)]  # what quantization shrinks
    layers = list(text_encoder.layers)
    tc = transformer.config
    return ModelShape(
        transformer_params=_count(transformer),
        transformer_blocks_params=sum(_count(b) for b in blocks),
        transformer_block_params=max(_count(b) for b in blocks),
        transformer_linear_params=sum(m.weight.numel() for m in linears),
        transformer_largest_linear=max(m.weight.numel() for m in linears),
        text_encoder_params=_count(text_encoder),
        text_encoder_layers_params=sum(_count(layer) for layer in layers),
        text_encoder_layer_params=max(_count(layer) for layer in layers),
        text_encoder_layers=len(layers),
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

    from .loader import _empty, _text_encoder_class

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
) -> Estimate:
    """Peak bytes per stage; `dtype_bytes` is bytes per element for transformer/text_encoder/vae."""
    if plan not in PLANS:
        raise ValueError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
    t_e, te_e, v_e = dtype_bytes["transformer"], dtype_bytes["text_encoder"], dtype_bytes["vae"]
    transformer = _transformer_bytes(shape, t_e, quantize)
    text_encoder = shape.text_encoder_params * te_e
    vae = shape.vae_params * v_e
    # What each stage holds of each component's weights under the plan.
    streamed_t = _streamed(shape.transformer_params - shape.transformer_blocks_params, shape, plan) * t_e
    te_outside = shape.text_encoder_params - shape.text_encoder_layers_params  # token embeddings, final norm
    streamed_te = (te_outside + 2 * shape.text_encoder_layer_params) * te_e
    held = {
        "resident": (transformer + text_encoder + vae,) * 3,
        "te-offload": (transformer + vae,) * 3,
        "model-offload": (text_encoder, transformer, vae),
        "block-offload": (streamed_te, streamed_t, vae),
        "sequential": (streamed_te, streamed_t, vae),
    }[plan]
    encode_act = 0 if plan == "te-offload" else _text_activation(shape, te_e, batch * (2 if cfg else 1), prompt_tokens)
    stages = {
        "encode": held[0] + encode_act,
        "denoise": held[1] + _transformer_activation(shape, t_e, width, height, batch, cfg, prompt_tokens),
        "decode": held[2] + vae_activation(shape, v_e, width, height, batch, vae_tiling),
    }
    return Estimate(plan, quantize, vae_tiling, stages)


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
) -> Choice:
    """The fastest plan whose estimate fits `budget` less a margin (5 %, at least 0.5 GiB).

    Order: each plan without then with VAE tiling, fastest plan first; exact (unquantized) plans
    before any quantized one, which is tried only when no exact plan fits. `exact=False` skips
    the exact plans (the user asked for a quantization).
    """
    usable = budget - max(int(budget * margin), GIB // 2)
    considered = []
    for quantize in (("none",) if exact else ()) + quantize_options:
        for plan in PLANS:
            for tiling in (False, True):
                est = estimate(
                    shape,
                    dtype_bytes,
                    plan=plan,
                    width=width,
                    height=height,
                    batch=batch,
                    cfg=cfg,
                    quantize=quantize,
                    vae_tiling=tiling,
                )
                considered.append(est)
                if est.peak <= usable:
                    return Choice(est, budget, considered)
    return Choice(None, budget, considered)


# ---------------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _transformer_bytes(shape: ModelShape, elem: int, quantize: str) -> int:
    if quantize == "none":
        return shape.transformer_params * elem
    rest = shape.transformer_params - shape.transformer_linear_params
    return int(rest * elem + shape.transformer_linear_params * QUANTIZED_BYTES[quantize])


def _streamed(outside: int, shape: ModelShape, plan: str) -> int:
    """Transformer parameters on the GPU while streaming: all outside the blocks, plus two units
    (the one computing and the one being prefetched): blocks, or single linears when sequential."""
    unit = shape.transformer_block_params if plan == "block-offload" else shape.transformer_largest_linear
    return outside + 2 * unit


def _text_activation(shape: ModelShape, elem: int, batch: int, tokens: int) -> int:
    # All hidden states are returned (hidden_states[-2] is used), plus one MLP's intermediates.
    states = (shape.text_encoder_layers + 1) * batch * tokens * shape.text_dim * elem
    mlp = 3 * batch * tokens * 4 * shape.text_dim * elem
    return states + mlp


def _transformer_activation(
    shape: ModelShape, elem: int, width: int, height: int, batch: int, cfg: bool, prompt_tokens: int
) -> int:
    tokens = (width // shape.spatial_unit) * (height // shape.spatial_unit) + -(-prompt_tokens // 32) * 32
    rows = batch * (2 if cfg else 1) * tokens
    ffn = 3 * shape.ffn_dim * elem
    attention = 3 * shape.dim * elem + 2 * shape.dim * 4
    return rows * (max(ffn, attention) + RESIDUAL_COPIES * shape.dim * elem)


def set_vae_tiling(vae: torch.nn.Module, on: bool, tile: int = VAE_TILE) -> None:
    """diffusers' tiled decode with `tile`-pixel tiles (25 % overlap, blended), one image at a time.

    Above one tile the decoder then holds one tile's activations instead of the whole image's.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    vae.use_tiling = on
    vae.use_slicing = on


def vae_activation(shape: ModelShape, elem: int, width: int, height: int, batch: int, tiling: bool) -> int:
    """Bytes the decode stage needs above the VAE's weights."""
    image = batch * 3 * width * height * 4  # the float32 image the decode returns
    pixels = min(width * height, VAE_TILE * VAE_TILE) if tiling else width * height
    per_image = VAE_LIVE_TENSORS * pixels * shape.vae_channels * elem
    return image + (per_image if tiling else batch * per_image)


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
# Components whose weights live on the CPU between uses, per plan.
OFFLOADED = {
    "resident": (),
    "te-offload": ("text_encoder",),
    "model-offload": ("text_encoder", "transformer"),
    "block-offload": ("text_encoder", "transformer"),
    "sequential": ("text_encoder", "transformer"),
}


# Plans that stream weights through diffusers group offloading (hooks on the blocks' forwards).
STREAMED_PLANS = ("block-offload", "sequential")


def homes(plan: str, device: torch.device) -> dict[str, torch.device]:
    """Where the loader puts each component's weights for `plan`."""
    return {c: CPU if c in OFFLOADED[plan] else device for c in ("transformer", "text_encoder", "vae")}


def leaner(plan: str) -> str | None:
    """The next plan that holds less on the GPU, or None after the last."""
    i = PLANS.index(plan)
    return PLANS[i + 1] if i + 1 < len(PLANS) else None


class Placement:
    """Keeps the engine's modules where its plan wants them.

    resident: all on the device. te-offload: the text encoder stays on the CPU and computes there.
    model-offload: the text encoder and transformer take turns on the device (`stage()` moves them).
    block-offload / sequential: diffusers group offloading of the transformer and text encoder,
    block by block or layer by layer, with a CUDA stream prefetching the next group. The VAE
    (0.2 GB) always stays on the device.
    """

    def __init__(self, components: Any, device: torch.device, plan: str = "resident") -> None:
        if plan not in PLANS:
            raise ValueError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
        self.components = components
        self.device = device
        self.plan = "resident"
        self.change(plan)

    @property
    def text_encoder_device(self) -> torch.device:
        """Where the text encoder's inputs go (group offloading computes on the device)."""
        return CPU if self.plan == "te-offload" else self.device

    def change(self, plan: str) -> None:
        """Move to `plan`; plans only get leaner, never back (group offloading is not undone)."""
        c = self.components
        for name in OFFLOADED[plan]:
            torch.nn.Module.to(getattr(c, name), CPU)
        if plan in ("block-offload", "sequential"):
            from diffusers.hooks import apply_group_offloading

            block = plan == "block-offload"
            for module in (c.transformer, c.text_encoder):
                apply_group_offloading(
                    module,
                    onload_device=self.device,
                    offload_device=CPU,
                    offload_type="block_level" if block else "leaf_level",
                    num_blocks_per_group=1 if block else None,
                    use_stream=self.device.type == "cuda",
                )
        self.plan = plan

    def stage(self, name: str) -> None:
        """Before `name` (encode, denoise, decode): under model-offload, only its module on the device."""
        if self.plan != "model-offload":
            return
        c = self.components
        wanted = {"encode": c.text_encoder, "denoise": c.transformer}.get(name)
        for module in (c.text_encoder, c.transformer):
            if module is not wanted:
                torch.nn.Module.to(module, CPU)
        if wanted is not None:
            torch.nn.Module.to(wanted, self.device)
