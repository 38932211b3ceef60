"""Command line: `zturbo generate`, `zturbo serve`, `zturbo info` and `zturbo bench`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    MEMORY_CHOICES,
    QUANTIZE_CHOICES,
    SWITCH_CHOICES,
    TINY_MODEL,
)
from .errors import InvalidRequestError, ZTurboError
from .request import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS

log = logging.getLogger("zturbo")

EXIT_ERROR = 1
EXIT_USAGE = 2


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"hub repo id, local diffusers directory, or {TINY_MODEL!r} (default: $ZTURBO_MODEL or {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="dtype of every component (default auto)")
    for component in ("transformer", "text-encoder", "vae"):
        p.add_argument(
            f"--{component}-dtype", default=None, choices=DTYPE_CHOICES, help=f"override for the {component}"
        )
    p.add_argument(
        "--compile",
        default=None,
        choices=SWITCH_CHOICES,
        help="torch.compile the transformer blocks and VAE decoder (auto: on for CUDA, except in `generate`)",
    )
    p.add_argument(
        "--memory",
        default=None,
        choices=MEMORY_CHOICES,
        help="weight placement: auto (default: the fastest plan that fits), resident, te-offload, model-offload, "
        "block-offload, sequential",
    )
    p.add_argument("--vram-budget", type=float, default=None, help="GiB of GPU memory to use (default: what is free)")
    p.add_argument(
        "--vae-tiling",
        default=None,
        choices=SWITCH_CHOICES,
        help="tiled VAE decode: auto (default: when the decode would not fit, or after running out of memory)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE_CHOICES,
        help="transformer linears: none (default) or fp8 (dynamic per-row scaling; compute capability >= 8.9)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zturbo", description="Z-Image-Turbo text-to-image runtime.")
    parser.add_argument("--version", action="version", version=f"zturbo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="what to draw (any language the text encoder knows, e.g. English, Chinese)")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (used only when --guidance > 0)")
    gen.add_argument("--seed", type=int, default=None, help="random seed; image i uses seed+i (default: random)")
    gen.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    gen.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale; 0 (default) = no CFG, the Turbo setting"
    )
    gen.add_argument("--width", type=int, default=DEFAULT_SIZE, help=f"multiple of 16 (default {DEFAULT_SIZE})")
    gen.add_argument("--height", type=int, default=DEFAULT_SIZE, help=f"multiple of 16 (default {DEFAULT_SIZE})")
    gen.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    gen.add_argument("-o", "--output", default=None, help="a .png file for one image, or a directory (./outputs)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gen.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"largest width*height accepted (default $ZTURBO_MAX_PIXELS or {DEFAULT_MAX_PIXELS})",
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines on stderr")
    _model_args(gen)

    serve = sub.add_parser("serve", help="HTTP server: a persistent job queue, worker per GPU, OpenAI images API")
    _model_args(serve)
    from .serve import add_arguments as _serve_args

    _serve_args(serve)

    _bench_args(sub.add_parser("bench", help="speed and memory against diffusers' pipeline on a GPU"))
    info = sub.add_parser("info", help="versions, device capabilities, memory and the dtypes that would be used")
    _model_args(info)
    info.add_argument("--plan", action="store_true", help="also estimate peak GPU memory per placement plan")
    info.add_argument("--width", type=int, default=DEFAULT_SIZE, help="for --plan (default %(default)s)")
    info.add_argument("--height", type=int, default=DEFAULT_SIZE, help="for --plan (default %(default)s)")
    info.add_argument("--batch", type=int, default=1, help="for --plan (default 1)")
    return parser


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", action="store_true", help="the real architecture with random weights")
    p.add_argument("--model", default=None, help="a local checkpoint directory instead of random weights")
    p.add_argument("--sizes", default="512,1024,1536,2048", help="square sizes, comma separated")
    p.add_argument("--batch", type=int, default=4, help="batch size of the throughput row (default 4)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each row (default 1)")
    p.add_argument("--quantize", default="none,fp8", help="compiled modes to measure: none, fp8 (comma separated)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers' pipeline")
    p.add_argument("--reference-compiled", action="store_true", help="also time diffusers' compile_repeated_blocks")
    p.add_argument("--no-fuse-ab", action="store_true", help="skip the compiled row without fused projections")
    p.add_argument("--no-compile", action="store_true", help="measure the modes without torch.compile")
    p.add_argument(
        "--first-image",
        action="store_true",
        help="only: seconds from process start to the first compiled 1024² image (run in a fresh process)",
    )
    p.add_argument(
        "--memory-caps",
        default=None,
        help="GiB caps, comma separated (0 = uncapped): the memory planner's plan, peak and speed under each "
        "(the first --sizes value; one process per cap; diffusers' offloading too unless --no-reference)",
    )
    p.add_argument("--fp8-caps", default=None, help="with --memory-caps: caps to also run with fp8 weights")
    p.add_argument("--cap-row", default=None, help=argparse.SUPPRESS)  # one --memory-caps row (child process)
    p.add_argument(
        "--write-checkpoint", default=None, help="write random real-size weights in the published layout to DIR"
    )
    p.add_argument(
        "--loading",
        default=None,
        help="DIR: host memory (RssAnon, peak RSS) and seconds to load it, zturbo vs diffusers, --runs times each",
    )
    p.add_argument("--load-row", default=None, choices=("zturbo", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="GPU kernel time by kind for one compiled image")
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (a smoke test of this tool)")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md (default $OUT or ./bench)")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    _setup_logging(quiet=getattr(args, "quiet", False))
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            from .bench import main as bench_main

            return bench_main(args)
        if args.command == "serve":
            from .serve import main as serve_main

            return serve_main(args, _runtime_config(args, max_pixels=args.max_pixels))
        return cmd_info(args)
    except InvalidRequestError as e:
        print(f"zturbo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ZTurboError as e:
        print(f"zturbo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("zturbo: interrupted", file=sys.stderr)
        return 130


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("zturbo: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def cmd_generate(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .engine import Engine
    from .imageio import check_output
    from .loader import resolve_model
    from .request import GenerateRequest

    started = time.perf_counter()
    config = _runtime_config(args, max_pixels=args.max_pixels)
    if config.compile == "auto":
        # One process, one request: compiling costs tens of seconds and saves well under one.
        config = dataclasses.replace(config, compile="off")
    resolve_device(config.device)
    # Validate against the model's configs before any large download or load.
    configs = resolve_model(config.model, weights=False)
    request = GenerateRequest.create(
        args.prompt,
        limits=configs.limits(config.max_pixels),
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        batch=args.batch,
    )
    check_output(args.output, request.num_images, overwrite=args.overwrite)
    if request.seed_was_random:
        log.info("seed %d (random)", request.seed)
    # No separate warm-up: with --compile on, the request itself compiles at its own size.
    engine = Engine.load(config, source=resolve_model(config.model), warmup=False)
    with _progress(request.steps, disabled=args.quiet) as bar:
        result = engine.generate(request, on_step=lambda i, n: _advance(bar, i))
    for path, image in zip(result.save(args.output, overwrite=args.overwrite), result.images, strict=True):
        print(f"{path}\tseed={image.seed}", flush=True)
    total = time.perf_counter() - started
    gen_s = sum(result.timings.values())
    print(f"zturbo: {len(result.images)} image(s) in {gen_s:.2f} s; total {total:.1f} s with loading", file=sys.stderr)
    return 0


def _choice_text(choice: Any) -> str:
    from .device import dtype_name

    return f"{dtype_name(choice.dtype)}  ({choice.reason})"


def _runtime_config(args: argparse.Namespace, **extra: Any) -> Any:
    from .config import RuntimeConfig

    return RuntimeConfig.from_env(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        transformer_dtype=args.transformer_dtype,
        text_encoder_dtype=args.text_encoder_dtype,
        vae_dtype=args.vae_dtype,
        compile=args.compile,
        quantize=args.quantize,
        vae_tiling=args.vae_tiling,
        memory=args.memory,
        vram_budget=args.vram_budget,
        **extra,
    )


def _advance(bar: Any, step: int) -> None:
    if step == 1:
        bar.reset()  # a precision fallback re-runs the steps from the first
    bar.update(1)


def _progress(steps: int, disabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, disable=disabled, leave=False)


def cmd_info(args: argparse.Namespace) -> int:
    import diffusers
    import torch
    import transformers

    from . import guard
    from .device import memory_line, probe, resolve_device
    from .precision import COMPONENTS, choose_precision

    config = _runtime_config(args)
    device = resolve_device(config.device)
    caps = probe(device)
    plan = choose_precision(caps, dtype=config.dtype, overrides=config.component_dtypes())
    rows = [
        ("zturbo", __version__),
        ("torch", torch.__version__),
        ("diffusers", diffusers.__version__),
        ("transformers", transformers.__version__),
        ("CUDA", torch.version.cuda or "not built with CUDA"),
        ("device", f"{caps.device} ({caps.name})"),
        ("compute capability", ".".join(map(str, caps.compute_capability)) if caps.compute_capability else "-"),
        ("bf16 / fp16 / fp8", " / ".join("yes" if x else "no" for x in (caps.bf16, caps.fp16, caps.fp8))),
        ("flash attention", "yes" if caps.flash_attention else "no"),
        ("memory", memory_line(device)),
        ("model", config.model),
        *((f"{c.replace('_', ' ')} dtype", _choice_text(getattr(plan, c))) for c in COMPONENTS),
        *([("fp16 guard", guard.describe())] if plan.transformer.dtype is torch.float16 else []),
        ("latents / scheduler", "float32  (always)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.plan:
        _print_plan(args, config, device, plan.dtypes())
    return 0


def _print_plan(args: argparse.Namespace, config: Any, device: Any, dtypes: dict[str, Any]) -> None:
    import torch

    from . import memory
    from .loader import resolve_model
    from .request import GenerateRequest

    source = resolve_model(config.model, weights=False)
    GenerateRequest.create(
        "x", limits=source.limits(config.max_pixels), width=args.width, height=args.height, batch=args.batch
    )
    if config.vram_budget is not None:
        budget, where = int(config.vram_budget * memory.GIB), "--vram-budget"
    elif device.type == "cuda":
        budget, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        raise InvalidRequestError(f"{device} has no GPU memory to plan for; pass --vram-budget GiB to preview a GPU")
    shape = memory.shape_from_source(source)
    choice = memory.choose(
        shape, memory.dtype_bytes(dtypes), budget, width=args.width, height=args.height, batch=args.batch
    )
    print(f"\nplan for {args.width}x{args.height}, batch {args.batch}: budget {budget / memory.GIB:.2f} GiB ({where})")
    for est in choice.considered:
        mark = "  <- chosen" if est is choice.chosen else ""
        stages = ", ".join(f"{k} {v / memory.GIB:.2f}" for k, v in est.stages.items())
        print(f"  {est.label():<34} peak {est.peak / memory.GIB:6.2f} GiB  ({stages}){mark}")
    if choice.chosen is None:
        print("nothing fits: lower the resolution or batch, or free GPU memory")
    print("with --memory auto the engine loads with the chosen plan (for 1024x1024, batch 1)")


if __name__ == "__main__":
    raise SystemExit(main())
