"""`zturbo bench`: the command line's options checked into BenchOptions, then one of the runs
(speed, first image, memory caps, loading, LoRA, image inputs), its results written under --out
($OUT, ./bench)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import DeviceError, InvalidRequestError
from . import loading, memory, report, speed


def main(args: argparse.Namespace) -> int:
    if args.write_checkpoint or args.loading:
        return _loading(args)
    opts = options(args)
    if not opts.tiny and not torch.cuda.is_available():
        raise DeviceError("zturbo bench measures a CUDA GPU and none is available; --tiny runs a CPU smoke test")
    out_dir = _out_dir(args)
    if args.base or args.gguf is not None:
        return _model_rows(args, opts, out_dir)
    if args.steps is not None or args.gguf_dir:
        raise InvalidRequestError("--steps and --gguf-dir set the --base and --gguf runs; give one of them")
    if args.images:
        return _images(args, opts, out_dir)
    if args.cap_row or args.memory_caps or args.fp8_caps or args.int8_caps or args.gguf_caps is not None:
        return _memory_caps(args, opts, out_dir)
    if opts.first_image:
        return _first_image(opts, args.started, out_dir)
    if args.lora:
        return _lora(opts, out_dir)
    res = speed.run(opts, report=lambda r: report.write(r, out_dir))
    report.write(res, out_dir)
    print(report.markdown(res))
    print(f"\nfull results: {out_dir / 'bench.json'}")
    return 0


def options(args: argparse.Namespace) -> speed.BenchOptions:
    """The parsed command line as BenchOptions; InvalidRequestError names any bad value."""
    if not (args.random_weights or args.model or args.tiny):
        raise InvalidRequestError("zturbo bench needs --random-weights or --model DIR (a local checkpoint)")
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        raise InvalidRequestError(f"--sizes {args.sizes!r} is not a comma-separated list of integers") from None
    bad = [s for s in sizes if s <= 0 or s % 16]
    if bad:
        raise InvalidRequestError(f"--sizes {bad} are not positive multiples of 16")
    modes = tuple(m.strip() for m in args.quantize.split(",") if m.strip())
    if any(m not in ("none", "fp8") for m in modes):
        raise InvalidRequestError(f"--quantize {args.quantize!r}: each mode must be none or fp8")
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name} {getattr(args, name)} must be at least 1")
    return speed.BenchOptions(
        sizes=sizes,
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
        quantize=modes,
        reference=not args.no_reference,
        reference_compiled=args.reference_compiled,
        compile=not args.no_compile,
        tiny=args.tiny,
        model=args.model,
        profile=args.profile,
        first_image=args.first_image,
        fuse_ab=not args.no_fuse_ab,
        attention_ab=not args.no_attention_ab,
        eager_vae=args.eager_vae,
    )


def _out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or os.environ.get("OUT") or "bench")


def _first_image(opts: speed.BenchOptions, started: float, out_dir: Path) -> int:
    res = speed.first_image(opts, started)
    print(json.dumps(res, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"first_image_{res['quantize']}_{int(time.time())}.json"
    (out_dir / name).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _lora(opts: speed.BenchOptions, out_dir: Path) -> int:
    from . import lora

    def write(res: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_lora.json").write_text(json.dumps(res, indent=2, default=str) + "\n")

    res = lora.run(opts, write)
    write(res)
    print(lora.markdown(res))
    return 0


def _images(args: argparse.Namespace, opts: speed.BenchOptions, out_dir: Path) -> int:
    from . import images

    if args.lora or args.first_image or args.fp8_caps or args.int8_caps or args.gguf_caps is not None:
        raise InvalidRequestError(
            "--images runs on its own: drop --lora, --first-image, --fp8-caps, --int8-caps and --gguf-caps"
        )
    if "none" not in opts.quantize:
        raise InvalidRequestError(f"--images measures compiled bf16 (--quantize none), not --quantize {args.quantize}")
    if args.cap_row:  # a child process: one capped ControlNet row, as one JSON line
        kind, _, cap = args.cap_row.partition(":")
        if kind != "controlnet":
            raise InvalidRequestError(f"--cap-row {args.cap_row!r}: with --images the kind is controlnet")
        row = images.capped_row(float(cap or 0), opts.main_size, opts.runs, opts.tiny, opts.compile)
        print(json.dumps(row, default=str))
        return 0
    caps = _caps(args.memory_caps)
    print(images.describe(opts, caps), flush=True)

    def write(res: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_images.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out_dir / "bench_images.md").write_text(images.markdown(res) + "\n")

    res = images.run(opts, write)
    if caps:
        res["capped"] = images.run_caps(caps, opts, lambda rows: write(res | {"capped": rows}))
        write(res)
    print(images.markdown(res))
    print(f"\nfull results: {out_dir / 'bench_images.json'}")
    return 0


def _model_rows(args: argparse.Namespace, opts: speed.BenchOptions, out_dir: Path) -> int:
    """`--base` or `--gguf`: checked, run, written as bench_base.* or bench_gguf.*."""
    from . import base, gguf_rows

    qtypes = model_rows_request(args)
    name, markdown = ("bench_base", base.markdown) if args.base else ("bench_gguf", gguf_rows.markdown)

    def write(res: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out_dir / f"{name}.md").write_text(markdown(res) + "\n")

    if args.base:
        res = base.run(opts, args.steps, write)
    else:
        res = gguf_rows.run(opts, qtypes, args.steps, Path(args.gguf_dir) if args.gguf_dir else None, write)
    write(res)
    print(markdown(res))
    print(f"\nfull results: {out_dir / (name + '.json')}")
    return 0


def model_rows_request(args: argparse.Namespace) -> tuple[str, ...]:
    """The GGUF types `--gguf` names (none for `--base`); the options these rows cannot take are refused."""
    from .ggufwrite import check_qtype

    if args.base and args.gguf is not None:
        raise InvalidRequestError("--base and --gguf are separate runs: give one of them")
    others = [flag for flag, on in (("--model", args.model), ("--images", args.images), ("--lora", args.lora),
              ("--first-image", args.first_image), ("--memory-caps", args.memory_caps),
              ("--fp8-caps", args.fp8_caps), ("--int8-caps", args.int8_caps),
              ("--gguf-caps", args.gguf_caps is not None)) if on]  # fmt: skip
    if others:
        mode = "--base" if args.base else "--gguf"
        raise InvalidRequestError(f"{mode} runs on its own with random weights: drop {', '.join(others)}")
    if args.steps is not None and args.steps < 1:
        raise InvalidRequestError(f"--steps {args.steps} must be at least 1")
    qtypes = tuple(q.strip() for q in (args.gguf or "").split(",") if q.strip())
    if args.gguf is not None and not qtypes:
        raise InvalidRequestError(f"--gguf {args.gguf!r} names no GGUF type")
    for qtype in qtypes:
        check_qtype(qtype)
    return qtypes


def _caps(text: str | None) -> list[float]:
    try:
        return [float(c) for c in (text or "").split(",") if c.strip()]
    except ValueError:
        raise InvalidRequestError(f"{text!r} is not a comma-separated list of GiB (0 = uncapped)") from None


def gguf_caps(text: str | None) -> list[tuple[str, float]]:
    """`--gguf-caps TYPE:CAP,...` as (GGUF type, GiB) pairs; InvalidRequestError names a bad item."""
    from .ggufwrite import QTYPES

    pairs = []
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        qtype, colon, cap = item.partition(":")
        try:
            gib = float(cap)
        except ValueError:
            gib = -1.0
        if qtype not in QTYPES or not colon or not 0 <= gib < float("inf"):
            raise InvalidRequestError(
                f"--gguf-caps item {item!r} is not TYPE:CAP: TYPE one of {', '.join(QTYPES)}, CAP the GiB "
                "(0 = uncapped), e.g. --gguf-caps Q8_0:4,Q4_K:4"
            )
        pairs.append((qtype, gib))
    if text is not None and not pairs:
        raise InvalidRequestError(f"--gguf-caps {text!r} names no TYPE:CAP, e.g. --gguf-caps Q8_0:4")
    return pairs


def _memory_caps(args: argparse.Namespace, opts: speed.BenchOptions, out_dir: Path) -> int:
    size = opts.sizes[0]
    if args.cap_row:  # a child process: one row, as one JSON line
        kind, _, cap = args.cap_row.partition(":")
        try:
            memory.check_kind(kind)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"--cap-row {args.cap_row!r}: {e}") from None
        compile_ = not args.no_compile
        row = memory.row(kind, float(cap or 0), size, opts.runs, compile=compile_, tiny=opts.tiny)
        print(json.dumps(row, default=str))
        return 0

    def write(rows: list[dict[str, Any]]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_memory.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        (out_dir / "bench_memory.md").write_text(memory.markdown(rows) + "\n")

    caps, gguf = _caps(args.memory_caps), gguf_caps(args.gguf_caps)  # all checked before the first row
    quantized = {"fp8": _caps(args.fp8_caps), "int8": _caps(args.int8_caps)}
    rows = memory.run_caps(
        caps, size, opts.runs, opts.reference, quantized, write, gguf=gguf, tiny=opts.tiny, compile=opts.compile
    )
    print(memory.markdown(rows))
    return 0


def _loading(args: argparse.Namespace) -> int:
    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("the loading benchmark loads onto a CUDA GPU and none is available; --tiny uses the CPU")
    if args.write_checkpoint:
        root = loading.write_checkpoint(Path(args.write_checkpoint), device)
        print(f"wrote {root}")
    if args.load_row:  # a child process: one load, as one JSON line
        print(json.dumps(loading.load_row(args.load_row, Path(args.loading), device)))
        return 0
    if args.loading:
        rows = loading.run_loading(Path(args.loading), args.tiny, max(1, args.runs))
        out_dir = _out_dir(args)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_loading.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(loading.markdown(rows))
    return 0
