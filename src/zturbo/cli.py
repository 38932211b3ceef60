"""Command line: `zturbo generate`, `batch`, `show`, `serve`, `info` and `bench`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .batch import DEFAULT_MAX_BATCH, merge_defaults, read_image_fields
from .config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    MEMORY_CHOICES,
    QUANTIZE_CHOICES,
    SWITCH_CHOICES,
    TINY_MODEL,
    process_defaults,
)
from .errors import DeviceError, InvalidRequestError, ZTurboError
from .logs import log_to
from .profiles import PRESET_CHOICES
from .request import DEFAULT_SIZE, OUTPUT_FIELDS
from .version import __version__

log = logging.getLogger("zturbo")

EXIT_ERROR = 1
EXIT_USAGE = 2


def _single_file_args(p: argparse.ArgumentParser) -> None:
    for component, example in (
        ("transformer", "z_image_turbo_bf16.safetensors"),
        ("text-encoder", "qwen_3_4b.safetensors"),
        ("vae", "ae.safetensors"),
    ):
        env_name = "ZTURBO_" + component.replace("-", "_").upper() + "_FILE"
        p.add_argument(
            f"--{component}",
            dest=component.replace("-", "_") + "_file",
            metavar="FILE",
            default=None,
            help=f"ComfyUI's single {component.replace('-', ' ')} file (e.g. {example}); the three flags come "
            f"together and replace --model (default ${env_name})" + (GGUF_HELP if component == "transformer" else ""),
        )


GGUF_HELP = "; or alone, a GGUF transformer (FILE.gguf) used with --model's text encoder and VAE"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"hub repo id, local diffusers directory, a directory of ComfyUI's single files (or its models/ tree), "
        f"or {TINY_MODEL!r} (default: $ZTURBO_MODEL or {DEFAULT_MODEL})",
    )
    _single_file_args(p)
    p.add_argument(
        "--preset",
        default=None,
        choices=PRESET_CHOICES,
        help="model profile (default steps and guidance, scheduler shift): auto (default: from the checkpoint's "
        "repo id or scheduler shift, else turbo), turbo or base; $ZTURBO_PRESET",
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
        "--compile-cache",
        default=None,
        metavar="DIR|off",
        help="where compiled artifacts are kept so the next start skips compiling (default $ZTURBO_COMPILE_CACHE, "
        "else $ZTURBO_CACHE/compile); off: compile afresh each start",
    )
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
        help="transformer block linears: none (default); fp8 (dynamic per-row scaling, compute capability 8.9+); "
        "int8 (weight-only); int4 (weight-only, CUDA)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zturbo", description="Z-Image-Turbo text-to-image runtime.")
    parser.add_argument("--version", action="version", version=f"zturbo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub.add_parser("generate", help="generate images from a prompt"))

    bat = sub.add_parser("batch", help="generate every row of a prompt file (text, JSONL or CSV); resumable")
    bat.add_argument("file", help="one prompt a line (.txt), or .jsonl / .csv rows with a prompt and any option")
    bat.add_argument("-o", "--output", default=None, help="directory for the images and manifest (./outputs/FILE)")
    _generation_args(bat, defaults_for="every row (a row's own value wins)")
    bat.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"images per engine call for rows of the same size and settings (default {DEFAULT_MAX_BATCH})",
    )
    bat.add_argument("--grid", action="store_true", help="also write grid.png, a contact sheet of the batch")
    bat.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or log lines on stderr; the summary stays"
    )
    _model_args(bat)

    show = sub.add_parser("show", help="print the generation parameters stored in an image")
    show.add_argument("image", help="an image zturbo wrote (PNG, WebP or JPEG), or one with A1111 'parameters'")
    show.add_argument("--json", action="store_true", help="the parameters as one JSON object")

    serve = sub.add_parser("serve", help="HTTP server: a persistent job queue, worker per GPU, OpenAI images API")
    _model_args(serve)
    from .serving.serve import add_arguments as _serve_args

    _serve_args(serve)

    _lora_args(sub.add_parser("lora", help="list and inspect LoRA files (no model is loaded)"))
    _bench_args(sub.add_parser("bench", help="speed and memory against diffusers' pipeline on a GPU"))
    info = sub.add_parser("info", help="versions, device capabilities, memory and the dtypes that would be used")
    _model_args(info)
    _controlnet_arg(info)
    info.add_argument("--plan", action="store_true", help="also estimate peak GPU memory per placement plan")
    info.add_argument("--width", type=int, default=DEFAULT_SIZE, help="for --plan (default %(default)s)")
    info.add_argument("--height", type=int, default=DEFAULT_SIZE, help="for --plan (default %(default)s)")
    info.add_argument("--batch", type=int, default=1, help="for --plan (default 1)")
    return parser


def _generate_args(gen: argparse.ArgumentParser) -> None:
    gen.add_argument(
        "prompt", nargs="?", help="what to draw (any language the text encoder knows, e.g. English, Chinese)"
    )
    gen.add_argument(
        "--from",
        dest="from_png",
        default=None,
        metavar="IMAGE",
        help="take every parameter from an image zturbo wrote (PNG, WebP or JPEG), or one with A1111 'parameters'; "
        "other options override",
    )
    _generation_args(gen)
    gen.add_argument(
        "-o",
        "--output",
        default=None,
        help="an image file for one image (.png, .webp or .jpg; its suffix is the format unless --format is given), "
        "or a directory (./outputs)",
    )
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gen.add_argument("--grid", action="store_true", help="also write a contact sheet of the images, seeds labelled")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines on stderr")
    gen.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each image's tokens across N processes, one GPU each (GPUs 0..N-1 of CUDA_VISIBLE_DEVICES; "
        "default 1); on --device cpu, N processes",
    )
    _model_args(gen)


def _generation_args(p: argparse.ArgumentParser, defaults_for: str | None = None) -> None:
    """Options shared by `generate` and `batch`, one per request field of the table (`request.FIELDS`);
    all default to None, so a given value can be told apart."""
    from .request import CHOICE, FIELDS, FLAG, LORAS, MARGINS

    note = f"; applies to {defaults_for}" if defaults_for else ""
    for f in FIELDS:
        if f.flag is None:
            continue
        # Sizes depend on the model; choices and margins show what is allowed in their metavar.
        allowed = "" if f.bounds == "size" or f.kind in (CHOICE, MARGINS) else f"; allowed {f.allowed()}"
        default = "" if f.default in (None, "", ()) else f" (default {f.default})"
        # Text, converted by the table (`_given_options`), so the CLI reads numbers as batch files do.
        if f.kind == LORAS:  # one option per LoRA, repeatable
            help_ = f"{f.doc}; repeatable; {allowed.removeprefix('; ')}{note}"
            p.add_argument(f.flag, action="append", default=None, metavar="NAME[:WEIGHT]", help=help_)
        elif f.kind == FLAG:  # a switch: given means yes
            p.add_argument(f.flag, action="store_const", const=True, default=None, help=f"{f.doc}{note}")
        else:
            p.add_argument(f.flag, default=None, metavar=_metavar(f), help=f"{f.doc}{allowed}{default}{note}")
    _controlnet_arg(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"largest width*height accepted (default $ZTURBO_MAX_PIXELS or {DEFAULT_MAX_PIXELS})",
    )
    _lora_dir_arg(p)


def _controlnet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="REPO_OR_FILE",
        help="a ControlNet loaded with the model, for --control-image: a hub repo id (REPO:FILE picks one of its "
        "files), a diffusers directory or a .safetensors file (default $ZTURBO_CONTROLNET)",
    )


def _metavar(f: Any) -> str | None:
    """How an option's value is written in `--help`: a path, the choice words, the margins."""
    from .inputs.spec import ALPHA_MASK
    from .request import CHOICE, IMAGE, MARGINS

    if f.kind == IMAGE:
        return f"PATH|{ALPHA_MASK}" if f.name == "mask" else "PATH"
    if f.kind == CHOICE:
        return "{" + ",".join(f.allowed().split(" | ")) + "}"
    return "L,R,T,B" if f.kind == MARGINS else None


def _lora_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="the LoRA directory, where LoRA names are looked up (default $ZTURBO_LORA_DIR or $ZTURBO_CACHE/loras)",
    )


def _lora_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", required=True)
    listing = sub.add_parser("list", help="the LoRA directory's files: size, hash, format, rank, alpha, base model")
    inspect = sub.add_parser("inspect", help="one LoRA file in detail: sha256, keys, metadata, what it targets")
    inspect.add_argument("file", help="a name in the LoRA directory, or a path to a .safetensors file")
    for q in (listing, inspect):
        _lora_dir_arg(q)
        q.add_argument("--json", action="store_true", help="as JSON")


def _request_options() -> dict[str, str]:
    """CLI option (argparse dest) -> GenerateRequest.create keyword."""
    from .request import FIELDS

    return {f.flag.lstrip("-").replace("-", "_"): f.name for f in FIELDS if f.flag is not None}


_REQUEST_OPTIONS = _request_options()
# Parameters an image carries back into a request (`--from`): what shaped it, not how its file was
# written (an image made again is written as the command line says).
_PNG_PARAMETERS = ("prompt", *(k for k in _REQUEST_OPTIONS.values() if k not in OUTPUT_FIELDS))


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options given on the command line, as GenerateRequest.create keywords."""
    from .request import FIELD, LORAS

    given = {key: getattr(args, opt) for opt, key in _REQUEST_OPTIONS.items() if getattr(args, opt) is not None}
    # A repeated option gives a list; each value may hold several, comma-separated, as a batch cell does.
    given = {k: ", ".join(v) if FIELD[k].kind == LORAS else v for k, v in given.items()}
    # Image paths are read now: a missing or broken file is refused, named, before any model loads.
    return read_image_fields({key: FIELD[key].from_text(value) for key, value in given.items()})


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
    p.add_argument(
        "--no-attention-ab", action="store_true", help="skip the compiled row with SDPA where FlashAttention 3 runs"
    )
    p.add_argument(
        "--eager-vae",
        action="store_true",
        help="compiled rows keep the VAE decoder eager (a diagnostic: in an fp8 process its compile takes minutes)",
    )
    p.add_argument("--no-compile", action="store_true", help="measure the modes without torch.compile")
    p.add_argument(
        "--first-image",
        action="store_true",
        help="only: seconds from process start to the first compiled 1024² image (run in a fresh process)",
    )
    _bench_cap_args(p)
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
    p.add_argument(
        "--lora",
        action="store_true",
        help="only: rank-32 LoRAs on every attention and FFN linear (plain vs LoRA image, set switches, diffusers)",
    )
    p.add_argument(
        "--images",
        action="store_true",
        help="only: img2img 0.5, inpaint, a random Union 2.1 ControlNet and ControlNet inpaint against diffusers' "
        "pipelines, compiled bf16, at 1024² (or --sizes N); with --memory-caps, the ControlNet row under each cap",
    )
    _bench_model_args(p)
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (a smoke test of this tool)")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md (default $OUT or ./bench)")


def _bench_cap_args(p: argparse.ArgumentParser) -> None:
    """The memory planner's rows under simulated smaller GPUs, one process per row (`bench.memory`)."""
    p.add_argument(
        "--memory-caps",
        default=None,
        help="GiB caps, comma separated (0 = uncapped): the memory planner's plan, peak and speed under each "
        "(the first --sizes value; one process per cap; diffusers' offloading too unless --no-reference)",
    )
    for mode in ("fp8", "int8"):  # quantized blocks stream under a small cap
        help_ = f"caps to run with {mode} weights (alone, or after the --memory-caps rows)"
        p.add_argument(f"--{mode}-caps", default=None, help=help_)
    p.add_argument(
        "--gguf-caps",
        default=None,
        help="TYPE:CAP items, comma separated (Q8_0:4,Q4_K:4): a GGUF transformer file of TYPE, written from the "
        "random weights, under CAP GiB (after the other cap rows)",
    )
    p.add_argument("--cap-row", default=None, help=argparse.SUPPRESS)  # one --memory-caps row (child process)


def _bench_model_args(p: argparse.ArgumentParser) -> None:
    """The runs of other models' settings and weights: the base model's, GGUF files'."""
    p.add_argument(
        "--base",
        action="store_true",
        help="only: the base model's profile (shift 6, guidance 4, a negative prompt, 50 steps unless --steps), "
        "zturbo compiled against diffusers' ZImagePipeline, at 1024² (or --sizes N)",
    )
    p.add_argument(
        "--gguf",
        default=None,
        help="only: GGUF transformers of these types (Q8_0,Q4_K), written from the random weights, against bf16 "
        "and against diffusers' GGUF loading of the same file, at 1024² (or --sizes N)",
    )
    p.add_argument("--gguf-dir", default=None, help="where --gguf writes its files (default: a temporary directory)")
    p.add_argument("--steps", type=int, default=None, help="steps of the --base and --gguf rows (default 50 and 8)")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    quiet = getattr(args, "quiet", False)
    _setup_logging(quiet=quiet)
    process_defaults()
    try:
        with _quiet_libraries(quiet):
            return _run_command(args)
    # Invalid parameters, including a device or quantization this machine cannot run, exit 2
    # (as argparse does); faults met while running exit 1.
    except (InvalidRequestError, DeviceError) as e:
        print(f"zturbo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ZTurboError as e:
        print(f"zturbo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("zturbo: interrupted", file=sys.stderr)
        return 130


def serve_options(argv: Sequence[str]) -> tuple[argparse.Namespace, Any]:
    """`zturbo serve`'s arguments and runtime config from `argv` (its arguments, without the command):
    for a Ray Serve application built outside the CLI (serving/ray_app.py)."""
    args = build_parser().parse_args(["serve", *argv])
    return args, _runtime_config(args, max_pixels=args.max_pixels)


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "batch":
        return cmd_batch(args)
    if args.command == "show":
        return cmd_show(args)
    if args.command == "lora":
        return cmd_lora(args)
    if args.command == "bench":
        from .bench.main import main as bench_main

        return bench_main(args)
    if args.command == "serve" and args.ray is not None:
        from .serving.raydeploy import run_on_cluster

        return run_on_cluster(args, _runtime_config(args, max_pixels=args.max_pixels))
    if args.command == "serve":
        from .serving.serve import main as serve_main

        return serve_main(args, _runtime_config(args, max_pixels=args.max_pixels))
    return cmd_info(args)


def _setup_logging(quiet: bool) -> None:
    log_to(sys.stderr, "zturbo", logging.WARNING if quiet else logging.INFO)


# Libraries whose info lines, progress bars and import-time notices (torchao's missing optional
# kernels, a torch deprecation about torchao's types) say nothing a `-q` user can act on.
_CHATTY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Under `-q`, only errors from the libraries and no progress bars; restored on the way out, so
    `main` called in-process (tests, a caller's script) leaves their settings as it found them."""
    if not quiet:
        yield
        return
    # Imported first: each configures its root logger on import, which would undo a level set earlier.
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    bars = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        hub_utils.are_progress_bars_disabled(),
    )
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also huggingface_hub's
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
        if not bars[2]:
            hub_utils.enable_progress_bars()


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .loader import resolve_model

    started = time.perf_counter()
    given = _given_options(args)  # input images first: a missing or broken file costs no loading
    source_meta: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if args.from_png is not None:
        source_meta, params = _parameters_from_png(args.from_png, given)
    config = _runtime_config(args, max_pixels=args.max_pixels, parallel=args.parallel)
    _check_recorded_controlnet(source_meta, config, args.from_png)
    config = _model_for_from(config, args, source_meta)
    if config.compile == "auto":
        # One process, one request: compiling costs tens of seconds and saves well under one.
        config = dataclasses.replace(config, compile="off")
    _, limits = _preflight(config)
    library = _lora_library(config)
    request = _generate_request(args, given, params, limits, library)
    if config.parallel > 1:
        from .distributed import launch

        paths, seeds, gen_s = launch(config.parallel, config.device, _generate_shared, config, request, args.output,
                                     args.overwrite)  # fmt: skip
    else:
        # No separate warm-up: with --compile on, the request itself compiles at its own size.
        engine = Engine.load(config, source=resolve_model(config.model, files=config.component_files()), warmup=False)
        engine.loras = library  # the engine's directory and settings, with the files' hashes already known
        _warn_if_not_reproducible(source_meta, engine)
        with _progress(request.steps, disabled=args.quiet) as bar:
            result = engine.generate(request, on_step=lambda i, n: _advance(bar, i))
        paths = result.save(args.output, overwrite=args.overwrite)
        seeds, gen_s = [_seed_text(image.metadata) for image in result.images], sum(result.timings.values())
    for path, seed in zip(paths, seeds, strict=True):
        print(f"{path}\t{seed}", flush=True)
    if args.grid:
        print(f"{_write_generate_grid(paths)}\tgrid", flush=True)
    log.info("%d image(s) in %.2f s; total %.1f s with loading", len(paths), gen_s, time.perf_counter() - started)
    return 0


def _generate_shared(shards: Any, config: Any, request: Any, output: Any, overwrite: bool) -> tuple[list, list, float]:
    """`generate` in one of the `config.parallel` processes sharing the request's tokens
    (`distributed.launch`): every one loads and generates, the first writes the files and returns
    (paths, seed texts, seconds generating)."""
    from .engine import Engine

    engine = Engine.load(config, warmup=False, shards=shards)
    result = engine.generate(request)
    if shards.rank != 0:
        return [], [], 0.0
    paths = result.save(output, overwrite=overwrite)
    return paths, [_seed_text(image.metadata) for image in result.images], sum(result.timings.values())


def _generate_request(
    args: argparse.Namespace, given: dict[str, Any], params: dict[str, Any], limits: Any, library: Any
) -> Any:
    """The request of `generate`: the command line over the PNG's parameters (`--from`), as a
    batch row over the command line; its LoRAs and output checked before any model loads."""
    from .imageio import check_output, image_format
    from .request import GenerateRequest

    if args.from_png is not None:
        given["loras"] = _loras_for_from(library, params.pop("loras", None) or [], given.get("loras"), args.from_png)
    params = merge_defaults(given, params)
    if args.prompt is not None:
        params["prompt"] = args.prompt
    if "prompt" not in params:
        raise InvalidRequestError("give a PROMPT, or --from IMAGE to take the parameters from an image")
    if args.output is not None and image_format(args.output) is not None:
        params.setdefault("output_format", image_format(args.output))  # `-o fox.webp` writes WebP
    request = GenerateRequest.create(limits=limits, **params)
    _check_loras(library, [ref.name for ref in request.loras])
    check_output(args.output, request.num_images, overwrite=args.overwrite, output_format=request.output_format)
    if request.seed_was_random:
        log.info("seed %d (random)", request.seed)
    if request.variation_strength > 0 and "variation_seed" not in params:
        log.info("variation seed %d (random)", request.images[0].variation_seed)
    return request


def _preflight(config: Any) -> tuple[Any, Any]:
    """Refuse what this machine cannot run (device, quantization, dtypes); return the model's
    configs (weights=False: no large download) and the limits requests are checked against (with
    the ControlNet's input width, read from its header), so bad parameters fail before any
    expensive work."""
    from .accel.quantize import check_quantize
    from .device import probe, resolve_device
    from .loader import resolve_model
    from .precision import choose_precision

    caps = probe(resolve_device(config.device))
    check_quantize(config.quantize, caps)
    source = resolve_model(config.model, weights=False, files=config.component_files())
    plan = choose_precision(
        caps,
        dtype=config.dtype,
        overrides=config.component_dtypes(),
        vae_force_upcast=bool(source.config("vae").get("force_upcast", True)),
    )
    check_quantize(config.quantize, caps, plan.transformer.dtype)
    limits = source.limits(config.max_pixels, config.preset)
    if config.controlnet is not None:
        from .control import controlnet_in_dim

        limits = dataclasses.replace(limits, control_in_dim=controlnet_in_dim(config.controlnet))
    return source, limits


def _seed_text(meta: dict[str, Any]) -> str:
    text = f"seed={meta['seed']}"
    if meta.get("variation_seed") is not None and meta.get("variation_strength"):
        text += f"\tvariation_seed={meta['variation_seed']}"
    return text


def _parameters_from_png(path: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the PNG's zturbo metadata or {}, the request parameters it holds). The input images are
    not in the PNG: those it was made from must be among `given` (the command line's)."""
    from .imageio import read_parameters
    from .request import INPUT_FIELDS

    meta, chunk, ignored = read_parameters(path)
    if ignored:
        log.warning("%s: ignoring A1111 fields zturbo does not use: %s", path, ", ".join(ignored))
    params = {k: meta[k] for k in _PNG_PARAMETERS if meta.get(k) is not None and k not in INPUT_FIELDS}
    if not params.get("prompt"):
        raise InvalidRequestError(f"{path}: its {chunk!r} chunk has no prompt")
    if chunk == "zturbo":
        params.update(_recorded_inputs(meta.get("inputs") or {}, given, path))
        return meta, params
    params.update(_a1111_inputs({k: meta[k] for k in INPUT_FIELDS if k in meta}, given, path))
    return {}, params


_IMAGE_WORDS = {"image": "an image", "mask": "a mask", "control_image": "a control image"}
_MODE_WORDS = {"txt2img": "text-to-image", "img2img": "img2img", "inpaint": "inpaint", "outpaint": "outpaint"}


def _recorded_inputs(recorded: Any, given: dict[str, Any], png: str) -> dict[str, Any]:
    """`--from` a zturbo PNG: its input settings; each input image it was made from must be given
    again, and be the same file (by sha256), or nothing runs."""
    from .inputs.images import InputImage
    from .request import FIELD, IMAGE_FIELDS

    if not recorded:
        return {}
    images = recorded.get("images") if isinstance(recorded, dict) else None
    if not isinstance(images, dict) or not set(images) <= set(IMAGE_FIELDS):
        raise InvalidRequestError(f"{png}: its inputs are not zturbo's {{mode, images, ...}}: {recorded!r:.200}")
    how = _MODE_WORDS.get(str(recorded.get("mode")), str(recorded.get("mode")))
    how += " with a ControlNet" if recorded.get("controlled") else ""
    for field, digest in images.items():
        image, flag, what = given.get(field), FIELD[field].flag, _IMAGE_WORDS[field]
        if not isinstance(image, InputImage):
            raise InvalidRequestError(f"{png} was made by {how} from {what} with sha256 {digest}; give it with {flag}")
        if image.sha256 != digest:
            raise InvalidRequestError(
                f"{png} was made by {how} from {what} with sha256 {digest}, but {flag} {image.name} has sha256 "
                f"{image.sha256}; give the same file"
            )
    return _recorded_settings(recorded)


def _recorded_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """The request keywords of recorded input settings; what was off is left out, as if not given."""
    from .inputs.spec import ALPHA_MASK

    outpaint = recorded.get("outpaint")
    settings = {
        "mask": ALPHA_MASK if recorded.get("mask_from_alpha") else None,
        "strength": recorded.get("strength"),
        "resize": recorded.get("resize"),
        "mask_blur": recorded.get("mask_blur") or None,
        "mask_padding": recorded.get("mask_padding") or None,
        "paste_back": recorded.get("paste_back") or None,
        "outpaint": tuple(outpaint) if outpaint else None,
    }
    if recorded.get("controlled"):
        settings.update({k: recorded.get(k) for k in ("control_type", "control_scale", "control_start", "control_end")})
    return {k: v for k, v in settings.items() if v is not None}


# What an A1111 input setting needs on the command line to mean anything: A1111 text records no
# input image, and its `Denoising strength` also belongs to a hires fix.
_A1111_NEEDS = {
    "strength": ("image",),
    "mask_blur": ("mask", "outpaint"),
    "paste_back": ("mask", "outpaint"),
    **{k: ("control_image",) for k in ("control_type", "control_scale", "control_start", "control_end")},
}


def _a1111_inputs(settings: dict[str, Any], given: dict[str, Any], png: str) -> dict[str, Any]:
    """`--from` an A1111 text: its input settings whose input images the command line gives; the
    others are left out, with a warning naming them."""
    from .request import FIELD

    kept = {k: v for k, v in settings.items() if any(given.get(n) is not None for n in _A1111_NEEDS[k])}
    needs = {k: " or ".join(FIELD[n].flag or n for n in _A1111_NEEDS[k]) for k in settings}
    dropped = [f"{k} (needs {needs[k]})" for k in settings if k not in kept]
    if dropped:
        log.warning("%s: ignoring its input settings without their images: %s", png, ", ".join(dropped))
    return kept


def _check_recorded_controlnet(meta: dict[str, Any], config: Any, png: str | None) -> None:
    """`--from` an image made with a ControlNet: one must be loaded, or nothing runs."""
    recorded = meta.get("controlnet")
    if recorded and config.controlnet is None:
        name = recorded.get("name") if isinstance(recorded, dict) else recorded
        digest = recorded.get("sha256") if isinstance(recorded, dict) else None
        raise InvalidRequestError(
            f"{png} was made with the ControlNet {name} (sha256 {digest}); load it with --controlnet {name}"
        )


def _lora_dir(config: Any) -> Any:
    from pathlib import Path

    from .config import default_lora_dir

    return Path(config.lora_dir).expanduser() if config.lora_dir else default_lora_dir()


def _lora_library(config: Any) -> Any:
    """The LoRA library the engine will use (`config.lora_dir`, paths as `config.lora_paths` says);
    making one reads nothing."""
    from .adapters.library import LoraLibrary

    return LoraLibrary(_lora_dir(config), allow_paths=config.lora_paths)


def _check_loras(library: Any, names: Sequence[str]) -> None:
    """Resolve every LoRA name before the model loads: a typo fails at once, naming the file and
    listing what the directory has (`LoraLibrary.resolve`)."""
    from .errors import LoraError

    try:
        for name in names:
            library.resolve(name)
    except LoraError as e:
        raise LoraError(f"{e} (the LoRA directory: {library.directory}; --lora-dir names another)") from None


def _loras_for_from(library: Any, recorded: Sequence[Any], given: str | None, png: str) -> list[Any]:
    """`--from`: the PNG's LoRAs found again (by hash, else by name), each replaced by a `--lora`
    of the same name; the other `--lora` values are added. LoRAs not found stop the run."""
    from .adapters.recorded import LoraFinder
    from .adapters.tags import lora_tag_name
    from .errors import LoraError
    from .request import LoraRef, parse_loras

    if not isinstance(recorded, (list, tuple)) or not all(isinstance(entry, dict) for entry in recorded):
        raise InvalidRequestError(f"{png}: its LoRAs are not a list of {{name, weight, sha256}}: {recorded!r:.200}")
    extra = {lora_tag_name(ref.name): ref for ref in parse_loras(given)}
    if not recorded:
        return list(extra.values())
    finder = LoraFinder(library)  # one per image: the directory is listed, and hashed, at most once
    refs, missing = [], []
    for entry in recorded:
        name, digest = str(entry.get("name") or ""), str(entry.get("sha256") or "").lower() or None
        if lora_tag_name(name) in extra:
            refs.append(extra.pop(lora_tag_name(name)))
            continue
        found = _find_recorded(finder, name, digest)
        if found is not None:
            refs.append(LoraRef(found, entry.get("weight", 1.0)))
        elif entry.get("weight") != 0:
            missing.append(f"{name} (sha256 {digest})" if digest else name)
    if missing:
        raise LoraError(
            f"{png} was made with LoRAs that are not in {library.directory}: {', '.join(missing)}; put the files "
            "there or name their directory with --lora-dir"
        )
    # Weight 0 changes nothing: such a LoRA (`--lora NAME:0` turns one off) is left out, found or not.
    return [ref for ref in [*refs, *extra.values()] if ref.weight != 0]


def _find_recorded(finder: Any, name: str, digest: str | None) -> str | None:
    """The name that finds a recorded LoRA now (`LoraFinder.locate`, the A1111 routes' finder too):
    its file by hash, else its name, else the directory's one file of that A1111 name; None when
    nothing matches. A file whose hash is not the recorded one is a warning; a hash zturbo cannot
    check (A1111's own) is said at info level, as docs/cli.md tells."""
    located = finder.locate(name, digest)
    if located.differs:
        log.warning("LoRA %s: %s; the pixels will differ", name, located.note)
    elif located.note:
        log.info("LoRA %s: %s", name, located.note)
    return located.name


def _warn_if_not_reproducible(meta: dict[str, Any], engine: Any) -> None:
    """`--from`: say when the model or dtypes differ from the image's, so the pixels will too."""
    if not meta:
        return
    if meta.get("model_fingerprint") and meta["model_fingerprint"] != engine.model.fingerprint:
        log.warning("the image was made with another model (%s); the result will differ", meta.get("model"))
    recorded = meta.get("controlnet")
    loaded = engine.controlnet.describe() if isinstance(recorded, dict) and engine.controlnet is not None else None
    if loaded is not None and loaded.get("sha256") != recorded.get("sha256"):
        log.warning("the image was made with the ControlNet %s (sha256 %s), now %s (sha256 %s); the pixels will differ",
                    recorded.get("name"), recorded.get("sha256"), loaded.get("name"), loaded.get("sha256"))  # fmt: skip
    runtime = engine.runtime()
    for key in ("dtypes", "quantize"):
        if key in meta and meta[key] != runtime.get(key):
            log.warning("the image was made with %s %s, now %s; pixels may differ", key, meta[key], runtime.get(key))


def _write_generate_grid(paths: Sequence[Any]) -> Any:
    from pathlib import Path

    from .grid import write_grid

    first = Path(paths[0])
    return write_grid([Path(p) for p in paths], first.with_name(f"grid-{first.stem}.png"))


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import batch
    from .engine import Engine
    from .grid import write_grid
    from .imageio import check_output_directory
    from .loader import resolve_model
    from .request import parse_loras

    started = time.perf_counter()
    if args.max_batch < 1:
        raise InvalidRequestError(f"--max-batch {args.max_batch} is out of range; allowed 1 or more")
    config = _runtime_config(args, max_pixels=args.max_pixels)
    file = Path(args.file)
    directory = Path(args.output) if args.output else Path("outputs") / file.stem
    check_output_directory(directory)
    rows = batch.read_rows(file)
    given = _given_options(args)
    _, limits = _preflight(config)
    library = _lora_library(config)
    _check_loras(library, [ref.name for ref in parse_loras(given.get("loras"))])
    manifest = batch.Manifest(directory)
    batch.plan(rows, given, limits, manifest)
    batch.check_loras(rows, library.resolve)
    for row in rows:
        if row.status == "failed":
            log.warning("row %d: %s", row.number, row.error)
    pending = [r for r in rows if r.status == "pending"]
    if pending:
        engine = Engine.load(config, source=resolve_model(config.model, files=config.component_files()), warmup=False)
        engine.loras = library  # with the hashes the row checks computed
        _run_batch(args, engine, rows, directory, manifest)
    if args.grid:
        files = [directory / f for r in rows if r.status in ("done", "skipped") for f in r.files]
        if files:
            print(f"{write_grid(files, directory / 'grid.png')}\tgrid", flush=True)
    # The summary is the batch's outcome (rows failed, rows already done), so `-q` keeps it.
    for line in batch.summary(rows):
        print(f"zturbo: {line}", file=sys.stderr)
    log.info("total %.1f s", time.perf_counter() - started)
    return EXIT_ERROR if any(r.status == "failed" for r in rows) else 0


def _run_batch(args: argparse.Namespace, engine: Any, rows: Any, directory: Any, manifest: Any) -> None:
    from tqdm import tqdm

    from . import batch

    total = sum(r.request.num_images for r in rows if r.status in ("pending", "skipped"))
    done = sum(len(r.files) for r in rows if r.status == "skipped")
    overall = tqdm(total=total, initial=done, desc="batch", unit="img", file=sys.stderr, disable=args.quiet)
    steps = tqdm(desc="denoising", unit="step", file=sys.stderr, disable=args.quiet, leave=False, position=1)

    def on_step(i: int, n: int) -> None:
        if i == 1:
            steps.reset(total=n)
        steps.update(1)

    def on_row(row: Any) -> None:
        if row.status == "done":
            overall.update(len(row.files))
            for name, seed in zip(row.files, row.seeds, strict=True):
                overall.write(f"{directory / name}\tseed={seed}", file=sys.stdout)

    with overall, steps:
        batch.run(engine, rows, directory, manifest, max_batch=args.max_batch, on_step=on_step, on_row=on_row)


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from .imageio import read_parameters

    meta, chunk, ignored = read_parameters(args.image)
    if args.json:
        print(json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True))
        return 0
    print(f"{args.image}  ({'zturbo metadata' if chunk == 'zturbo' else 'A1111 parameters'})")
    width = max(len(k) for k in meta)
    # What shaped the image first, in the order of the generate options; then the rest as stored.
    first = [k for k in _PNG_PARAMETERS if k in meta]
    for key in dict.fromkeys([*first, *meta]):
        value = meta[key]
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"  {key:<{width}}  {text}")
    if ignored:
        print(f"  (not used by zturbo: {', '.join(ignored)})")
    hint = _input_hint(args.image, meta.get("inputs"))
    if hint:
        print(hint)
    return 0


def _input_hint(png: str, inputs: Any) -> str | None:
    """How to make a PNG with input images again: they are not stored in it, so they are given
    again (and checked by sha256)."""
    from .request import FIELD

    images = inputs.get("images") if isinstance(inputs, dict) else None
    if not isinstance(images, dict) or not images:
        return None
    options = " ".join(f"{FIELD[k].flag} FILE" for k in images if k in FIELD)
    return f"  (to make it again: zturbo generate --from {png} {options}, the files with the sha256 above)"


def cmd_lora(args: argparse.Namespace) -> int:
    """`zturbo lora list` and `zturbo lora inspect`: each file read and mapped onto Z-Image-Turbo's
    linears (built on the meta device: no weights, no model load)."""
    import json

    from .config import RuntimeConfig

    config = RuntimeConfig.from_env(lora_dir=args.lora_dir)
    library = _lora_library(config)
    if args.lora_command == "inspect":
        record = _lora_record(library.resolve(args.file), _published_targets(), detail=True)
        print(json.dumps(record, ensure_ascii=False, indent=2) if args.json else _lora_text(record))
        if "error" in record:
            print(f"zturbo: error: {record['error']}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    files = library.list()
    targets = _published_targets() if files else {}
    records = [_lora_record(f, targets) for f in files]
    if args.json:
        print(json.dumps(records, ensure_ascii=False, indent=2))
    elif not records:
        print(f"no LoRA files in {_lora_dir(config)} (put .safetensors files there, or pass --lora-dir)")
    else:
        print(f"{len(records)} LoRA file(s) in {_lora_dir(config)}")
        print(_lora_table(records))
    return 0


def _published_targets() -> dict[str, tuple[int, int]]:
    """Z-Image-Turbo's linears; importing diffusers for them prints notices no LoRA listing needs."""
    from .adapters import formats

    with _quiet_libraries(True):
        return formats.published_targets()


def _lora_record(file: Any, targets: dict[str, tuple[int, int]], *, detail: bool = False) -> dict[str, Any]:
    """What `lora list` (and with `detail`, `lora inspect`) shows of one file; a file that cannot be
    used gets an `error` instead of its summary."""
    from .adapters import formats
    from .errors import LoraError

    record: dict[str, Any] = {"name": file.name, "path": str(file.path), "size": file.size}
    record.update(sha256=file.sha256, short_hash=file.short_hash)
    # A listing checks each header before reading tensors: a checkpoint dropped in the directory is
    # refused without loading it. `inspect` of one file reads it whole, to show all it can.
    check = None if detail else (lambda heads, meta: formats.check_header(heads, meta, targets, name=file.name))
    try:
        tensors, metadata = formats.read_file(file.path, check)
        if detail:
            record.update(keys=len(tensors), metadata=_metadata_highlights(metadata), tool=_training_tool(metadata))
        summary = formats.parse(tensors, metadata, targets, name=file.name).summary()
    except LoraError as e:
        record["error"] = str(e)
        return record
    shown = ("format", "ranks", "alphas", "modules", "base_model", "patches")
    record.update({k: summary[k] for k in shown if k in summary})
    return record


# Header fields worth showing: what the file was trained on and with, and its rank and alpha.
_HIGHLIGHTS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name")
_LONG_VALUE = 120  # characters of a metadata value shown (modelspec.thumbnail is a whole image)


def _metadata_highlights(metadata: dict[str, str]) -> dict[str, str]:
    keys = [k for k in _HIGHLIGHTS if k in metadata] + sorted(k for k in metadata if k.startswith("modelspec."))
    return {k: _shorten(str(metadata[k])) for k in keys}


def _shorten(text: str) -> str:
    return text if len(text) <= _LONG_VALUE else f"{text[:_LONG_VALUE]}... ({len(text)} characters)"


def _training_tool(metadata: dict[str, str]) -> str | None:
    """The trainer as the header tells it, when it does."""
    import json

    software = metadata.get("software")
    if software:
        try:
            name = json.loads(software).get("name")
        except (ValueError, AttributeError):
            name = None
        return _shorten(str(name or software))
    if metadata.get("modelspec.implementation"):
        return _shorten(metadata["modelspec.implementation"])
    if any(k.startswith("ss_") for k in metadata):
        return "kohya sd-scripts or a trainer writing its ss_* fields"
    if "lora_adapter_metadata" in metadata:
        return "diffusers / PEFT"
    return None


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    return f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.1f} MiB"


def _lora_columns(record: dict[str, Any]) -> dict[str, str]:
    """A record as the text forms print it."""
    join = ", ".join
    modules = record.get("modules") or {}
    return {
        "format": str(record.get("format", "-")),
        "rank": join(map(str, record.get("ranks") or [])) or "-",
        "alpha": join(f"{a:g}" for a in record.get("alphas") or []) or "-",
        "modules": join(f"{group} {count}" for group, count in modules.items()) or "-",
        "base model": str(record.get("base_model") or "-"),
    }


def _lora_table(records: list[dict[str, Any]]) -> str:
    """One line a file; a refused file's line ends with why."""
    rows = [["name", "size", "hash", "format", "rank", "alpha", "modules", "base model"]]
    for r in records:
        rest = ["refused: " + r["error"]] if "error" in r else list(_lora_columns(r).values())
        rows.append([r["name"], _size_text(r["size"]), r["short_hash"], *rest])
    # The last cell of a row is not padded, so a refusal's text does not widen the format column.
    widths = [max((len(row[i]) for row in rows if i < len(row) - 1), default=0) for i in range(len(rows[0]))]
    lines = ("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]]) for row in rows)
    return "\n".join(lines)


def _lora_text(record: dict[str, Any]) -> str:
    """`lora inspect` as readable lines."""
    rows = [
        ("name", record["name"]),
        ("path", record["path"]),
        ("size", f"{_size_text(record['size'])} ({record['size']} bytes)"),
        ("sha256", record["sha256"]),
        ("short hash", f"{record['short_hash']} (A1111's Lora hashes, Civitai's AutoV2)"),
        *((("keys", str(record["keys"])),) if "keys" in record else ()),
        *(() if "error" in record else tuple(_lora_columns(record).items())),
        *((("trained with", record["tool"]),) if record.get("tool") else ()),
        *((k, v) for k, v in (record.get("metadata") or {}).items()),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _choice_text(choice: Any) -> str:
    from .device import dtype_name

    return f"{dtype_name(choice.dtype)}  ({choice.reason})"


def _model_for_from(config: Any, args: argparse.Namespace, meta: dict[str, Any]) -> Any:
    """`--from` means "make this again": the image's recorded model, unless --model or
    $ZTURBO_MODEL chose one. A recorded model this machine cannot find (a directory elsewhere, a
    hub model out of reach) leaves the configured one, with a warning that says so."""
    from .config import env
    from .loader import resolve_model

    recorded = meta.get("model")
    # A GGUF transformer alone still takes the recorded model's other parts; a full file set replaces it.
    replaced = config.component_files() and not config.gguf_transformer()
    if not recorded or args.model is not None or env("ZTURBO_MODEL") or replaced:
        return config
    try:
        resolve_model(recorded, weights=False)
    except ZTurboError as e:
        log.warning("the model recorded in %s is not available here (%s); using %s instead (--model chooses "
                    "another), so the pixels may differ", args.from_png, e, config.model)  # fmt: skip
        return config
    log.info("model %s, as recorded in %s (--model chooses another)", recorded, args.from_png)
    return dataclasses.replace(config, model=recorded)


def _model_text(config: Any) -> str:
    """The model `zturbo info` names, and where it would come from."""
    from .loader import describe_origin

    files = config.component_files()
    if files is not None and config.gguf_transformer():
        return f"{config.model}  ({describe_origin(config.model)}) + GGUF transformer {files['transformer']}"
    if files is not None:
        return " + ".join(files[c] for c in ("transformer", "text_encoder", "vae")) + "  (ComfyUI single files)"
    return f"{config.model}  ({describe_origin(config.model)})"


def _runtime_config(args: argparse.Namespace, **extra: Any) -> Any:
    from .config import RuntimeConfig

    return RuntimeConfig.from_env(
        model=args.model,
        transformer_file=getattr(args, "transformer_file", None),
        text_encoder_file=getattr(args, "text_encoder_file", None),
        vae_file=getattr(args, "vae_file", None),
        preset=args.preset,
        controlnet=getattr(args, "controlnet", None),
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
        compile_cache=args.compile_cache,
        lora_dir=getattr(args, "lora_dir", None),
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
        ("FlashAttention 3", _fa3_text(caps)),
        ("memory", memory_line(device)),
        ("model", _model_text(config)),
        ("profile", _profile_text(config)),
        ("controlnet", _controlnet_text(config.controlnet)),
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


def _profile_text(config: Any) -> str:
    """The model's profile and how it was chosen, resolved as the engine resolves it (the
    component files included). A local model's configs are read; a hub model is not downloaded
    for this, so its profile comes from the preset, its repo id and a GGUF transformer's name."""
    from pathlib import Path

    from .loader import resolve_model
    from .modelscope_source import split_hub
    from .profiles import choose_profile, scheduler_config, size_texts, transformer_file_profile

    files = config.component_files()
    local = Path(config.model).expanduser().is_dir() or config.model == TINY_MODEL
    if local or (files is not None and not config.gguf_transformer()):  # three files replace the model
        source = resolve_model(config.model, weights=False, files=files)
        chosen = source.profile(config.preset)
        shift = scheduler_config(chosen, source.config("scheduler")).get("shift")
    else:
        chosen = choose_profile(config.preset, {}, split_hub(config.model)[1])  # the repo id, without hf:/modelscope:
        if files is not None:  # a GGUF transformer beside the hub model
            chosen = transformer_file_profile(chosen, Path(files["transformer"]).name)
        shift = chosen.profile.shift if chosen.how != "assumed" else "read from the scheduler config at load"
    p = chosen.profile
    (s0, s1), (g0, g1) = p.steps_range, p.guidance_range
    negative = "used" if p.negative_prompt else "unused at guidance 0"
    return (
        f"{p.name} ({chosen.how}): {p.steps} steps, guidance {p.guidance:g}, negative prompt {negative}, "
        f"CFG normalization {p.cfg.normalization:g}, truncation {p.cfg.truncation:g}, scheduler shift {shift}; "
        f"recommended {s0}-{s1} steps, guidance {g0:g}-{g1:g}; sizes {' '.join(size_texts(p.sizes))}"
    )


def _controlnet_text(spec: str | None) -> str:
    """The configured ControlNet and its input width (read from its header; no weights load)."""
    if spec is None:
        return "none (--controlnet loads one)"
    from .control import controlnet_in_dim
    from .inputs.spec import INPAINT_CONTROL_DIM

    dim = controlnet_in_dim(spec)
    inpaint = "control and inpaint" if dim >= INPAINT_CONTROL_DIM else "control only"
    return f"{spec}  (control_in_dim {dim}: {inpaint})"


def _fa3_text(caps: Any) -> str:
    import importlib.util

    if importlib.util.find_spec("flash_attn_interface") is None:
        return "not installed"
    from .accel.attention import runs_on

    if runs_on(caps.compute_capability):
        return "installed; used by compiled blocks after a check"
    return "installed; needs a Hopper GPU (9.x)"


def _print_plan(args: argparse.Namespace, config: Any, device: Any, dtypes: dict[str, Any]) -> None:
    import torch

    from .loader import resolve_model
    from .memory import plan as memory
    from .request import GenerateRequest

    source = resolve_model(config.model, weights=False, files=config.component_files())
    GenerateRequest.create(
        "x",
        limits=source.limits(config.max_pixels, config.preset),
        width=args.width,
        height=args.height,
        batch=args.batch,
    )
    if config.vram_budget is not None:
        budget, where = int(config.vram_budget * memory.GIB), "--vram-budget"
    elif device.type == "cuda":
        budget, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        raise InvalidRequestError(f"{device} has no GPU memory to plan for; pass --vram-budget GiB to preview a GPU")
    shape = memory.shape_from_source(source, config.controlnet)  # the ControlNet's weights and activations too
    guided = source.profile(config.preset).profile.guidance > 0  # the base model's default CFG doubles the batch

    def choose(width: int, height: int, batch: int) -> Any:
        # A preview is of a GPU run, where --compile auto compiles the VAE decoder.
        return memory.choose(
            shape,
            memory.dtype_bytes(dtypes),
            budget,
            width=width,
            height=height,
            batch=batch,
            cfg=guided,
            quantize_options=(config.quantize,) if config.quantize != "none" else (),
            exact=config.quantize == "none",
            compiled_vae=config.compile != "off",
        )

    choice = choose(args.width, args.height, args.batch)
    print(f"\nplan for {args.width}x{args.height}, batch {args.batch}: budget {budget / memory.GIB:.2f} GiB ({where})")
    for est in choice.considered:
        mark = "  <- chosen" if est is choice.chosen else ""
        stages = ", ".join(f"{k} {v / memory.GIB:.2f}" for k, v in est.stages.items())
        print(f"  {est.label():<34} peak {est.peak / memory.GIB:6.2f} GiB  ({stages}){mark}")
    if choice.chosen is None:
        print("nothing fits: lower the resolution or batch, or free GPU memory")
    stored = config.quantize != "none" or config.gguf_transformer()  # no leanest-plan fallback for these
    print(_load_plan_note(args, config.memory, lambda: choose(_LOAD_PLAN_SIZE, _LOAD_PLAN_SIZE, 1).chosen, stored))


# `Engine.load` picks its memory plan for one image of this size; larger requests adapt at run
# time (a tiled VAE decode, one retry with a leaner plan after running out of memory).
_LOAD_PLAN_SIZE = 1024


def _load_plan_note(args: argparse.Namespace, memory_setting: str, load_choice: Any, refused: bool = False) -> str:
    """What the engine would load with, which is the table's choice only for the size it plans at;
    `refused`: where no plan fits, the load is refused (quantized or GGUF weights) rather than run
    with the leanest plan."""
    if memory_setting != "auto":
        return f"with --memory {memory_setting} the engine loads with that plan"
    size = f"{_LOAD_PLAN_SIZE}x{_LOAD_PLAN_SIZE}, batch 1"
    if (args.width, args.height, args.batch) == (_LOAD_PLAN_SIZE, _LOAD_PLAN_SIZE, 1):
        return f"with --memory auto the engine loads with the chosen plan (it plans for {size})"
    chosen = load_choice()
    if chosen is None and refused:
        return f"with --memory auto no plan fits {size}: the engine refuses to load (see the table above)"
    label = chosen.label() if chosen is not None else "the leanest plan (none fits)"
    return (
        f"with --memory auto the engine loads with {label}, its choice for {size}; a "
        f"{args.width}x{args.height}, batch {args.batch} request then tiles the VAE decode if it would not fit "
        "and retries once with a leaner plan if memory runs out (--memory PLAN picks the plan yourself)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
