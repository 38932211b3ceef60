"""The generation stages: encode_prompt -> prepare_latents -> schedule -> denoise -> decode.

Plain typed functions of modules, tensors and values; `engine.Engine` owns the modules and runs
them. Special cases arrive as data (seed variety's early embeddings, an input image's start and
inpaint blend, the ControlNet's per-step input) or as the callable a step makes
(`denoise(step=...)`, a CUDA-graph replay), not as flags inside the loop.

Semantics follow diffusers 0.42.1's ZImagePipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline,
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline exactly (parity is tested), with
deliberate differences that do not change float32 results: the text encoder pads to the longest
prompt instead of 512 tokens (causal attention makes the real tokens' states identical), and
latent scaling, noise, image latents and pixel conversion run in float32 rather than in the VAE's
or text encoder's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .profiles import PLAIN_CFG, CfgOptions

if TYPE_CHECKING:
    from .accel.graphs import EncoderGraphs
    from .loader import Components

MAX_TOKENS = 512  # the text encoder's context for a caption
CAPTION_MULTIPLE = 32  # the transformer pads each caption to a multiple of this many tokens
StepCallback = Callable[[int, int], None]
# After step i of n: (i, n, the denoised estimate (B, C, h, w) float32 on the device); the
# estimate is a new tensor, so a caller may keep it.
LatentCallback = Callable[[int, int, torch.Tensor], None]
# A ControlNet's input at one step: the control context per transformer batch row, (C, 1, h, w) in
# the transformer's dtype (under CFG the rows repeat for the negative half), and the conditioning
# scale as a 0-dim float32 tensor on the device (a tensor, so a captured step graph reads it anew).
StepControl = tuple[list[torch.Tensor], torch.Tensor]
# One denoising step's prediction: (latents per row, model timesteps, caption embeddings, the
# ControlNet's input or None) -> predictions per row. `transformer_step` is the plain one;
# `accel.graphs.StepGraphs.bind` gives one that replays CUDA graphs.
Step = Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor], StepControl | None], list[torch.Tensor]]


def encode_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    device: torch.device,
    max_tokens: int = MAX_TOKENS,
    graphs: EncoderGraphs | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Qwen chat template (thinking enabled), hidden_states[-2] of the real tokens -> [(L_i, D)].

    Returns the embeddings and, per prompt, its token count with the chat template: past
    `max_tokens` (`caption_limit` gives a model's) the rest is dropped, as diffusers does
    (`truncation_warning` says so). With `graphs`, the encoder replays a CUDA graph where one
    applies (`accel.graphs`).
    """
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    counts = [len(ids) for ids in tokenizer(texts).input_ids]
    enc = tokenizer(texts, padding="longest", max_length=max_tokens, truncation=True, return_tensors="pt")
    mask = enc.attention_mask.bool()  # (B, L) on the CPU: slicing with it needs no device sync
    with without_last_layer(text_encoder):
        pad_id = tokenizer.pad_token_id or 0
        graphed = graphs.encode(text_encoder, enc.input_ids, mask, pad_id, max_tokens) if graphs is not None else None
        if graphed is not None:
            hidden, mask = graphed
        else:
            hidden = text_encoder(
                input_ids=enc.input_ids.to(device),
                attention_mask=mask.to(device),
                use_cache=False,  # one forward pass: a key/value cache would only be filled and dropped
            ).last_hidden_state  # (B, L, D): hidden_states[-2] of the whole encoder
    return [_select_real(hidden[i], mask[i]) for i in range(len(texts))], counts


def truncation_warning(field: str, prompt: str, tokens: int, max_tokens: int) -> str | None:
    """What a prompt (`field`: prompt or negative prompt) of `tokens` tokens loses past `max_tokens`, or None."""
    if tokens <= max_tokens:
        return None
    short = prompt if len(prompt) <= 40 else prompt[:40] + "…"
    return (
        f"{field} {short!r} is {tokens} tokens with the chat template; the model takes {max_tokens}, "
        f"so the last {tokens - max_tokens} tokens are dropped"
    )


def caption_limit(transformer_config: Any, max_tokens: int = MAX_TOKENS) -> int:
    """The most caption tokens the transformer's rotary position table allows, at most `max_tokens`.

    The transformer pads a caption to a multiple of CAPTION_MULTIPLE tokens, P, which take the
    positions 1..P on the first rotary axis; the image tokens follow at position P + 1. That
    position must index the table of `axes_lens[0]` entries, so P <= axes_lens[0] - 2.
    """
    table = int(transformer_config.axes_lens[0])
    fits = (table - 2) // CAPTION_MULTIPLE * CAPTION_MULTIPLE
    if fits < CAPTION_MULTIPLE:
        least = CAPTION_MULTIPLE + 2
        raise CheckpointError(
            f"transformer axes_lens[0] {table} leaves no room for a caption; it must be at least {least}"
        )
    return min(max_tokens, fits)


@contextlib.contextmanager
def without_last_layer(text_encoder: torch.nn.Module) -> Iterator[None]:
    """Run the encoder's layers but the last, with no final norm.

    The embeddings are hidden_states[-2], the input of the last layer, so that layer and the norm
    after it are wasted work (and, when the encoder streams, a wasted 0.2 GB copy). Qwen3's forward
    runs `layers[:config.num_hidden_layers]` and then `norm`, so both are switched off for this
    call and restored after it, and `last_hidden_state` is that input.
    """
    config, norm = text_encoder.config, text_encoder.norm
    layers = config.num_hidden_layers
    config.num_hidden_layers = layers - 1
    text_encoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        config.num_hidden_layers = layers
        text_encoder.norm = norm


def _select_real(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = mask.nonzero().squeeze(1)
    start, n = int(positions[0]), len(positions)
    if int(positions[-1]) == start + n - 1:  # contiguous, as with either padding side
        return states[start : start + n]
    return states.index_select(0, positions.to(states.device))


class PromptCache:
    """Recently used prompt embeddings on the device, so a repeated prompt skips the text encoder.

    Keyed by the prompt and the text encoder's dtype (a precision fallback must not reuse them).
    Each entry is small (tokens x 2560 values), so the default 64 entries hold a few tens of MB.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, torch.dtype], tuple[torch.Tensor, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(
        self,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        device: torch.device,
        *,
        on_miss: Callable[[], None] | None = None,
        graphs: EncoderGraphs | None = None,
        max_tokens: int = MAX_TOKENS,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Embeddings on `device` for `prompts` (the text encoder runs once for all misses, after
        `on_miss()`, through `graphs` where given) and their token counts (`encode_prompt`)."""
        dtype = next(text_encoder.parameters()).dtype
        missing = [p for p in dict.fromkeys(prompts) if (p, dtype) not in self._items]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            if on_miss is not None:
                on_miss()
            embeds, counts = encode_prompt(text_encoder, tokenizer, missing, device, max_tokens, graphs)
            for prompt, embed, count in zip(missing, embeds, counts, strict=True):
                # clone (or copy to the device): drop the padded batch the embedding was a view of
                self._items[(prompt, dtype)] = (embed.to(device, copy=True), count)
        found = []
        for prompt in prompts:
            self._items.move_to_end((prompt, dtype))
            found.append(self._items[(prompt, dtype)])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return [e for e, _ in found], [count for _, count in found]

    def clear(self) -> None:
        self._items.clear()


def prepare_latents(seeds: Sequence[int], channels: int, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) float32 noise on the CPU, image i from its own generator seeded with seeds[i].

    CPU generators make a seed give the same noise on every device, and make image i of a batch
    identical to generating seeds[i] alone.
    """
    return draw_noise(seeds, (channels, height, width))[0]


def draw_noise(seeds: Sequence[int], shape: tuple[int, int, int], draws: int = 1) -> list[torch.Tensor]:
    """`draws` float32 tensors (B, *shape) on the CPU: image i's come one after the other from one
    generator seeded with seeds[i].

    An input image takes two draws, as diffusers' image pipelines use their generator: first the
    sample of the image's latent distribution (`sample_latents`), then the noise.
    """
    out = [torch.empty((len(seeds), *shape), dtype=torch.float32) for _ in range(draws)]
    for i, seed in enumerate(seeds):  # drawn into place: no concatenation copy
        generator = torch.Generator("cpu").manual_seed(seed)
        for tensor in out:
            torch.randn((1, *shape), generator=generator, out=tensor[i : i + 1])
    return out


@dataclass(frozen=True)
class LatentDist:
    """The VAE encoder's diagonal Gaussian over images' latents, float32, and the VAE's latent
    shift and scale (the inverse of `decode`'s)."""

    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor  # (B, C, h, w)
    shift: float
    scale: float


def encode_image(vae: torch.nn.Module, pixels: torch.Tensor) -> LatentDist:
    """float32 images (B, 3, H, W) in [-1, 1] on the VAE's device -> their latent distribution.

    One image at a time, as `decode` does (a batch would hold every image's activations at once).
    """
    dists = [vae.encode(one.to(vae.dtype), return_dict=False)[0] for one in pixels.split(1)]
    mean = torch.cat([d.mean.float() for d in dists])
    std = torch.cat([d.std.float() for d in dists])
    return LatentDist(mean, std, float(vae.config.shift_factor), float(vae.config.scaling_factor))


def sample_latents(dist: LatentDist, eps: torch.Tensor) -> torch.Tensor:
    """Scaled latents of a sample of `dist` (diffusers' `latent_dist.sample(generator)`, then
    `(x - shift) * scale`); eps: (B, C, h, w) standard normal, one image's dist broadcasts."""
    return ((dist.mean + dist.std * eps) - dist.shift) * dist.scale


def mode_latents(dist: LatentDist) -> torch.Tensor:
    """Scaled latents of the distribution's mode (diffusers' `sample_mode="argmax"`): what a
    control image and ControlNet inpaint's masked image become."""
    return (dist.mean - dist.shift) * dist.scale


class LatentCache:
    """Recently encoded input images on the device, so a repeated image skips the VAE encoder.

    The caller's key names everything its pixels came from (image hashes, size, resize, ...);
    the VAE's dtype is added (a precision fallback must not reuse them). An entry is two
    (1, 16, H/8, W/8) float32 tensors: 2 MB at 1024².
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[Hashable, torch.dtype], LatentDist] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, vae: torch.nn.Module, key: Hashable) -> LatentDist | None:
        found = self._items.get((key, vae.dtype))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end((key, vae.dtype))
        return found

    def put(self, vae: torch.nn.Module, key: Hashable, dist: LatentDist) -> None:
        self._items[(key, vae.dtype)] = dist
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def noised(image_latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow matching's forward process to `sigma` (diffusers' `scale_noise`)."""
    return sigma * noise + (1.0 - sigma) * image_latents


@dataclass(frozen=True)
class Keep:
    """Inpainting as data: after every step the latents outside the mask go back to the input
    image's, noised to the next step's sigma (the clean image after the last step, whose sigma is
    0), as diffusers' ZImageInpaintPipeline blends."""

    mask: torch.Tensor  # (1 or B, 1, h, w) float32 on the device: 1 repaints, 0 keeps
    image: torch.Tensor  # (B, C, h, w) float32: the image's sampled latents (`sample_latents`)
    noise: torch.Tensor  # (B, C, h, w) float32: the noise the start was made with

    def blend(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1 - self.mask) * noised(self.image, self.noise, sigma) + self.mask * latents


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at the latents' size (h, w), nearest as diffusers samples it."""
    return F.interpolate(mask, size=(height, width), mode="nearest")


def control_context(
    control: torch.Tensor, in_dim: int, inpaint: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """The ControlNet's input for one control image, (in_dim, 1, h, w).

    control: the control image's `mode_latents` (1, C, h, w). With `inpaint` = (pixel mask
    (1, 1, H, W), 1 repaints; `mode_latents` of the image with the repainted area zeroed), the
    channels are [control, the kept area at latent size, masked image] as diffusers'
    ZImageControlNetInpaintPipeline makes them; without, zeros fill the channels the ControlNet
    has beyond the control latents, as its ZImageControlNetPipeline does.
    """
    if inpaint is not None:
        mask, masked = inpaint
        kept = latent_mask(1 - mask, *control.shape[-2:]).to(control.dtype)
        context = torch.cat([control, kept, masked], dim=1)
    else:
        pad = control.new_zeros((1, in_dim - control.shape[1], *control.shape[2:]))
        context = torch.cat([control, pad], dim=1)
    if context.shape[1] != in_dim:
        raise ValueError(f"a control context of {context.shape[1]} channels for a ControlNet that takes {in_dim}")
    return context.unsqueeze(2)[0]


@dataclass(frozen=True)
class Schedule:
    """Everything the step loop needs, computed before it starts (no per-step host work)."""

    model_t: torch.Tensor  # (N,) float32: the transformer's timestep input, (1000 - t) / 1000
    dts: tuple[float, ...]  # (N,) sigma_{i+1} - sigma_i, as float32 values
    sigmas: tuple[float, ...]  # (N + 1,) including the terminal 0

    def tail(self, first: int) -> Schedule:
        """The steps from `first` on: an input image noised to sigmas[first] starts there
        (diffusers' `get_timesteps`, `inputs.spec.img2img_first_step`)."""
        return Schedule(self.model_t[first:], self.dts[first:], self.sigmas[first:])


def schedule(scheduler_config: dict[str, Any], steps: int, image_seq_len: int) -> Schedule:
    """Sigmas linspace(1, 1/N, N) through FlowMatchEulerDiscreteScheduler (shift from its config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
    kwargs: dict[str, float] = {}
    if scheduler.config.use_dynamic_shifting:
        kwargs["mu"] = _dynamic_shift_mu(scheduler.config, image_seq_len)
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    timesteps = scheduler.timesteps.to(torch.float32)
    all_sigmas = scheduler.sigmas.to(torch.float32)
    return Schedule(
        model_t=(1000 - timesteps) / 1000,
        dts=tuple((all_sigmas[1:] - all_sigmas[:-1]).tolist()),
        sigmas=tuple(all_sigmas.tolist()),
    )


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each image's noise, a (t = 0) to b (t = 1); a, b: (B, ...) float32.

    The angle is taken over each image's whole noise vector. t = 0 and t = 1 return a and b
    themselves, so the ends are exact (variation strength 0 is the plain image, bit for bit).
    """
    if t == 0:
        return a
    if t == 1:
        return b
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    omega = cos.clamp(-1, 1).acos()  # (B,)
    sin = omega.sin()
    # Nearly parallel vectors: the formula divides by ~0; a straight line is as good there.
    near = sin.abs() < 1e-6
    wa = torch.where(near, 1 - t, ((1 - t) * omega).sin() / sin.where(~near, 1))
    wb = torch.where(near, t, (t * omega).sin() / sin.where(~near, 1))
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


def variation_latents(noise: torch.Tensor, variation_seeds: Sequence[int | None], strength: float) -> torch.Tensor:
    """A1111 variation seeds: slerp(strength, noise of the seed, noise of the variation seed), per image."""
    if strength == 0:
        return noise  # the unchanged tensor: strength 0 is the plain image exactly
    seeds = [s for s in variation_seeds if s is not None]
    assert len(seeds) == noise.shape[0], "every image needs a variation seed when the strength is above 0"
    return slerp(strength, noise, prepare_latents(seeds, *noise.shape[1:]))


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for a second random stream of one image, independent of its latent noise stream."""
    digest = hashlib.sha256(f"zturbo/{purpose}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch generator takes it


def variety_embeds(embeds: Sequence[torch.Tensor], seeds: Sequence[int], strength: float) -> list[torch.Tensor]:
    """Seed variety: e + strength * std(e) * n, per image, on the clean prompt embedding e (L, D).

    n ~ N(0, 1) of e's shape comes from a CPU generator seeded with `derived_seed(seed, "variety")`,
    so it is the same on every device; std(e) is the embedding's own standard deviation, so a
    strength means the same for every prompt. The sum runs in float32, then takes e's dtype.
    """
    out = []
    for embed, seed in zip(embeds, seeds, strict=True):
        gen = torch.Generator("cpu").manual_seed(derived_seed(seed, "variety"))
        noise = torch.randn(embed.shape, generator=gen, dtype=torch.float32).to(embed.device)
        clean = embed.float()
        out.append((clean + strength * clean.std() * noise).to(embed.dtype))
    return out


def variety_steps(fraction: float, steps: int) -> int:
    """How many of the first steps see the noisy embedding: ceil(fraction * steps), at least 1."""
    return max(1, math.ceil(fraction * steps - 1e-9))  # 1e-9: 0.3 * 10 is 3.0000000000000004


def starting_point(
    c: Components, seeds: Sequence[int], width: int, height: int, steps: int, spatial_unit: int
) -> tuple[torch.Tensor, Schedule]:
    """The CPU noise (B, C, h, w) and the schedule for one request's size and steps."""
    shape = latent_shape(c, width, height, spatial_unit)
    return prepare_latents(seeds, *shape), request_schedule(c, shape, steps, spatial_unit)


def latent_shape(c: Components, width: int, height: int, spatial_unit: int) -> tuple[int, int, int]:
    """(C, h, w) of one image's latents."""
    patch = spatial_unit // _vae_factor(c.vae)
    return c.transformer.config.in_channels, height // spatial_unit * patch, width // spatial_unit * patch


def request_schedule(c: Components, shape: tuple[int, int, int], steps: int, spatial_unit: int) -> Schedule:
    """The full schedule of `steps` for latents of `shape` (the sequence length sets the shift)."""
    patch = spatial_unit // _vae_factor(c.vae)
    return schedule(c.scheduler_config, steps, (shape[1] // patch) * (shape[2] // patch))


def _dynamic_shift_mu(config: Any, image_seq_len: int) -> float:
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


def transformer_step(
    transformer: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    x: list[torch.Tensor],
    t: torch.Tensor,
    embeds: list[torch.Tensor],
    control: StepControl | None,
) -> list[torch.Tensor]:
    """One step's prediction, as diffusers' pipelines call the models: with a control input, the
    ControlNet's block samples (scaled) are added to the transformer's layers."""
    if control is None:
        return transformer(x, t, embeds, return_dict=False)[0]
    assert controlnet is not None, "a control input needs a ControlNet"
    context, scale = control
    with pads_by_position(controlnet):
        samples = controlnet(x, t, embeds, context, conditioning_scale=scale)
    return transformer(x, t, embeds, controlnet_block_samples=samples, return_dict=False)[0]


def in_passes(step: Step, rows: int) -> Step:
    """`step` run on at most `rows` batch rows at a time, the predictions joined in order: with
    `rows` the images of a request, a CFG step's positive and negative halves run one after the
    other, where the doubled batch's activations would not fit (diffusers always batches them).
    Each row's prediction depends on that row alone, so the images are the batched ones."""

    def run(
        x: list[torch.Tensor], t: torch.Tensor, embeds: list[torch.Tensor], control: StepControl | None
    ) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(x), rows):
            part = slice(start, start + rows)
            half = None if control is None else (control[0][part], control[1])
            pred = step(x[part], t[part], embeds[part], half)
            # A replayed step graph returns its static outputs, which the next pass may overwrite
            # (both halves replay one graph where their shapes agree): keep a copy (latent-sized).
            out += [p.clone() for p in pred] if start + rows < len(x) else pred
        return out

    return run


@contextlib.contextmanager
def pads_by_position(controlnet: torch.nn.Module) -> Iterator[None]:
    """While inside, the ControlNet's pad masks come as the padded tokens' positions.

    diffusers' ControlNet writes its pad tokens with a boolean index (`x[torch.cat(masks)] = pad`),
    which syncs with the host to count the True entries: a CUDA graph cannot capture that step, and
    eager steps stall on it. Indexed by positions instead, the same write syncs with nothing. The
    positions follow from shapes alone, since each item is padded at its end.
    """
    patchify = controlnet.patchify_and_embed

    def by_position(images: list[torch.Tensor], captions: list[torch.Tensor], p: int, pf: int) -> tuple[Any, ...]:
        *out, image_masks, caption_masks = patchify(images, captions, p, pf)
        image_tokens = [(i.shape[1] // pf) * (i.shape[2] // p) * (i.shape[3] // p) for i in images]
        return (
            *out,
            pad_positions(image_masks, image_tokens),
            pad_positions(caption_masks, [len(c) for c in captions]),
        )

    controlnet.patchify_and_embed = by_position
    try:
        yield
    finally:
        del controlnet.patchify_and_embed  # the class's method again


def pad_positions(masks: Sequence[torch.Tensor], real: Sequence[int]) -> list[torch.Tensor]:
    """Per item, the positions of its pad mask's True entries in all the items concatenated: the
    `masks[i]` entries after its first `real[i]` (diffusers pads each item at its end)."""
    out, offset = [], 0
    for mask, tokens in zip(masks, real, strict=True):
        out.append(torch.arange(offset + tokens, offset + len(mask), device=mask.device))
        offset += len(mask)
    return out


def patch_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the transformer's patch embedder takes: its weight's, or a GGUF linear's compute
    dtype (its weight holds quantized bytes)."""
    embedder = next(iter(transformer.all_x_embedder.values()))
    return getattr(embedder, "compute_dtype", None) or embedder.weight.dtype


def denoise(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    cond: list[torch.Tensor],
    uncond: list[torch.Tensor] | None,
    sched: Schedule,
    guidance_scale: float,
    on_step: StepCallback | None = None,
    early: tuple[list[torch.Tensor], int] | None = None,
    step: Step | None = None,
    *,
    controlnet: torch.nn.Module | None = None,
    controls: Sequence[StepControl | None] | None = None,
    keep: Keep | None = None,
    on_latents: LatentCallback | None = None,
    cfg: CfgOptions = PLAIN_CFG,
) -> torch.Tensor:
    """Flow-matching Euler over the schedule; latents stay float32. CFG runs when `uncond` is given.

    latents: (B, C, h, w) float32 on the model's device; cond/uncond: B embeddings (L_i, D).
    One `step` call per step (positive and negative batched together under CFG; `in_passes`
    makes a step that runs them one after the other).
    `early` = (cond', k): the first k steps take cond' instead of cond (seed variety).
    `step` makes each step's prediction (default `transformer_step` with `controlnet`;
    `accel.graphs.StepGraphs.bind` gives one that replays CUDA graphs). `controls[i]` is step i's
    ControlNet input (None: the ControlNet does not run then). `keep` blends the input image back
    outside its mask after every step (inpainting). `on_latents` gets, after each step, the clean
    latents the step predicts (the latents with the remaining noise, sigma * prediction, removed):
    what a live preview shows. `cfg`: diffusers' cfg_normalization and cfg_truncation (a step
    past the truncation runs the positive half alone, as diffusers does).
    """
    step = step or functools.partial(transformer_step, transformer, controlnet)
    batch = latents.shape[0]
    dtype = patch_dtype(transformer)
    embeds = cond + uncond if uncond is not None else cond
    early_embeds, early_steps = embeds, 0
    if early is not None:
        early_embeds, early_steps = (early[0] + uncond if uncond is not None else early[0]), early[1]
    model_t = sched.model_t.to(latents.device)
    steps = len(sched.dts)
    controls = controls or [None] * steps
    guided = guided_steps(sched, cfg.truncation) if uncond is not None else [False] * steps
    for i, dt in enumerate(sched.dts):
        step_embeds = early_embeds if i < early_steps else embeds
        x, step_embeds, control = step_inputs(latents.to(dtype), step_embeds, controls[i], guided[i], batch)
        t = model_t[i].expand(x.shape[0])
        out = step(list(x.unsqueeze(2).unbind(0)), t, step_embeds, control)
        pred = torch.stack([o.float() for o in out], dim=0).squeeze(2)  # (B or 2B, C, h, w)
        if guided[i]:
            pred = guide(pred[:batch], pred[batch:], guidance_scale, cfg.normalization)
        # The model predicts the flow towards noise; the Euler step follows its negation.
        latents = latents + dt * -pred
        if keep is not None:
            latents = keep.blend(latents, sched.sigmas[i + 1])
        if on_latents is not None:
            on_latents(i + 1, steps, latents + sched.sigmas[i + 1] * pred)
        if on_step is not None:
            on_step(i + 1, steps)
    return latents


def step_inputs(
    x: torch.Tensor, embeds: list[torch.Tensor], control: StepControl | None, guided: bool, batch: int
) -> tuple[torch.Tensor, list[torch.Tensor], StepControl | None]:
    """One step's latents, embeddings and control input: both halves (positive, then negative) on
    a CFG step; the positive half alone otherwise (no CFG, or a step past the CFG truncation)."""
    if guided:
        return x.repeat(2, 1, 1, 1), embeds, control
    return x, embeds[:batch], None if control is None else (control[0][:batch], control[1])


def guided_steps(sched: Schedule, truncation: float) -> list[bool]:
    """Which steps run CFG: diffusers drops guidance where the normalized time (1000 - t) / 1000,
    the transformer's timestep input, is above `cfg_truncation`."""
    return [t <= truncation for t in sched.model_t.tolist()]


def guide(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
    """diffusers' Z-Image CFG, `pos + scale * (pos - neg)`, with its renormalization: above 0, an
    image whose guided prediction has a norm over `normalization` times its positive one's is
    scaled down to that norm. Batched, and with no host sync (the comparison stays on the device)."""
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        limit = torch.linalg.vector_norm(pos.flatten(1), dim=1) * normalization
        norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
        factor = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        pred = pred * factor.view(-1, *([1] * (pred.dim() - 1)))
    return pred


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """float32 latents (B, C, h, w) -> float32 images (B, 3, H, W) in [-1, 1] (unclamped).

    One image at a time. A batch decoded at once holds every image's activations (four 1024²
    images on an H100: 8.0 GiB above the weights, against 1.3 GiB one by one), and a compiled
    decoder needs another graph for the batch's shape, which ran slower (190 ms against 155 ms).
    """
    z = (latents / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)
    images = [vae.decode(one, return_dict=False)[0].float() for one in z.split(1)]
    return images[0] if len(images) == 1 else torch.cat(images)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """float images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) on the CPU."""
    image = (image * 0.5 + 0.5).clamp(0, 1)
    # Made contiguous on the device: a strided CPU copy makes PIL gather it pixel by pixel
    # (measured 15 ms per 1024² image on the H100 host).
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def _vae_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
