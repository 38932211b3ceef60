"""What every benchmark shares: the real architecture with random weights, diffusers' pipeline on
the same modules, one request each way, timing around a synchronised device, and the environment
a row was measured in.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine import Engine
from ..loader import Components
from ..pipeline import denoise, encode_prompt, starting_point
from ..request import ModelLimits
from ..result import ModelInfo
from .clocks import ClockSampler

PROMPT = (
    "A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field, "
    "highly detailed fur, 85mm lens."
)
SEED = 42
STEPS = 8
GIB = 2**30
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
# Qwen3-4B, the text encoder Z-Image-Turbo ships.
QWEN3_4B_CONFIG: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}
BENCH_LIMITS = ModelLimits(spatial_unit=16, max_pixels=4096 * 4096)


@dataclass(frozen=True)
class Sampling:
    """How a benchmark request samples, the same on both sides. A negative prompt is sent only
    with guidance, as the base model is run; Turbo runs without either."""

    steps: int = STEPS
    guidance: float = 0.0
    negative_prompt: str | None = None
    cfg_normalization: bool = False  # diffusers' ZImagePipeline options (its defaults: off)
    cfg_truncation: float = 1.0


TURBO = Sampling()


# ---------------------------------------------------------------------------------------------
# Models


def random_components(device: torch.device, dtype: torch.dtype, tiny: bool) -> Components:
    """The real architecture (or the tiny test one) with random weights, built on `device` in `dtype`."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .. import tiny as tiny_model

    tokenizer = tiny_model.build_tokenizer()
    with _building(device, dtype):
        if tiny:
            transformer = ZImageTransformer2DModel(**tiny_model.TRANSFORMER_CONFIG)
            text_config = Qwen3Config(**tiny_model.text_encoder_config(len(tokenizer)))
        else:
            transformer = ZImageTransformer2DModel()  # the published default config
            text_config = Qwen3Config(**QWEN3_4B_CONFIG)
        vae = AutoencoderKL(**(tiny_model.VAE_CONFIG if tiny else tiny_model.FLUX_VAE_CONFIG))
        text_encoder = Qwen3Model(text_config)
    # All-zero pad rows would make fp8's per-row activation scale 0/0; trained pad tokens are not zero.
    tiny_model.randomize_pad_tokens(transformer)
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(transformer, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG))


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside draw their random weights from seed 0, directly on `device` in `dtype`."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_engine(components: Components, device: torch.device, dtype: torch.dtype, **placement: Any) -> Engine:
    """An eager engine over `components` (random weights), every module in `dtype`."""
    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), dtype)
    return Engine(components, ModelInfo("random-weights", None, "none"), device, dtypes, BENCH_LIMITS, **placement)


def load_engine(model: str | None, tiny: bool, device: torch.device, dtype: torch.dtype) -> Engine:
    """An eager engine: random weights (`model` None), else the local checkpoint `model` (no warm-up yet)."""
    from ..config import RuntimeConfig

    if model is None:
        return random_engine(random_components(device, dtype, tiny), device, dtype)
    config = RuntimeConfig(model=model, device=str(device), dtype="auto", compile="off")
    return Engine.load(config, warmup=False)


def reference_pipeline(components: Components) -> Any:
    """diffusers' ZImagePipeline over the same module objects the engine runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config),
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_bytes(engine: Engine) -> int:
    c = engine.components
    return sum(p.numel() * p.element_size() for m in (c.transformer, c.vae, c.text_encoder) for p in m.parameters())


def release_device_memory() -> None:
    """Give back the memory of modules that are garbage now (compiled graphs keep references
    until Dynamo is reset), so that the next row or a child process finds the GPU free."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ---------------------------------------------------------------------------------------------
# One request each way


def zturbo_e2e(
    engine: Engine, size: int, batch: int = 1, cached_prompt: bool = False, sampling: Sampling = TURBO
) -> Callable[[], Any]:
    """One user request; the prompt cache is emptied first unless `cached_prompt` (a repeated prompt)."""
    guided = {"guidance_scale": sampling.guidance, "negative_prompt": sampling.negative_prompt or ""}

    def run() -> Any:
        if not cached_prompt:
            engine.prompt_cache.clear()
        return engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=sampling.steps, batch=batch, **guided)

    return run


def reference_e2e(pipe: Any, size: int, batch: int = 1, sampling: Sampling = TURBO) -> Callable[[], Any]:
    """The same request through diffusers' pipeline, to a decoded 8-bit image."""

    def run() -> Any:
        return pipe(
            prompt=PROMPT,
            negative_prompt=sampling.negative_prompt,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance,
            cfg_normalization=sampling.cfg_normalization,
            cfg_truncation=sampling.cfg_truncation,
            width=size,
            height=size,
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pil",
        )

    return run


def final_latents(engine: Engine, size: int) -> torch.Tensor:
    """The float32 latents after the last step, through the engine's current (maybe compiled) modules."""
    c = engine.components
    with torch.inference_mode():
        cond, _ = encode_prompt(c.text_encoder, c.tokenizer, [PROMPT], engine.device)
        latents, sched = starting_point(c, [SEED], size, size, STEPS, engine.limits.spatial_unit)
        return denoise(c.transformer, latents.to(engine.device), cond, None, sched, 0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> dict[str, Any]:
    """Median seconds over `runs` after `warmup` calls, the peak memory of the timed calls, and
    the GPU's SM clock and power while they ran (`zturbo.bench.clocks`; None without nvidia-smi)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with ClockSampler(device) as clocks:  # what the GPU ran at: power-capped cards clock down
        for _ in range(runs):
            times.append(once(fn, device))
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        "gpu_clocks": clocks.summary(),
    }


def once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of `fn`, with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Environment


def environment(device: torch.device) -> dict[str, Any]:
    """The device and library versions a result was measured with, and the git commit where known."""
    import diffusers
    import transformers

    from ..version import __version__

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "zturbo": __version__,
    }
    with contextlib.suppress(ImportError):
        import torchao

        env["torchao"] = torchao.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    return env
