"""Generation: encode_prompt -> prepare_latents -> schedule -> denoise -> decode.

The stage functions are plain and typed; `Engine` owns the loaded components and runs them.
Semantics follow diffusers' ZImagePipeline 0.42.1 exactly (parity is tested), with two
deliberate differences that do not change float32 results: the text encoder pads to the longest
prompt instead of 512 tokens (causal attention makes the real tokens' states identical), and
latent scaling and pixel conversion run in float32 rather than in the VAE's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .accel import compile as accel_
from .accel.graphs import EncoderGraphs, StepGraphs
from .config import RuntimeConfig
from .device import dtype_name, memory_line, probe, resolve_device
from .errors import DeviceError, GPUMemoryError, InvalidRequestError, PrecisionError
from .guard import Fp16Guard, install_fp16_guard
from .loader import Components, ModelSource, fingerprint, load_components, resolve_model
from .memory.plan import GIB, SPEED_ORDER, UNQUANTIZED_PLANS, Placement, compilable, fusable, homes, leaner
from .precision import NonFiniteError, all_finite, choose_precision, safer
from .request import GenerateRequest, ImageSpec, ModelLimits

log = logging.getLogger("zturbo")

MAX_TOKENS = 512
StepCallback = Callable[[int, int], None]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Stages


def encode_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    device: torch.device,
    max_tokens: int = MAX_TOKENS,
    graphs: EncoderGraphs | None = None,
) -> tuple[list[torch.Tensor], list[str | None]]:
    """Qwen chat template (thinking enabled), hidden_states[-2] of the real tokens -> [(L_i, D)].

    Returns the embeddings and, per prompt, a warning if it was truncated to `max_tokens` (else None).
    With `graphs`, the encoder replays a CUDA graph where one applies (`zturbo.graphs`).
    """
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    warnings: list[str | None] = []
    for prompt, ids in zip(prompts, tokenizer(texts).input_ids, strict=True):
        short = prompt if len(prompt) <= 40 else prompt[:40] + "…"
        warnings.append(
            f"prompt {short!r} is {len(ids)} tokens with the chat template; the text encoder takes {max_tokens}, "
            f"so the last {len(ids) - max_tokens} tokens are dropped"
            if len(ids) > max_tokens
            else None
        )
    enc = tokenizer(texts, padding="longest", max_length=max_tokens, truncation=True, return_tensors="pt")
    mask = enc.attention_mask.bool()  # (B, L) on the CPU: slicing with it needs no device sync
    with _without_last_layer(text_encoder):
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
    return [_select_real(hidden[i], mask[i]) for i in range(len(texts))], warnings


@contextlib.contextmanager
def _without_last_layer(text_encoder: torch.nn.Module) -> Iterator[None]:
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
        self._items: OrderedDict[tuple[str, torch.dtype], tuple[torch.Tensor, str | None]] = OrderedDict()
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
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Embeddings on `device` for `prompts` (the text encoder runs once for all misses, after
        `on_miss()`, through `graphs` where given) and their truncation warnings."""
        dtype = next(text_encoder.parameters()).dtype
        missing = [p for p in dict.fromkeys(prompts) if (p, dtype) not in self._items]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            if on_miss is not None:
                on_miss()
            embeds, warnings = encode_prompt(text_encoder, tokenizer, missing, device, graphs=graphs)
            for prompt, embed, warning in zip(missing, embeds, warnings, strict=True):
                # clone (or copy to the device): drop the padded batch the embedding was a view of
                self._items[(prompt, dtype)] = (embed.to(device, copy=True), warning)
        found = []
        for prompt in prompts:
            self._items.move_to_end((prompt, dtype))
            found.append(self._items[(prompt, dtype)])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return [e for e, _ in found], list(dict.fromkeys(w for _, w in found if w))

    def clear(self) -> None:
        self._items.clear()


def prepare_latents(seeds: Sequence[int], channels: int, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) float32 noise on the CPU, image i from its own generator seeded with seeds[i].

    CPU generators make a seed give the same noise on every device, and make image i of a batch
    identical to generating seeds[i] alone.
    """
    noise = torch.empty((len(seeds), channels, height, width), dtype=torch.float32)
    for i, seed in enumerate(seeds):  # drawn into place: no concatenation copy
        generator = torch.Generator("cpu").manual_seed(seed)
        torch.randn((1, channels, height, width), generator=generator, out=noise[i : i + 1])
    return noise


@dataclass(frozen=True)
class Schedule:
    """Everything the step loop needs, computed before it starts (no per-step host work)."""

    model_t: torch.Tensor  # (N,) float32: the transformer's timestep input, (1000 - t) / 1000
    dts: tuple[float, ...]  # (N,) sigma_{i+1} - sigma_i, as float32 values
    sigmas: tuple[float, ...]  # (N + 1,) including the terminal 0


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
    patch = spatial_unit // _vae_factor(c.vae)
    h, w = height // spatial_unit * patch, width // spatial_unit * patch
    latents = prepare_latents(seeds, c.transformer.config.in_channels, h, w)
    return latents, schedule(c.scheduler_config, steps, (h // patch) * (w // patch))


def _dynamic_shift_mu(config: Any, image_seq_len: int) -> float:
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


def denoise(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    cond: list[torch.Tensor],
    uncond: list[torch.Tensor] | None,
    sched: Schedule,
    guidance_scale: float,
    on_step: StepCallback | None = None,
    early: tuple[list[torch.Tensor], int] | None = None,
    forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Flow-matching Euler over the schedule; latents stay float32. CFG runs when `uncond` is given.

    latents: (B, C, h, w) float32 on the model's device; cond/uncond: B embeddings (L_i, D).
    One transformer call per step (positive and negative batched together under CFG).
    `early` = (cond', k): the first k steps take cond' instead of cond (seed variety).
    `forward` makes each step's call in the transformer's place (`StepGraphs.bind`).
    """
    batch = latents.shape[0]
    dtype = next(iter(transformer.all_x_embedder.values())).weight.dtype  # what the patch embedder takes
    embeds = cond + uncond if uncond is not None else cond
    early_embeds, early_steps = embeds, 0
    if early is not None:
        early_embeds, early_steps = (early[0] + uncond if uncond is not None else early[0]), early[1]
    model_t = sched.model_t.to(latents.device)
    steps = len(sched.dts)
    for i, dt in enumerate(sched.dts):
        x = latents.to(dtype)
        if uncond is not None:
            x = x.repeat(2, 1, 1, 1)
        t = model_t[i].expand(x.shape[0])
        step_embeds = early_embeds if i < early_steps else embeds
        out = (forward or transformer)(list(x.unsqueeze(2).unbind(0)), t, step_embeds, return_dict=False)[0]
        pred = torch.stack([o.float() for o in out], dim=0).squeeze(2)  # (B or 2B, C, h, w)
        if uncond is not None:
            pos, neg = pred[:batch], pred[batch:]
            pred = pos + guidance_scale * (pos - neg)
        # The model predicts the flow towards noise; the Euler step follows its negation.
        latents = latents + dt * -pred
        if on_step is not None:
            on_step(i + 1, steps)
    return latents


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


# ---------------------------------------------------------------------------------------------
# Engine


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image with its metadata in .info
    seed: int
    prompt: str
    negative_prompt: str
    metadata: dict[str, Any]
    variation_seed: int | None = None


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    request: GenerateRequest
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fallbacks: list[dict[str, str]] = field(default_factory=list)  # precision escalations, in order

    def save(self, path: str | None = None, *, overwrite: bool = False) -> list[Any]:
        """Write PNGs with metadata; `path` is a .png file (single image) or a directory."""
        from .imageio import save_images

        return save_images(self.images, path, overwrite=overwrite)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded model, for metadata."""

    name: str
    revision: str | None
    fingerprint: str


class Engine:
    """Owns the loaded components; load once, generate many times."""

    def __init__(
        self,
        components: Components,
        model: ModelInfo,
        device: torch.device,
        dtypes: dict[str, torch.dtype],
        limits: ModelLimits,
        accel: accel_.Accel | None = None,
        plan: str = "resident",
        resident_blocks: int = 0,
        resident_layers: int = 0,
    ) -> None:
        self.components = components
        self.model = model
        self.device = device
        self.dtypes = dtypes
        self.limits = limits
        self.accel = accel or accel_.Accel()
        self.prompt_cache = PromptCache()
        self.vae_tiling_setting = "auto"  # auto | on | off (RuntimeConfig.vae_tiling)
        self.vae_tiling = False
        # A dict to record each stage's peak device memory into (bytes; None off CUDA): the memory
        # bench sets it to check the estimator's stages. Recording resets the device's peak counter.
        self.stage_peaks: dict[str, int | None] | None = None
        self.guard: Fp16Guard | None = None
        if dtypes["transformer"] is torch.float16:  # before placement: it rescales weights in place
            self.guard = install_fp16_guard(components.transformer)
        self.placement = Placement(components, device, plan, resident_blocks, resident_layers)

    @classmethod
    def load(
        cls, config: RuntimeConfig | None = None, *, source: ModelSource | None = None, warmup: bool = True
    ) -> Engine:
        """Load, apply compile/quantization from `config`, and (when compiling) warm up at 1024²."""
        config = config or RuntimeConfig.from_env()
        device = resolve_device(config.device)
        caps = probe(device)
        accel_.check_quantize(config.quantize, caps)
        source = source or resolve_model(config.model)
        plan = choose_precision(
            caps,
            dtype=config.dtype,
            overrides=config.component_dtypes(),
            vae_force_upcast=bool(source.config("vae").get("force_upcast", True)),
        )
        accel_.check_quantize(config.quantize, caps, plan.transformer.dtype)
        (memory_plan, blocks, layers), tiling, quantize = _memory_plan(config, caps, device, source, plan.dtypes())
        start = time.perf_counter()
        where = homes(memory_plan, device)
        quantize_on_arrival = quantize != "none" and where["transformer"] != torch.device("cpu")
        if quantize_on_arrival:  # plain weights to the CPU, then block by block to the device, quantized
            where["transformer"] = torch.device("cpu")
        components = load_components(source, device, plan.dtypes(), where)
        if quantize_on_arrival:
            accel_.quantize_transformer(components.transformer, quantize, device=device)
        log.info("loaded %s in %.1f s; %s", source.name, time.perf_counter() - start, memory_line(device))
        model = ModelInfo(source.name, source.revision, fingerprint(source))
        limits = source.limits(config.max_pixels)
        engine = cls(
            components,
            model,
            device,
            plan.dtypes(),
            limits,
            plan=memory_plan,
            resident_blocks=blocks,
            resident_layers=layers,
        )
        engine.vae_tiling_setting = config.vae_tiling
        engine.set_vae_tiling(config.vae_tiling == "on" or (config.vae_tiling == "auto" and tiling))
        compile_ = accel_.resolve_compile(config.compile, device) and compilable(memory_plan)
        engine.accel = accel_.apply(components, compile_=compile_, quantize=quantize, fuse=fusable(memory_plan))
        if compile_ and warmup:
            engine.warmup()
        return engine

    def warmup(self, width: int = accel_.STATIC_DECODE_SIZE, height: int = accel_.STATIC_DECODE_SIZE) -> float:
        """Compile now rather than in the first request; returns the seconds it took.

        The default size is the one whose decoder graph is static (`accel.STATIC_DECODE_SIZE`).

        Two prompt lengths, so that sequence lengths are dynamic in the compiled blocks before a
        user's prompt arrives (the blocks already see three lengths per forward, which on its own
        makes torch.compile go dynamic; the second prompt makes sure of it).
        """
        start = time.perf_counter()
        for prompt in ("warm-up", "a longer warm-up prompt " * 8):
            self.generate(prompt, seed=0, steps=1, width=width, height=height)
        graphs = self._encoder_graphs()
        if graphs is not None:
            with torch.inference_mode(), _without_last_layer(self.components.text_encoder):
                graphs.capture_all(self.components.text_encoder, MAX_TOKENS)
        seconds = time.perf_counter() - start
        log.info("warm-up at %dx%d (torch.compile %s) took %.1f s", width, height, self.accel.compiling, seconds)
        return seconds

    def request(self, prompt: str | Sequence[str], **params: Any) -> GenerateRequest:
        """Validate parameters against this model's limits."""
        return GenerateRequest.create(prompt, limits=self.limits, **params)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str] | GenerateRequest,
        *,
        on_step: StepCallback | None = None,
        **params: Any,
    ) -> GenerateResult:
        """Generate images; `prompt` is text, a list of prompts, or a ready GenerateRequest.

        A non-finite result re-runs the request once per escalation with the component at fault
        in the next safer dtype (float16 -> bfloat16 -> float32); the escalation is recorded in
        the result and the images' metadata, and kept for later requests.
        """
        req = prompt if isinstance(prompt, GenerateRequest) else self.request(prompt, **params)
        fallbacks: list[dict[str, str]] = []
        memory_retried = False
        while True:  # bounded: each pass raises a precision, or takes the one leaner-plan retry, or raises
            oom = None
            try:
                result = self._run(req, on_step, fallbacks)
            except NonFiniteError as e:
                fallbacks.append(self._escalate(e))
                continue
            except torch.OutOfMemoryError as e:
                oom = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
            if oom is not None:  # outside the except block, so the failed run's tensors are freed
                placed = self.placement
                quantized = self.accel.quantize != "none"
                target = leaner(placed.plan, placed.resident_blocks, placed.resident_layers, quantized)
                if memory_retried or target is None:
                    raise self._out_of_memory(req, oom)
                fallbacks.append(self._lean_out(*target, reason=oom))
                memory_retried = True
                continue
            for image in result.images:
                image.metadata["fallbacks"] = fallbacks
            result.fallbacks = fallbacks
            return result

    def runtime(self) -> dict[str, Any]:
        """How the images are computed right now: dtypes, float16 guard, quantization, compilation."""
        return {
            "dtypes": {k: dtype_name(v) for k, v in self.dtypes.items()},
            "fp16_guard": self.guard.describe() if self.guard is not None else None,
            "memory_plan": self.placement.describe(),
            "vae_tiling": self.vae_tiling,
            **self.accel.describe(),
        }

    def _escalate(self, err: NonFiniteError) -> dict[str, str]:
        if err.component == "transformer" and self.accel.quantize != "none":
            # Quantized weights cannot be cast back; the safer model is the unquantized one.
            raise PrecisionError(
                f"the {self.accel.quantize}-quantized transformer produced non-finite values ({err.reason}); "
                "run without --quantize"
            )
        current = self.dtypes[err.component]
        target = safer(current, probe(self.device))
        if target is None:
            raise PrecisionError(
                f"{err.component} produced non-finite values ({err.reason}) even in {dtype_name(current)}; "
                "the weights or inputs are broken"
            )
        record = {
            "component": err.component,
            "from": dtype_name(current),
            "to": dtype_name(target),
            "reason": err.reason,
        }
        log.warning("%s: %s in %s; re-running in %s", err.component, err.reason, record["from"], record["to"])
        with self.placement.paused():  # streamed weights are cast at home, then streamed again
            if err.component == "transformer" and self.guard is not None:
                self.guard.remove()  # the guard is for float16 only; the cast below leaves it
                self.guard = None
            # nn.Module.to, not the diffusers/transformers override that warns about keep-in-fp32 lists.
            torch.nn.Module.to(getattr(self.components, err.component), target)
        self.dtypes = {**self.dtypes, err.component: target}
        return record

    def _run(
        self, req: GenerateRequest, on_step: StepCallback | None, fallbacks: list[dict[str, str]]
    ) -> GenerateResult:
        c = self.components
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        rows = req.images
        placed = self.placement
        where = {"on_miss": lambda: placed.stage("encode"), "graphs": self._encoder_graphs()}
        cache = self.prompt_cache

        def encode(prompts: list[str]) -> tuple[list[torch.Tensor], list[str]]:
            return cache.encode(c.text_encoder, c.tokenizer, prompts, self.device, **where)

        with self._stage("encode"):
            cond, warnings = self._eager_if_compile_fails(encode, [r.prompt for r in rows])
            uncond = None
            if req.do_cfg:
                uncond, _ = self._eager_if_compile_fails(encode, [r.negative_prompt for r in rows])
        for w in warnings:
            log.warning(w)
        seeds = [r.seed for r in rows]
        # The cache holds clean embeddings; each image's variety noise is added to its own copy.
        early = None
        if req.variety > 0:
            early = (variety_embeds(cond, seeds, req.variety), variety_steps(req.variety_until, req.steps))
        timings["encode_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        with self._stage("prepare"):
            latents, sched = starting_point(c, seeds, req.width, req.height, req.steps, self.limits.spatial_unit)
            latents = variation_latents(latents, [r.variation_seed for r in rows], req.variation_strength)
            latents = latents.to(self.device)
            placed.stage("denoise")
        with self._stage("denoise"):
            graphs = self._step_graphs()
            forward = None if graphs is None else graphs.bind(c.transformer, lambda n: self._step_graph_fits(req, n))
            latents = self._eager_if_compile_fails(
                denoise, c.transformer, latents, cond, uncond, sched, req.guidance_scale, on_step, early, forward
            )
        # One check after the loop, none inside it; the embeddings are only looked at on failure.
        with self._stage("check"):
            finite = all_finite(latents)
        if not finite:
            if not all_finite(cond + (uncond or [])):
                raise NonFiniteError("text_encoder", "non-finite prompt embeddings")
            raise NonFiniteError("transformer", "non-finite latents after denoising")
        placed.stage("decode")
        with self._stage("decode"):
            image = self._decode(latents, req, fallbacks)
            while not all_finite(image):  # only the decode is redone: the latents are fine
                fallbacks.append(self._escalate(NonFiniteError("vae", "non-finite image after decoding")))
                image = self._eager_if_compile_fails(decode, c.vae, latents)
        with self._stage("finish"):
            pixels = to_uint8(image)
            timings["denoise_decode_s"] = time.perf_counter() - tick
            return GenerateResult(self._package(req, rows, pixels), req, timings, warnings)

    def _encoder_graphs(self) -> EncoderGraphs | None:
        """The compiled text encoder's CUDA graphs, while its weights stay put: on a CUDA device
        under the resident plan (every other plan moves or streams the encoder's weights)."""
        if self.device.type != "cuda" or self.placement.plan != "resident":
            return None
        return self.accel.encoder_graphs

    def _step_graphs(self) -> StepGraphs | None:
        """The compiled transformer's step graphs, where their memory pool is affordable: on a
        CUDA device under the resident plan (the weights stay put) and no --vram-budget (the
        planner does not count the pool, so a budgeted process runs without it)."""
        if self.device.type != "cuda" or self.placement.plan != "resident" or _budget_fraction(self.device) < 1.0:
            return None
        return self.accel.step_graphs

    def _step_graph_fits(self, req: GenerateRequest, caption_tokens: int) -> bool:
        """Whether the device holds a new step graph's pool and still decodes `req` untiled."""
        from .memory.plan import transformer_activation

        elem = torch.empty((), dtype=self.dtypes["transformer"]).element_size()
        pool = STEP_POOL_FACTOR * transformer_activation(
            self.shape, elem, req.width, req.height, req.num_images, req.do_cfg, caption_tokens
        )
        return pool + self._decode_need(req) <= _free_device_memory(self.device) * 0.9

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """A profiler range `zturbo.<name>` (`zturbo bench --profile` charges GPU idle time to
        stages), and the stage's peak memory when `stage_peaks` is a dict."""
        peaks = self.stage_peaks
        cuda = self.device.type == "cuda"
        with torch.profiler.record_function(f"zturbo.{name}"):
            if peaks is not None and cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                if peaks is not None:
                    peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
                    previous = peaks.get(name)  # a stage can run twice (guidance encodes twice)
                    peaks[name] = peak if previous is None or peak is None else max(previous, peak)

    @functools.cached_property
    def shape(self) -> Any:
        """The model's `memory.ModelShape` (parameter counts and widths), for memory estimates."""
        from .memory.plan import model_shape

        c = self.components
        return model_shape(c.transformer, c.text_encoder, c.vae)

    def set_vae_tiling(self, on: bool) -> None:
        from .memory.plan import set_vae_tiling

        set_vae_tiling(self.components.vae, on)
        self.vae_tiling = on

    def _decode(self, latents: torch.Tensor, req: GenerateRequest, fallbacks: list[dict[str, str]]) -> torch.Tensor:
        """Decode; in auto mode tile when the decode would not fit, or once after running out of memory."""
        vae = self.components.vae
        if self.vae_tiling_setting == "auto" and not self.vae_tiling and not self._decode_fits(req):
            self.set_vae_tiling(True)
            log.info("VAE: tiled decode (%dx%d would not fit in free GPU memory)", req.width, req.height)
        oom = None
        try:
            return self._eager_if_compile_fails(decode, vae, latents)
        except torch.OutOfMemoryError as e:
            if self.vae_tiling or self.vae_tiling_setting == "off":
                raise
            oom = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        _release_cached_memory(self.device)
        record = {"component": "vae", "from": "whole-image decode", "to": "tiled decode", "reason": oom}
        log.warning("VAE: %s while decoding %dx%d; retrying with a tiled decode", oom, req.width, req.height)
        fallbacks.append(record)
        self.set_vae_tiling(True)  # kept for later requests, like a precision fallback
        return self._eager_if_compile_fails(decode, vae, latents)

    def _vae_compiled(self) -> bool:
        decoder = self.components.vae.decoder
        return any(module is decoder for module in self.accel.compiled)

    def _decode_fits(self, req: GenerateRequest) -> bool:
        if self.device.type != "cuda":
            return True
        return self._decode_need(req) <= _free_device_memory(self.device) * 0.9

    def _decode_need(self, req: GenerateRequest) -> int:
        """Bytes an untiled decode of `req` needs above the weights (the planner's estimate)."""
        from .memory.plan import vae_activation

        elem = torch.empty((), dtype=self.dtypes["vae"]).element_size()
        compiled = self._vae_compiled()
        return vae_activation(self.shape, elem, req.width, req.height, req.num_images, tiling=False, compiled=compiled)

    def _lean_out(self, plan: str, resident_blocks: int, resident_layers: int, *, reason: str) -> dict[str, str]:
        """After running out of memory: the next leaner plan, kept for later requests."""
        _release_cached_memory(self.device)
        before = self.placement.describe()
        if plan in ("block-offload", "sequential") and self.accel.compiling:
            self.accel.revert_compile()  # streaming re-points the weights that fusion shares
        # Leaner plans move the encoder's weights, so its graphs can never replay again (plans
        # only get leaner): free their memory now.
        self.accel.encoder_graphs = None
        if self.accel.step_graphs is not None:  # unused off the resident plan: free their pool
            self.accel.step_graphs.clear()
        self.placement.change(plan, resident_blocks, resident_layers)
        record = {"component": "memory", "from": before, "to": self.placement.describe(), "reason": reason}
        log.warning("%s with memory plan %s; retrying with %s", reason, before, record["to"])
        _release_cached_memory(self.device)
        return record

    def _out_of_memory(self, req: GenerateRequest, reason: str) -> GPUMemoryError:
        """Free what the failed run left cached and describe what the request needed."""
        from .memory.plan import dtype_bytes, estimate

        _release_cached_memory(self.device)
        need = estimate(
            self.shape,
            dtype_bytes(self.dtypes),
            plan="resident",
            width=req.width,
            height=req.height,
            batch=req.num_images,
            cfg=req.do_cfg,
            vae_tiling=self.vae_tiling,
            compiled_vae=self._vae_compiled(),
        )
        plan = self.placement.describe()
        quantized = self.accel.quantize != "none"
        following = SPEED_ORDER[SPEED_ORDER.index(self.placement.plan) + 1 :]
        plans = [p for p in following if not (quantized and p in UNQUANTIZED_PLANS)]
        options = ["a smaller size or batch"]
        options += [f"a leaner --memory plan ({', '.join(plans)})"] if plans else []
        options += ["--quantize none, whose block-offload plan streams the weights"] if quantized else []
        options += ["--quantize fp8 (compute capability 8.9+)"] if not quantized else []
        return GPUMemoryError(
            f"{reason} with memory plan {plan}: {req.width}x{req.height}, {req.num_images} image(s) need about "
            f"{need.peak / GIB:.1f} GiB with every component resident, and {_memory_available(self.device)}. "
            f"Options: {', '.join(options)}, or a GPU with more memory"
        )

    def _eager_if_compile_fails(self, stage: Callable[..., T], *args: Any) -> T:
        if not self.accel.compiling:
            return stage(*args)
        try:
            return stage(*args)
        except accel_.compile_errors() as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = " ".join(lines[:2]) or type(e).__name__  # dynamo puts the cause on line 2
            log.warning("torch.compile failed (%s); continuing without compilation", reason[:300])
            self.accel.revert_compile()
            return stage(*args)

    def _package(self, req: GenerateRequest, rows: Sequence[ImageSpec], pixels: torch.Tensor) -> list[GeneratedImage]:
        from PIL import Image

        from .imageio import build_metadata

        out = []
        for spec, array in zip(rows, pixels.numpy(), strict=True):
            meta = build_metadata(
                req, spec.prompt, spec.negative_prompt, spec.seed, self.model, self.runtime(), spec.variation_seed
            )
            image = GeneratedImage(
                Image.fromarray(array), spec.seed, spec.prompt, spec.negative_prompt, meta, spec.variation_seed
            )
            out.append(image)
        return out


def _memory_plan(
    config: RuntimeConfig, caps: Any, device: torch.device, source: ModelSource, dtypes: dict[str, torch.dtype]
) -> tuple[tuple[str, int, int], bool, str]:
    """((plan, resident blocks, resident text-encoder layers), VAE tiling, quantization) to load
    with: `config.memory`, or the fastest that fits. An explicit te-offload or block-offload keeps
    as many layers or blocks resident as the budget allows.

    Quantization is `config.quantize`; with `--quantize none` and `--memory auto`, a quantized
    plan is chosen only when no exact plan fits.
    """
    from .memory import plan as memory

    budget = None if config.vram_budget is None else int(config.vram_budget * memory.GIB)
    if device.type == "cuda" and budget is not None:
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    if device.type == "cuda" and budget is None:
        budget = torch.cuda.mem_get_info(device)[0]
    if config.quantize != "none" and config.memory in memory.UNQUANTIZED_PLANS:
        raise InvalidRequestError(
            f"--quantize {config.quantize} cannot be combined with --memory {config.memory}, which streams plain "
            "weights; use --memory auto, resident, te-offload or model-offload with it"
        )
    tunable = config.memory in ("te-offload", "block-offload")
    if budget is None or (config.memory != "auto" and not tunable):  # no budget: CPU memory is the host's
        return ((config.memory if config.memory != "auto" else "resident"), 0, 0), False, config.quantize
    shape = memory.shape_from_source(source)
    dtype_bytes = memory.dtype_bytes(dtypes)
    compiled_vae = accel_.resolve_compile(config.compile, device)
    if tunable:
        usable = memory.usable_budget(budget)
        request = {"width": 1024, "height": 1024, "quantize": config.quantize, "compiled_vae": compiled_vae}
        est = memory.fitting(shape, dtype_bytes, usable, plan=config.memory, **request)
        return (est.plan, est.resident_blocks, est.resident_layers), est.peak > usable, config.quantize
    options = (config.quantize,) if config.quantize != "none" else _quantizations(caps, dtypes["transformer"])
    choice = memory.choose(
        shape,
        dtype_bytes,
        budget,
        width=1024,
        height=1024,
        quantize_options=options,
        exact=config.quantize == "none",
        compiled_vae=compiled_vae,
    )
    if choice.chosen is None and config.quantize != "none":
        # The streaming plans move plain weights only, so a quantized transformer has no leaner plan.
        least = min(choice.considered, key=lambda e: e.peak)
        raise GPUMemoryError(
            f"--quantize {config.quantize} needs about {least.peak / memory.GIB:.1f} GiB even as {least.label()}, "
            f"and the budget is {budget / memory.GIB:.1f} GiB; use --quantize none, whose block-offload and "
            "sequential plans stream the weights and fit in less"
        )
    if choice.chosen is None:
        log.warning("no memory plan fits %.1f GiB even at 1024x1024; trying the leanest", budget / memory.GIB)
        return (memory.PLANS[-1], 0, 0), True, config.quantize
    est = choice.chosen
    log.info(
        "memory plan %s: estimated peak %.1f GiB of %.1f GiB", est.label(), est.peak / memory.GIB, budget / memory.GIB
    )
    return (est.plan, est.resident_blocks, est.resident_layers), est.vae_tiling, est.quantize


def _quantizations(caps: Any, transformer_dtype: torch.dtype) -> tuple[str, ...]:
    """Quantizations this device can run (torchao installed), fastest first, for the planner."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return ()
    usable = []
    for mode in ("fp8", "int8", "int4"):
        try:
            accel_.check_quantize(mode, caps, transformer_dtype)
        except DeviceError:
            continue
        usable.append(mode)
    return tuple(usable)


def _memory_available(device: torch.device) -> str:
    """'the device has N GiB', or the budget when --vram-budget capped the process below that."""
    if device.type != "cuda":
        return f"the {device.type} device's memory is the host's"
    total = torch.cuda.mem_get_info(device)[1]
    fraction = _budget_fraction(device)
    if fraction < 1.0:
        return f"the budget (--vram-budget) is {total * fraction / GIB:.1f} GiB"
    return f"the device has {total / GIB:.1f} GiB"


# A step graph's pool against the planner's activation estimate of one pass (H100, session 10:
# 0.50 GiB reserved at 1024² against an estimate of 0.36 GiB).
STEP_POOL_FACTOR = 1.5


def _budget_fraction(device: torch.device) -> float:
    """The per-process memory fraction --vram-budget set (1.0 when none, or on older torch)."""
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
    if get_fraction is None:
        return 1.0
    return get_fraction(device.index if device.index is not None else torch.cuda.current_device())


def _free_device_memory(device: torch.device) -> int:
    """Bytes this process could still allocate: free on the device plus its own unused cache."""
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _vae_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
