"""Engine: owns the loaded modules; load, warm up, generate, recover.

The stages themselves are `pipeline`'s plain functions. Three recoveries keep a request alive,
each a small method below and each recorded in the result's `fallbacks`: a non-finite result
re-runs in a safer dtype (`_escalate`), running out of memory moves to a leaner memory layout
(`_lean_out`) or a tiled decode (`_decode`), and a torch.compile failure continues eagerly
(`_eager_if_compile_fails`). Each change is kept for later requests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .accel import compile as accel_compile
from .accel.artifacts import OFF, CompileCache, open_cache
from .accel.compile import Accel, AccelOptions, compile_errors, resolve_compile
from .accel.fuse import controlnet_blocks
from .accel.graphs import EncoderGraphs, StepGraphs
from .accel.quantize import check_quantize, quantize_transformer
from .accel.sequence import Shards, check_shards, first_processes
from .adapters.library import LoraLibrary
from .adapters.merge import BaseReader, LoraMerger
from .config import RuntimeConfig, default_lora_dir
from .device import (
    GIB,
    apply_vram_budget,
    budget_fraction,
    dtype_name,
    free_device_memory,
    memory_available,
    memory_budget,
    memory_line,
    memory_room,
    probe,
    release_cached_memory,
    resolve_device,
)
from .errors import FieldError, GPUMemoryError, InvalidRequestError, LoraError, PrecisionError
from .gguf import stores_quantized
from .guard import Fp16Guard, install_fp16_guard
from .inputs.images import read_image
from .inputs.prepare import Prepared, paste_back, prepare
from .inputs.spec import ALPHA_MASK, INPAINT_CONTROL_DIM, ImageInputs, control_steps, img2img_first_step
from .loader import (
    Components,
    ModelSource,
    base_reader,
    fingerprint,
    load_components,
    resolve_model,
)
from .memory.placement import Placement, homes, set_vae_tiling
from .memory.plan import (
    FREE_SHARE,
    SPEED_ORDER,
    SPLIT_CFG,
    UNQUANTIZED_PLANS,
    Layout,
    batch_room,
    controlnet_activation,
    denoise_onload,
    dtype_bytes,
    eager_reason,
    estimate,
    fusable,
    leaner,
    model_shape,
    plan_layout,
    transformer_activation,
    vae_activation,
)
from .pipeline import (
    Keep,
    LatentCache,
    LatentDist,
    PromptCache,
    Schedule,
    StepCallback,
    StepControl,
    caption_limit,
    control_context,
    decode,
    denoise,
    draw_noise,
    encode_image,
    in_passes,
    latent_mask,
    latent_shape,
    mode_latents,
    noised,
    patch_dtype,
    request_schedule,
    sample_latents,
    to_uint8,
    transformer_step,
    truncation_warning,
    variation_latents,
    variety_embeds,
    variety_steps,
    without_last_layer,
)
from .precision import NonFiniteError, all_finite, choose_precision, safer
from .preview import LatentProjection, PreviewCallback, PreviewStream, fit_projection
from .profiles import Chosen
from .profiles import scheduler_config as profile_scheduler
from .request import IMAGE_FIELDS, GenerateRequest, LoraRef, ModelLimits
from .result import GeneratedImage, GenerateResult, ModelInfo

if TYPE_CHECKING:
    from .control import ControlNet

log = logging.getLogger("zturbo")

T = TypeVar("T")
# A step graph's pool against the planner's activation estimate of one pass (H100: 0.50 GiB
# reserved at 1024² against an estimate of 0.36 GiB).
STEP_POOL_FACTOR = 1.5
# LoRA base copies go to the device (switches at memory speed) only when this much stays free
# beyond the copies of every block linear; otherwise to pinned host memory.
LORA_DEVICE_RESERVE = 16 * GIB
Embeds = list[torch.Tensor]
# The warm-up parts `Engine.load(defer_warmup=True)` leaves for `finish_warmup`, for a server that
# reports ready once a first text-to-image request would find everything warm: the call with input
# images (it compiles the VAE encoder and the ControlNet's blocks) and one call at the smallest size
# (the decoder's dynamic graph; an uncompiled engine's first-call costs).
# In the order they run: the small call's dynamic decoder serves every text-to-image size but the
# warm-up's, the input-image call only img2img, inpaint and ControlNet requests.
DEFERRABLE_WARMUPS = ("small_call_s", "inputs_s")
# Where a denoising run starts: latents (B, C, h, w) on the device, the steps that run, and the
# inpaint blend (None without a mask).
Start = tuple[torch.Tensor, Schedule, Keep | None]


@dataclass
class Attempt:
    """How far one run of a request got: its metadata says how CFG ran, and running out of memory
    reads where it happened."""

    split_cfg: bool = False  # CFG's halves ran one after the other
    denoising: bool = False  # in the denoise stage (not left when it fails there)

    def split_would_help(self, req: GenerateRequest) -> bool:
        """Whether two passes could save the memory that ran out: only CFG's doubled batch, while
        it denoised (the other stages hold no more with CFG in two passes)."""
        return req.do_cfg and self.denoising and not self.split_cfg


class Phases:
    """Seconds of the start-up's phases, each from the end of the one before (or from creation)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds = {} if seconds is None else seconds
        self._since = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._since, 3)
        self._since = now


def _accel_options(layout: Layout, compile_: bool, asked: bool) -> AccelOptions:
    """The speed options for `layout`: compiled where `compile_` and the plan allow (saying why not,
    as a warning where compiling was `asked` for), fused projections only over resident weights."""
    eager = eager_reason(layout.plan)
    if compile_ and eager is not None:
        log.log(logging.WARNING if asked else logging.INFO, "running eagerly: %s", eager)
    return AccelOptions(
        compile=compile_ and eager is None,
        quantize=layout.quantize,
        fuse=fusable(layout.plan),  # not over GGUF weights either: `accel.compile.apply` leaves those
    )


class Engine:
    """Owns the loaded components; load once, generate many times."""

    def __init__(
        self,
        components: Components,
        model: ModelInfo,
        device: torch.device,
        dtypes: dict[str, torch.dtype],
        limits: ModelLimits,
        accel: Accel | None = None,
        layout: Layout | None = None,
        profile: Chosen | None = None,
    ) -> None:
        self.components = components
        self.model = model
        self.device = device
        self.dtypes = dtypes
        # The loaded ControlNet (`control.ControlNet`), or None: requests with a control image
        # need one, and the limits say how wide its input is.
        self.controlnet: ControlNet | None = components.controlnet
        if self.controlnet is not None:
            limits = replace(limits, control_in_dim=self.controlnet.control_in_dim)
        # The model's profile (defaults, CFG options), and how it was chosen; the limits carry it
        # to every request this engine validates.
        self.profile = profile or Chosen(limits.profile, "assumed")
        self.limits = replace(limits, profile=self.profile.profile)
        self.accel = accel or Accel()
        self.prompt_cache = PromptCache()
        self.latent_cache = LatentCache()
        self.preview_projection: LatentProjection | None = None  # `_preview_projection`
        self.max_tokens = caption_limit(components.transformer.config)
        self.vae_tiling_setting = "auto"  # auto | on | off (RuntimeConfig.vae_tiling)
        self.vae_tiling = False
        # --vram-budget in bytes (None: none): on CUDA it is the process's memory cap as well; MPS
        # has no cap, so `batch_room` counts against this.
        self.vram_budget: int | None = None
        # A dict to record each stage's peak device memory into (bytes; None off CUDA): the memory
        # bench sets it to check the estimator's stages. Recording resets the device's peak counter.
        self.stage_peaks: dict[str, int | None] | None = None
        self.guard: Fp16Guard | None = None
        if dtypes["transformer"] is torch.float16:  # before placement: it rescales weights in place
            control = controlnet_blocks(self.controlnet.model) if self.controlnet is not None else ()
            self.guard = install_fp16_guard(components.transformer, blocks=control)
        self.placement = Placement(components, device, layout or Layout())
        self.set_vae_tiling(self.placement.layout.vae_tiling)
        self.loras = LoraLibrary(default_lora_dir(), allow_paths=True)
        self.merger: LoraMerger | None = None  # made on the first request with a LoRA
        # The plain transformer weights by key: where a quantized weight's LoRA merge starts from.
        self.base_reader: BaseReader | None = None
        # Compiled artifacts kept across processes (None: not compiling, or no cache directory),
        # and the seconds each start-up phase took (`load`).
        self.compile_cache: CompileCache | None = None
        self.startup: dict[str, Any] = {}
        # This process's share of each image's tokens (`accel.sequence`); None: all of them.
        self.shards: Shards | None = None
        # Warm-up parts put off until `finish_warmup` runs them (DEFERRABLE_WARMUPS), in their order.
        self._deferred: dict[str, Callable[[], object]] = {}
        # The LoRA set merged in the weights now: warm-up calls use it, so they never switch the weights.
        self._lora_refs: tuple[LoraRef, ...] = ()

    # -----------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(
        cls,
        config: RuntimeConfig | None = None,
        *,
        source: ModelSource | None = None,
        warmup: bool = True,
        defer_warmup: bool = False,
        shards: Shards | None = None,
    ) -> Engine:
        """Load, apply compile/quantization from `config`, and (when compiling) warm up at 1024².

        With `defer_warmup`, the warm-up here covers a text-to-image request at that size (two prompt
        lengths, the text encoder's graphs); the rest (DEFERRABLE_WARMUPS, a small-size call included
        even when not compiling) waits for `finish_warmup`, as `pending_warmups` lists it.

        With `config.vram_budget`, the process's CUDA memory fraction is capped to it (as asked).
        With `shards` (`distributed.join`), this process is one of `config.parallel` that share each
        image's tokens: every one loads the whole model, encodes the prompt and decodes the image;
        every call to `generate` must be made on all of them alike.
        """
        config = config or RuntimeConfig.from_env()
        check_shards(config.parallel, shards)
        start = time.perf_counter()
        phases = Phases()
        device = resolve_device(config.device)
        caps = probe(device)
        phases.mark("device_s")
        check_quantize(config.quantize, caps)
        source = source or resolve_model(config.model, files=config.component_files())
        vae_upcast = bool(source.config("vae").get("force_upcast", True))
        precision = choose_precision(
            caps, dtype=config.dtype, overrides=config.component_dtypes(), vae_force_upcast=vae_upcast
        )
        dtypes = precision.dtypes()
        check_quantize(config.quantize, caps, dtypes["transformer"])
        apply_vram_budget(device, config.vram_budget)
        compile_ = resolve_compile(config.compile, device)
        budget = memory_budget(device, config.vram_budget)
        layout = plan_layout(config, source, dtypes, budget, caps, compiled_vae=compile_)
        phases.mark("plan_s")
        components = _load_components(source, device, dtypes, layout, config.controlnet)
        phases.mark("weights_s")
        model = ModelInfo(source.name, source.revision, fingerprint(source), source.origin)
        chosen = source.profile(config.preset)
        components.scheduler_config = profile_scheduler(chosen, components.scheduler_config)
        limits = source.limits(config.max_pixels)
        engine = cls(components, model, device, dtypes, limits, layout=layout, profile=chosen)
        engine._configure(config, source, layout)
        options = _accel_options(layout, compile_, config.compile == "on")
        phases.mark("setup_s")
        engine.startup = {"load_s": round(time.perf_counter() - start, 3), "phases": phases.seconds}
        engine.shards = shards
        engine._compile(options, config.compile_cache, warmup, defer_warmup)
        return engine

    def _configure(self, config: RuntimeConfig, source: ModelSource, layout: Layout) -> None:
        """The loaded engine's settings from `config`: VAE tiling, the memory budget, the LoRA library."""
        self.vae_tiling_setting = config.vae_tiling
        self.vram_budget = int(config.vram_budget * GIB) if config.vram_budget is not None else None
        lora_dir = Path(config.lora_dir).expanduser() if config.lora_dir else default_lora_dir()
        self.loras = LoraLibrary(lora_dir, allow_paths=config.lora_paths, cache_bytes=config.lora_cache_bytes)
        if source.transformer_file is None:  # a GGUF file's weights are not plain tensors to merge into
            self.base_reader = base_reader(source, self.components.transformer, self.dtypes["transformer"])
        self.set_vae_tiling(config.vae_tiling == "on" or (config.vae_tiling == "auto" and layout.vae_tiling))

    def _compile(self, options: AccelOptions, cache_dir: Path | None, warmup: bool, defer: bool = False) -> None:
        """Apply the speed options; when compiling, first load the artifacts an earlier process
        kept (so the warm-up looks graphs up instead of compiling them), then keep what it made."""
        phases = Phases(self.startup.setdefault("phases", {}))
        self.compile_cache = open_cache(cache_dir, self.device, self.dtypes, options)
        if self.compile_cache is not None:
            self.compile_cache.restore()
        phases.mark("restore_s")
        self.accel = accel_compile.apply(self.components, options, self.shards)
        phases.mark("accel_s")
        if options.compile and warmup:
            self.startup["warmup_s"] = round(self.warmup(defer=defer), 3)
            phases.mark("warmup_s")
            self.persist_compiled()
            phases.mark("persist_s")
        if warmup and defer:
            side = 4 * self.limits.spatial_unit  # 4 latent patches: the smallest size a request may ask
            self._deferred["small_call_s"] = functools.partial(self._warm_call, side, side)

    def persist_compiled(self) -> None:
        """Keep the artifacts of graphs compiled since the last call (no-op without a cache); a
        caller that warms up more sizes after `load` calls it again."""
        if self.compile_cache is not None:
            self.compile_cache.persist()

    def startup_report(self) -> dict[str, Any]:
        """The start-up phases (seconds) and whether compiled artifacts were reused: hit, miss or off."""
        cache = self.compile_cache
        status = cache.status if cache is not None and self.accel.compiling else OFF
        return {**self.startup, "compile_cache": status} | ({"artifacts": cache.describe()} if cache else {})

    def warmup(self, width: int | None = None, height: int | None = None, *, defer: bool = False) -> float:
        """Compile now rather than in the first request; returns the seconds it took.

        The default size is the one whose decoder graph is static (`accel.compile.STATIC_DECODE_SIZE`).

        Two prompt lengths, so that sequence lengths are dynamic in the compiled blocks before a
        user's prompt arrives (the blocks already see three lengths per forward, which on its own
        makes torch.compile go dynamic; the second prompt makes sure of it). `defer`: the parts of
        DEFERRABLE_WARMUPS wait for `finish_warmup`.
        """
        width = width or accel_compile.STATIC_DECODE_SIZE
        height = height or accel_compile.STATIC_DECODE_SIZE
        start = time.perf_counter()
        parts = Phases(self.startup.setdefault("warmup_parts", {}))  # where a start's warm-up goes
        for name, run in self._warmup_parts(width, height):
            if defer and name in DEFERRABLE_WARMUPS:
                self._deferred[name] = run
                continue
            run()
            parts.mark(name)
        seconds = time.perf_counter() - start
        log.info("warm-up at %dx%d (torch.compile %s) took %.1f s", width, height, self.accel.compiling, seconds)
        return seconds

    def _warmup_parts(self, width: int, height: int) -> list[tuple[str, Callable[[], object]]]:
        """The warm-up's steps in order, each with the name its seconds are reported under."""
        call = functools.partial(self._warm_call, width, height)
        parts: list[tuple[str, Callable[[], object]]] = [
            ("prompt_s", functools.partial(call, "warm-up")),
            ("longer_prompt_s", functools.partial(call, "a longer warm-up prompt " * 8)),
        ]
        inputs = self._warmup_inputs(width, height)
        if inputs:
            parts.append(("inputs_s", functools.partial(call, "warm-up", **inputs)))
        graphs = self._encoder_graphs()
        if graphs is not None:
            parts.append(("encoder_graphs_s", functools.partial(self._capture_encoder_graphs, graphs)))
        return parts

    def _warm_call(self, width: int, height: int, prompt: str = "warm-up", **inputs: Any) -> None:
        """One step at this size, so that its first-call costs (compiling) are paid now; with the
        last request's LoRA set, so that a warm-up between requests never switches the weights."""
        self.generate(prompt, seed=0, steps=1, width=width, height=height, loras=self._lora_refs, **inputs)

    def _capture_encoder_graphs(self, graphs: EncoderGraphs) -> None:
        with torch.inference_mode(), without_last_layer(self.components.text_encoder):
            graphs.capture_all(self.components.text_encoder, self.max_tokens)

    def pending_warmups(self) -> tuple[str, ...]:
        """The warm-up parts `load(defer_warmup=True)` put off and `finish_warmup` has not run, in order."""
        return tuple(sorted(self._deferred, key=DEFERRABLE_WARMUPS.index))

    def finish_warmup(self, name: str) -> float:
        """Run the deferred warm-up part `name` (one of `pending_warmups`) and keep what it compiled
        (`persist_compiled`); returns its seconds, also kept in `startup["deferred_warmup_parts"]`.
        A part that raises is not pending any more: it is not tried again."""
        run = self._deferred.pop(name, None)
        if run is None:
            pending = ", ".join(self._deferred) or "none"
            raise InvalidRequestError(f"no deferred warm-up part {name!r}; pending: {pending}")
        start = time.perf_counter()
        run()
        seconds = round(time.perf_counter() - start, 3)
        self.startup.setdefault("deferred_warmup_parts", {})[name] = seconds
        self.persist_compiled()
        return seconds

    def _warmup_inputs(self, width: int, height: int) -> dict[str, Any]:
        """Input images for one more warm-up request, so that a compiled VAE encoder and the
        ControlNet's compiled blocks compile now too (none when neither is there)."""
        from PIL import Image

        gray = Image.new("RGB", (width, height), (128, 128, 128))
        fields: dict[str, Any] = {}
        if any(module is self.components.vae.encoder for module in self.accel.compiled):
            fields.update(image=gray, strength=1.0)
        if self.controlnet is not None:
            fields.update(control_image=gray)
        return fields

    # -----------------------------------------------------------------------------------------
    # Generating

    def request(self, prompt: str | Sequence[str], **params: Any) -> GenerateRequest:
        """Validate parameters against this model's limits.

        Image fields (image, mask, control_image) also take a file path (str or Path) here, the
        Python API's door: the file is read and checked as the CLI reads one.
        """
        for name in IMAGE_FIELDS:
            value = params.get(name)
            if isinstance(value, Path) or (isinstance(value, str) and not (name == "mask" and value == ALPHA_MASK)):
                params[name] = read_image(value, name)
        return GenerateRequest.create(prompt, limits=self.limits, **params)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str] | GenerateRequest,
        *,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        **params: Any,
    ) -> GenerateResult:
        """Generate images; `prompt` is text, a list of prompts, or a ready GenerateRequest.

        `on_step(i, n)` is called after each step i of n. `on_preview(i, n, images)`, when given,
        gets one small RGB preview per image of the batch (longest side <= 256 px, `zturbo.preview`)
        of what step i predicts; on CUDA each arrives one step late (the last before this returns),
        so the host never waits for the GPU. Previews do not change the images.

        A non-finite result re-runs the request once per escalation with the component at fault
        in the next safer dtype (float16 -> bfloat16 -> float32); running out of memory re-runs it
        once with the next leaner memory layout. Each fallback is recorded in the result and the
        images' metadata, and kept for later requests.
        """
        req = prompt if isinstance(prompt, GenerateRequest) else self.request(prompt, **params)
        if self.shards is not None:  # a random seed drawn here must be the first process's too
            req = first_processes(req, self.shards)
        fallbacks: list[dict[str, str]] = []
        memory_retried = False
        while True:  # bounded: each pass raises a precision, takes the one leaner-layout retry, or raises
            attempt = Attempt()
            try:
                result = self._run(req, attempt, on_step, fallbacks, on_preview)
            except NonFiniteError as e:
                fallbacks.append(self._escalate(e))
                continue
            except torch.OutOfMemoryError as e:
                oom = _first_line(e, "out of memory")
            else:
                for image in result.images:
                    image.metadata["fallbacks"] = fallbacks
                result.fallbacks = fallbacks
                return result
            # Outside the except block, so the failed run's tensors are freed first.
            if memory_retried:
                raise self._out_of_memory(req, oom)
            fallbacks.append(self._lean_out(req, oom, guided=attempt.split_would_help(req)))
            memory_retried = True

    def runtime(self, split_cfg: bool | None = None) -> dict[str, Any]:
        """How the images are computed right now: dtypes, float16 guard, quantization, compilation,
        and the loaded ControlNet (an image's metadata names it only where the request used it).
        `split_cfg`: whether a request ran CFG's halves in two passes (None: as the layout does)."""
        return {
            "dtypes": {k: dtype_name(v) for k, v in self.dtypes.items()},
            "fp16_guard": self.guard.describe() if self.guard is not None else None,
            "memory_plan": self.placement.describe(split_cfg),
            "vae_tiling": self.vae_tiling,
            "controlnet": self.controlnet.describe() if self.controlnet is not None else None,
            **self.accel.describe(),
            **({"parallel": self._shard_count} if self._shard_count > 1 else {}),
            **({"transformer_weights": weights} if (weights := self.components.transformer_weights) else {}),
        }

    def _run(
        self,
        req: GenerateRequest,
        attempt: Attempt,
        on_step: StepCallback | None,
        fallbacks: list[dict[str, str]],
        on_preview: PreviewCallback | None = None,
    ) -> GenerateResult:
        timings: dict[str, float] = {}
        self._check_controlnet(req.inputs)
        tick = time.perf_counter()
        loras = self._use_loras(req)  # first: a bad LoRA is refused before any GPU work
        timings["lora_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        cond, uncond, early, warnings = self._encode(req)
        timings["encode_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        prepared = self._prepare(req.inputs, req.width, req.height)
        start = self._start(req, prepared)
        controls = self._controls(req, prepared, len(start[1].dts))
        timings["inputs_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        previews = PreviewStream(self._preview_projection(), on_preview) if on_preview is not None else None
        latents = self._denoise(req, attempt, start, controls, cond, uncond, early, on_step, previews)
        # One check after the loop, none inside it; the embeddings are only looked at on failure.
        with self._stage("check"):
            finite = all_finite(latents)
        if not finite:
            if not all_finite(cond + (uncond or [])):
                raise NonFiniteError("text_encoder", "non-finite prompt embeddings")
            raise NonFiniteError("transformer", "non-finite latents after denoising")
        self.placement.stage("decode")
        with self._stage("decode"):
            image = self._decode(latents, req, fallbacks)
            while not all_finite(image):  # only the decode is redone: the latents are fine
                fallbacks.append(self._escalate(NonFiniteError("vae", "non-finite image after decoding")))
                image = self._eager_if_compile_fails(decode, self.components.vae, latents)
        with self._stage("finish"):
            pixels = to_uint8(image)
            if prepared is not None and prepared.paste is not None:
                pixels = paste_back(pixels, prepared.paste)
            timings["denoise_decode_s"] = time.perf_counter() - tick
            images = self._package(req, pixels, loras, warnings, attempt.split_cfg)
            every = list(dict.fromkeys(w for image in images for w in image.warnings))
            return GenerateResult(images, req, timings, every)

    def _encode(self, req: GenerateRequest) -> tuple[Embeds, Embeds | None, tuple[Embeds, int] | None, list[list[str]]]:
        """(cond, uncond or None, seed variety's (early embeddings, steps) or None, each image's
        truncation warnings)."""
        c, placed, rows = self.components, self.placement, req.images
        where = {"on_miss": lambda: placed.stage("encode"), "graphs": self._encoder_graphs()}

        def encode(prompts: list[str]) -> tuple[Embeds, list[int]]:
            return self.prompt_cache.encode(
                c.text_encoder, c.tokenizer, prompts, self.device, max_tokens=self.max_tokens, **where
            )

        with self._stage("encode"):
            cond, counts = self._eager_if_compile_fails(encode, [r.prompt for r in rows])
            limit = self.max_tokens
            warnings = [[truncation_warning("prompt", r.prompt, n, limit)] for r, n in zip(rows, counts, strict=True)]
            uncond = None
            if req.do_cfg:
                uncond, counts = self._eager_if_compile_fails(encode, [r.negative_prompt for r in rows])
                for row_warnings, r, n in zip(warnings, rows, counts, strict=True):
                    row_warnings.append(truncation_warning("negative prompt", r.negative_prompt, n, limit))
        per_image = [[w for w in row if w is not None] for row in warnings]
        for w in dict.fromkeys(w for row in per_image for w in row):
            log.warning(w)
        # The cache holds clean embeddings; each image's variety noise is added to its own copy.
        early = None
        if req.variety > 0:
            seeds = [r.seed for r in rows]
            # a fraction of the steps that run, as the control range is (img2img runs fewer)
            runs = req.inputs.steps_run(req.steps)
            early = (variety_embeds(cond, seeds, req.variety), variety_steps(req.variety_until, runs))
        return cond, uncond, early, per_image

    def _check_controlnet(self, inputs: ImageInputs) -> None:
        """A request validated against other limits (another engine's, a server's header read)
        is refused here, before any work, where this engine's ControlNet cannot run it."""
        if not inputs.controlled:
            return
        if self.controlnet is None:
            raise FieldError("control_image", "control_image needs a ControlNet, and this engine has none loaded")
        if inputs.masked and self.controlnet.control_in_dim < INPAINT_CONTROL_DIM:
            raise FieldError(
                "control_image",
                f"the loaded ControlNet (control_in_dim {self.controlnet.control_in_dim}) has no inpaint input; "
                "a mask or outpaint with a control image needs Fun-ControlNet-Union 2.0 or later",
            )

    def _prepare(self, inputs: ImageInputs, width: int, height: int) -> Prepared | None:
        """The input images as tensors at the request's size (None for text-to-image)."""
        if not inputs.images():
            return None
        with self._stage("prepare_inputs"):
            return prepare(inputs, width, height)

    def _start(self, req: GenerateRequest, prepared: Prepared | None) -> Start:
        """The starting latents, the steps to run and the inpaint blend.

        Text-to-image and ControlNet inpaint start from noise over every step. An input image
        (img2img, inpaint, outpaint) is encoded, sampled with the image's first draw, and noised
        with its second to where `strength` starts; a mask blends it back after every step.
        """
        c, rows, inputs = self.components, req.images, req.inputs
        shape = latent_shape(c, req.width, req.height, self.limits.spatial_unit)
        sched = request_schedule(c, shape, req.steps, self.limits.spatial_unit)
        from_image = prepared is not None and prepared.image is not None and not (inputs.controlled and inputs.masked)
        with self._stage("prepare"):
            *eps, noise = draw_noise([r.seed for r in rows], shape, 2 if from_image else 1)
            noise = variation_latents(noise, [r.variation_seed for r in rows], req.variation_strength)
            noise = noise.to(self.device)
        if not from_image:
            return noise, sched, None
        assert prepared is not None and prepared.image is not None and inputs.strength is not None
        with self._stage("encode_image"):
            dist = self._encoded("image", req, prepared.image)
            image_latents = sample_latents(dist, eps[0].to(self.device))
        sched = sched.tail(img2img_first_step(req.steps, inputs.strength))
        latents = noised(image_latents, noise, sched.sigmas[0])
        keep = None
        if prepared.mask is not None:
            keep = Keep(latent_mask(prepared.mask.to(self.device), *shape[1:]), image_latents, noise)
        return latents, sched, keep

    def _controls(self, req: GenerateRequest, prepared: Prepared | None, steps: int) -> list[StepControl | None] | None:
        """Each step's ControlNet input (None where the ControlNet does not run); None without a
        control image."""
        inputs = req.inputs
        if prepared is None or prepared.control is None:
            return None
        assert self.controlnet is not None  # _check_controlnet refused the request otherwise
        with self._stage("encode_image"):
            control = mode_latents(self._encoded("control", req, prepared.control))
            inpaint = None
            if inputs.masked:  # ControlNet inpaint: the mask and the kept pixels go in the context
                assert prepared.image is not None and prepared.mask is not None
                masked = prepared.image * (prepared.mask < 0.5)
                inpaint = (prepared.mask.to(self.device), mode_latents(self._encoded("masked", req, masked)))
            context = control_context(control, self.controlnet.control_in_dim, inpaint)
        dtype = patch_dtype(self.components.transformer)
        rows = [context.to(dtype)] * (req.num_images * (2 if req.do_cfg else 1))  # CFG: the negative half too
        control_input = (rows, torch.tensor(inputs.control_scale, dtype=torch.float32, device=self.device))
        runs = control_steps(steps, inputs.control_start, inputs.control_end)
        return [control_input if run else None for run in runs]

    def _encoded(self, purpose: str, req: GenerateRequest, pixels: torch.Tensor) -> LatentDist:
        """The VAE's latent distribution of one prepared input image (`purpose`: image, masked or
        control), from the cache when it has the same pixels encoded in the VAE's current dtype."""
        vae = self.components.vae
        key = _input_key(purpose, req.inputs, req.width, req.height)
        dist = self.latent_cache.get(vae, key)
        if dist is None:
            self.placement.stage("image")  # model-offload: the text encoder leaves the device first
            dist = self._eager_if_compile_fails(encode_image, vae, pixels.to(self.device))
            if not all_finite([dist.mean, dist.std]):
                raise NonFiniteError("vae", "non-finite latents after encoding an input image")
            self.latent_cache.put(vae, key, dist)
        return dist

    def _denoise(
        self,
        req: GenerateRequest,
        attempt: Attempt,
        start: Start,
        controls: list[StepControl | None] | None,
        cond: Embeds,
        uncond: Embeds | None,
        early: tuple[Embeds, int] | None,
        on_step: StepCallback | None,
        previews: PreviewStream | None = None,
    ) -> torch.Tensor:
        c = self.components
        latents, sched, keep = start
        self.placement.stage("denoise")
        # After the stage: under model-offload the text encoder has left the device by now.
        attempt.split_cfg = self._split_cfg(req)
        attempt.denoising = True
        with self._stage("denoise"):
            # The loaded ControlNet is bound whether this request uses it or not: the step graphs
            # are keyed on its weights too, and run it only on steps with a control input.
            controlnet = self.controlnet.model if self.controlnet is not None else None
            graphs = self._step_graphs()
            room = functools.partial(self._step_graph_fits, req)
            step = None if graphs is None else graphs.bind(c.transformer, room, controlnet=controlnet)
            if attempt.split_cfg:
                plain = functools.partial(transformer_step, c.transformer, controlnet)
                step = in_passes(step or plain, req.num_images)
            run = functools.partial(
                denoise,
                controlnet=controlnet,
                controls=controls,
                keep=keep,
                on_latents=previews,
                cfg=req.cfg,
            )
            latents = self._eager_if_compile_fails(
                run, c.transformer, latents, cond, uncond, sched, req.guidance_scale, on_step, early, step
            )
        attempt.denoising = False
        if previews is not None:
            previews.flush()
        return latents

    def _preview_projection(self) -> LatentProjection:
        """The VAE's latent-to-RGB map for previews, fitted on the first request that asks for one."""
        if self.preview_projection is None:
            tick = time.perf_counter()
            self.preview_projection = fit_projection(self.components.vae).to(self.device)
            log.info("preview projection fitted from the VAE in %.2f s", time.perf_counter() - tick)
        return self.preview_projection

    def _use_loras(self, req: GenerateRequest) -> list[dict[str, Any]]:
        """Merge the request's LoRA set (a no-op when it is the current one; the base weights
        when it is empty); returns each LoRA's name, weight and sha256 for the metadata."""
        if not req.loras and self.merger is None:
            self._lora_refs = ()
            return []
        weights_from = self.components.transformer_weights
        if req.loras and weights_from is not None and stores_quantized(self.components.transformer):
            raise LoraError(
                f"LoRAs cannot merge into the transformer of {weights_from['file']}: its weights stay quantized "
                "as stored; load the model's own transformer weights to use LoRAs"
            )
        files = [self.loras.resolve(ref.name) for ref in req.loras]
        weights = [ref.weight for ref in req.loras]
        parsed = [self.loras.load(f, self.lora_targets) for f in files]
        key = tuple((f.sha256, w) for f, w in zip(files, weights, strict=True))
        self._lora_merger().apply(list(zip(parsed, weights, strict=True)), key)
        self._lora_refs = req.loras
        return [{"name": f.name, "weight": w, "sha256": f.sha256} for f, w in zip(files, weights, strict=True)]

    @functools.cached_property
    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """The transformer's linears and their shapes: what a LoRA file's keys must map onto."""
        from .adapters.formats import linear_targets

        return linear_targets(self.components.transformer)

    def _lora_merger(self) -> LoraMerger:
        if self.merger is None:
            guard = self.guard
            self.merger = LoraMerger(
                self.components.transformer,
                self.device,
                self.placement,
                quantize=self.accel.quantize,
                base_reader=self.base_reader,
                scales={id(linear): factor for linear, _, factor in guard.scaled} if guard else {},
                backup_device=self._lora_backup_device(),
            )
        return self.merger

    def _lora_backup_device(self) -> torch.device:
        """The device where a resident, unbudgeted transformer leaves room for a copy of all its
        block linears plus LORA_DEVICE_RESERVE; the host otherwise."""
        if self.device.type != "cuda" or self.placement.plan != "resident" or budget_fraction(self.device) < 1.0:
            return torch.device("cpu")
        from .accel.quantize import is_block_linear

        linears = [m for n, m in self.components.transformer.named_modules() if is_block_linear(m, n)]
        need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        return self.device if free_device_memory(self.device) - need >= LORA_DEVICE_RESERVE else torch.device("cpu")

    def _forget_loras(self) -> None:
        """Base weights back before a recovery casts or moves them; the next request merges again."""
        if self.merger is not None:
            self.merger.forget()
            self.merger = None
        self._lora_refs = ()

    def _package(
        self,
        req: GenerateRequest,
        pixels: torch.Tensor,
        loras: list[dict[str, Any]],
        warnings: list[list[str]],
        split_cfg: bool = False,
    ) -> list[GeneratedImage]:
        from PIL import Image

        from .imageio import build_metadata

        out = []
        runtime = self.runtime(split_cfg)
        for spec, array, image_warnings in zip(req.images, pixels.numpy(), warnings, strict=True):
            meta = build_metadata(
                req, spec.prompt, spec.negative_prompt, spec.seed, self.model, runtime, spec.variation_seed
            )
            meta["loras"] = loras
            # What ran (the request's, given or the model's); `profile` below holds the model's defaults.
            meta["cfg_normalization"], meta["cfg_truncation"] = req.cfg.normalization, req.cfg.truncation
            meta["profile"] = self.profile.describe()
            meta["controlnet"] = self.controlnet.describe() if self.controlnet and req.inputs.controlled else None
            image = GeneratedImage(
                Image.fromarray(array),
                spec.seed,
                spec.prompt,
                spec.negative_prompt,
                meta,
                spec.variation_seed,
                image_warnings,
            )
            out.append(image)
        return out

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

    # -----------------------------------------------------------------------------------------
    # Recovery

    def _escalate(self, err: NonFiniteError) -> dict[str, str]:
        """After a non-finite result: the component at fault cast to the next safer dtype."""
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
        record = {"component": err.component, "from": dtype_name(current), "to": dtype_name(target)}
        record["reason"] = err.reason
        if err.component == "transformer":
            self._forget_loras()
        log.warning("%s: %s in %s; re-running in %s", err.component, err.reason, record["from"], record["to"])
        with self.placement.paused():  # streamed weights are cast at home, then streamed again
            if err.component == "transformer" and self.guard is not None:
                self.guard.remove()  # the guard is for float16 only; the cast below leaves it
                self.guard = None
            # nn.Module.to, not the diffusers/transformers override that warns about keep-in-fp32 lists.
            torch.nn.Module.to(getattr(self.components, err.component), target)
            if err.component == "transformer" and self.controlnet is not None:
                # Its blocks add to the transformer's stream (and it shares the transformer's
                # embedders and refiners): one dtype for both.
                torch.nn.Module.to(self.controlnet.model, target)
        self.dtypes = {**self.dtypes, err.component: target}
        return record

    def _lean_out(self, req: GenerateRequest, reason: str, *, guided: bool) -> dict[str, str]:
        """After running out of memory: the next leaner layout, kept for later requests; raises
        GPUMemoryError where there is none. `guided`: CFG in two passes would need less (`leaner`)."""
        current = replace(self.placement.layout, quantize=self.accel.quantize)
        target = leaner(current, guided=guided)
        if target is not None and target.plan in UNQUANTIZED_PLANS and self.shape.transformer_stored_params:
            target = None  # GGUF weights run under no plain-weight plan
        if target is None:
            raise self._out_of_memory(req, reason)
        before = self.placement.describe()
        if target == replace(current, split_cfg=True):
            # Only the denoise batch shrinks: weights, streams, compilation, graphs and LoRAs stay.
            self.placement.split_cfg()
        else:
            self._move_to(target)
        record = {"component": "memory", "from": before, "to": self.placement.describe(), "reason": reason}
        log.warning("%s with memory plan %s; retrying with %s", reason, before, record["to"])
        release_cached_memory(self.device)
        return record

    def _move_to(self, target: Layout) -> None:
        """A leaner plan's placement, and what its moved weights undo: merged LoRAs, compiled
        fusions under streaming, and CUDA graphs that replay the old addresses."""
        self._forget_loras()
        release_cached_memory(self.device)
        if self.accel.compiling and target.plan in ("block-offload", "sequential"):
            # Streaming re-points the weights that fusion shares and compiled code holds.
            log.warning("running eagerly from now on: the leaner %s plan streams the blocks", target.plan)
            self.accel.revert_compile()
        # Leaner plans move the encoder's weights, so its graphs can never replay again (plans
        # only get leaner): free their memory now.
        self.accel.encoder_graphs = None
        if self.accel.step_graphs is not None:  # unused off the resident plan: free their pool
            self.accel.step_graphs.clear()
        self.placement.change(target)

    def _eager_if_compile_fails(self, stage: Callable[..., T], *args: Any) -> T:
        """`stage(*args)`; where torch.compile fails, compilation is reverted and it runs eagerly."""
        if not self.accel.compiling:
            return stage(*args)
        try:
            return stage(*args)
        except compile_errors() as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = " ".join(lines[:2]) or type(e).__name__  # dynamo puts the cause on line 2
            log.warning("torch.compile failed (%s); continuing without compilation", reason[:300])
            self.accel.revert_compile()
            return stage(*args)

    def _decode(self, latents: torch.Tensor, req: GenerateRequest, fallbacks: list[dict[str, str]]) -> torch.Tensor:
        """Decode; in auto mode tile when the decode would not fit, or once after running out of memory."""
        vae = self.components.vae
        if self.vae_tiling_setting == "auto" and not self.vae_tiling and not self._decode_fits(req):
            self.set_vae_tiling(True)
            log.info("VAE: tiled decode (%dx%d would not fit in free GPU memory)", req.width, req.height)
        try:
            return self._eager_if_compile_fails(decode, vae, latents)
        except torch.OutOfMemoryError as e:
            if self.vae_tiling or self.vae_tiling_setting == "off":
                raise
            oom = _first_line(e, "out of memory")
        release_cached_memory(self.device)
        log.warning("VAE: %s while decoding %dx%d; retrying with a tiled decode", oom, req.width, req.height)
        fallbacks.append({"component": "vae", "from": "whole-image decode", "to": "tiled decode", "reason": oom})
        self.set_vae_tiling(True)  # kept for later requests, like a precision fallback
        return self._eager_if_compile_fails(decode, vae, latents)

    def _out_of_memory(self, req: GenerateRequest, reason: str) -> GPUMemoryError:
        """Free what the failed run left cached and describe what the request needed."""
        release_cached_memory(self.device)
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
        quantized = self.accel.quantize != "none"
        stored = bool(self.shape.transformer_stored_params)  # GGUF: quantized as stored
        following = SPEED_ORDER[SPEED_ORDER.index(self.placement.plan) + 1 :]
        plans = [p for p in following if not ((quantized or stored) and p in UNQUANTIZED_PLANS)]
        options = ["a smaller size or batch"]
        options += [f"a leaner --memory plan ({', '.join(plans)})"] if plans else []
        options += ["--quantize none, whose sequential plan streams the weights layer by layer"] if quantized else []
        options += ["--quantize fp8 (compute capability 8.9+)"] if not (quantized or stored) else []
        options += ["a smaller GGUF quantization"] if stored else []
        return GPUMemoryError(
            f"{reason} with memory plan {self.placement.describe()}: {req.width}x{req.height}, {req.num_images} "
            f"image(s) need about {need.peak / GIB:.1f} GiB with every component resident, and "
            f"{memory_available(self.device)}. Options: {', '.join(options)}, or a GPU with more memory"
        )

    # -----------------------------------------------------------------------------------------
    # Memory questions

    @functools.cached_property
    def shape(self) -> Any:
        """The model's `memory.plan.ModelShape` (parameter counts and widths), for memory estimates."""
        c = self.components
        return model_shape(c.transformer, c.text_encoder, c.vae, controlnet=c.controlnet)

    def set_vae_tiling(self, on: bool) -> None:
        set_vae_tiling(self.components.vae, on)
        self.vae_tiling = on

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
        if self.device.type != "cuda" or self.placement.plan != "resident" or budget_fraction(self.device) < 1.0:
            return None
        return self.accel.step_graphs

    def _step_graph_fits(self, req: GenerateRequest, caption_tokens: int) -> bool:
        """Whether the device holds a new step graph's pool and still decodes `req` untiled."""
        elem = torch.empty((), dtype=self.dtypes["transformer"]).element_size()
        args = (self.shape, elem, req.width, req.height, req.num_images, req.do_cfg, caption_tokens)
        control = controlnet_activation(*args) if req.inputs.controlled else 0
        pool = STEP_POOL_FACTOR * (transformer_activation(*args, self._shard_count) + control)
        return pool + self._decode_need(req) <= free_device_memory(self.device) * FREE_SHARE

    def batch_room(self, req: GenerateRequest) -> int | None:
        """How many images of `req`'s shape (its size, guidance and control image) one batch can
        make in the device memory free now, at least 1 (`memory.plan.batch_room`); None where no
        device memory is planned (the CPU; MPS without --vram-budget).

        Free memory counts the --vram-budget cap (`device.memory_room`). The weights: plans that
        keep theirs and their streaming slots allocated leave the free memory to activations;
        under model-offload and sequential the denoise stage's weights are off the device between
        requests, so they are taken off first (`memory.plan.denoise_onload`). Captions are counted
        at the longest the model takes: their length is known only once they are encoded.
        """
        free = self._denoise_room()
        if free is None:
            return None
        return batch_room(
            self.shape,
            dtype_bytes(self.dtypes)["transformer"],
            width=req.width,
            height=req.height,
            cfg=req.do_cfg and not self.placement.layout.split_cfg,
            prompt_tokens=self.max_tokens,
            controlled=req.inputs.controlled,
            free_bytes=free,
            pool_factor=STEP_POOL_FACTOR if self._step_graphs() is not None else 1.0,
            shards=self._shard_count,
        )

    @property
    def _shard_count(self) -> int:
        return self.shards.size if self.shards is not None else 1

    def _denoise_room(self, staged: bool = False) -> int | None:
        """Device memory the denoise stage's activations may take now (`batch_room`'s count); None
        where no device memory is planned. `staged`: the denoise stage has begun
        (`memory.plan.denoise_onload`)."""
        free = memory_room(self.device, self.vram_budget)
        if free is None:
            return None
        layout = replace(self.placement.layout, quantize=self.accel.quantize)
        return max(0, free - denoise_onload(self.shape, dtype_bytes(self.dtypes), layout, staged=staged))

    def _split_cfg(self, req: GenerateRequest) -> bool:
        """Whether `req`'s CFG runs its positive and negative halves one after the other: where the
        layout was planned so, or where the doubled batch's activations do not fit the memory free
        now (a larger request than the one planned for); otherwise one batched call a step.
        Asked once the denoise stage has placed its weights."""
        if not req.do_cfg:
            return False
        if self.placement.layout.split_cfg:
            return True
        room = self._denoise_room(staged=True)
        if room is None:
            return False
        elem = dtype_bytes(self.dtypes)["transformer"]
        args = (self.shape, elem, req.width, req.height, req.num_images, True, self.max_tokens)
        need = transformer_activation(*args, self._shard_count)
        need += controlnet_activation(*args) if req.inputs.controlled else 0
        if need <= room * FREE_SHARE:
            return False
        log.info("CFG in two passes (%s): the doubled batch needs about %.1f GiB, %.1f GiB free",
                 SPLIT_CFG, need / GIB, room / GIB)  # fmt: skip
        return True

    def _vae_compiled(self) -> bool:
        decoder = self.components.vae.decoder
        return any(module is decoder for module in self.accel.compiled)

    def _decode_fits(self, req: GenerateRequest) -> bool:
        if self.device.type != "cuda":
            return True
        return self._decode_need(req) <= free_device_memory(self.device) * FREE_SHARE

    def _decode_need(self, req: GenerateRequest) -> int:
        """Bytes an untiled decode of `req` needs above the weights (the planner's estimate)."""
        elem = torch.empty((), dtype=self.dtypes["vae"]).element_size()
        compiled = self._vae_compiled()
        return vae_activation(self.shape, elem, req.width, req.height, req.num_images, tiling=False, compiled=compiled)


def _load_components(
    source: ModelSource,
    device: torch.device,
    dtypes: dict[str, torch.dtype],
    layout: Layout,
    controlnet: str | None = None,
) -> Components:
    """The components (and the ControlNet `controlnet` names, if any), each where `layout` wants
    it; a quantized transformer is quantized block by block on the device, before placement, so
    the plans that stream it pack its quantized bytes: each block stays there if the transformer
    lives on the device, else goes back to the CPU."""
    start = time.perf_counter()
    where = homes(layout.plan, device)  # the ControlNet's home is the transformer's (before the CPU detour below)
    home = where["transformer"]
    if layout.quantize != "none":  # plain weights to the CPU, then block by block to the device, quantized
        where["transformer"] = torch.device("cpu")
    components = load_components(source, device, dtypes, where, controlnet=controlnet)
    if layout.quantize != "none":
        quantize_transformer(components.transformer, layout.quantize, device=device, home=home)
    log.info("loaded %s in %.1f s; %s", source.name, time.perf_counter() - start, memory_line(device))
    return components


def _input_key(purpose: str, inputs: ImageInputs, width: int, height: int) -> Hashable:
    """What one prepared input image's pixels depend on (`inputs.prepare`): its cache key."""
    image = inputs.image.sha256 if inputs.image is not None else None
    resize = (inputs.resize, width, height)
    if purpose == "image":
        return (purpose, image, inputs.mask_from_alpha, inputs.outpaint, resize)
    if purpose == "masked":
        mask = inputs.mask.sha256 if inputs.mask is not None else None
        return (purpose, image, mask, inputs.mask_from_alpha, inputs.mask_padding, inputs.outpaint, resize)
    control = inputs.control_image.sha256 if inputs.control_image is not None else None
    return (purpose, control, inputs.control_type, resize)


def _first_line(error: BaseException, default: str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else default
