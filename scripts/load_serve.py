#!/usr/bin/env python3
"""Serving at the GPU's speed: `zturbo serve` under load, each number beside the engine's own, in one run.

1. The engine alone, in a child process that loads the same RuntimeConfig a server worker loads:
   seconds per image and images/s at each of --engine-batches (1, 4 and 8), at both sizes.
2. `zturbo serve --no-ui --model DIR` started with an empty compile cache: seconds from process
   start to /ready (cold), and to fully warm (the warm-up parts a worker runs after ready, done;
   the load waits for them). The server is then driven through the official `openai` client
   (b64_json, every image decoded and its size checked): the large size one request at a time
   (p50/p90 latency) and with 4 clients (images/s); the small size with 1 and with 16 clients.
3. The server stopped and started again on the same compile cache: seconds to /ready and to fully
   warm (warm). With --start-warm there is one start only: the server's first start finds the
   compile cache the engine's child filled and is reported as the warm start, the scenarios on it.
4. load.json and load.md in --out ($OUT, else ./load), rewritten after each phase so that a run
   cut short keeps what finished: the server's numbers, the engine's, their ratios and the
   acceptance checks of issue 24.

Every request has its own prompt (of one token length) and seed, so the prompt cache never skips
the text encoder, on either side. In each scenario every client builds its client first, then sends
--warmup-rounds untimed requests and the scenario's timed ones (--rounds, or its own in --scenarios)
back to back, so the server is never idle
between the two and the shapes it batches are compiled and captured before the timed requests.
The headline images/s is the server's steady state: the timed images answered between the moment
the last client finished warming up and the moment the first client finished its timed requests
(when every client has a request in flight), the window's edges moved to whole bursts of answers
(one batch's), and the bursts inside it are recorded (their number and sizes, beside the batches the
workers' /metrics account counts, read at the same two moments). With several workers (--gpus) the
bursts of different GPUs can interleave, so the window's edges are exact for one worker only. The
wall rate stands beside it: the timed images answered from the same start (every client in its timed
requests) to the last timed answer, over those seconds, so it includes the tail in which the clients
finish one by one. The 16-client small scenario is also set beside the engine at the batch the
server averaged (its answers over its batches in the account's window, to the nearest engine batch).

    python scripts/load_serve.py --model /tmp/zi                       # a GPU, real-size weights
    python scripts/load_serve.py --model tiny-random --device cpu --compile off \\
        --large 64 --small 32 --steps 1 --rounds 3                     # the CPU smoke run
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

PROMPT = (
    "A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field, "
    "highly detailed fur, 85mm lens."
)
# The acceptance of issue 24: what the server must deliver, relative to the engine in the same run.
LATENCY_FACTOR, LATENCY_SLACK_S = 1.05, 0.020  # one at a time: p50 <= engine image time * 1.05 + 20 ms
SHARE_OF_BATCH1 = 0.97  # large size, 4 clients: >= 97 % of the engine's batch-1 images/s
SHARE_OF_BATCH = 1.0  # small size, 16 clients: >= the engine's images/s at --max-batch
WARM_READY_S = 30.0  # a restart on the same compile cache is ready within 30 s
PREVIEW_COST = 0.02  # previews on cost under 2 % of an image's time
# Serve flags of issue 24 that a checkout may not have yet; each is passed only where `serve --help` lists it.
OPTIONAL_SERVE_FLAGS = ("--compile-cache", "--batch-window-ms", "--client-defaults")


@dataclass(frozen=True)
class Scenario:
    key: str
    size: int
    clients: int
    rounds: int  # timed requests per client


@dataclass
class Check:
    name: str
    server: float
    engine: float | None
    target: str
    met: bool


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (`zturbo bench --write-checkpoint DIR`)")
    p.add_argument("--device", default=None, help="passed to the engine and to `zturbo serve` (default auto)")
    p.add_argument("--compile", default=None, choices=("auto", "on", "off"), help="passed to both (default auto)")
    p.add_argument("--quantize", default=None, help="passed to both (default none)")
    p.add_argument(
        "--gpus",
        default=None,
        help="passed to `zturbo serve`: a worker per GPU, e.g. 0,1,2,3 (engine rows: one GPU). With several "
        "workers the bursts of answers of different GPUs can interleave: the steady window's edges (whole "
        "bursts) are exact for one worker only",
    )
    p.add_argument("--large", type=int, default=1024, help="the large square size (default 1024)")
    p.add_argument("--small", type=int, default=512, help="the small square size (default 512)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 8)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="the engine batch the 16-client small scenario's acceptance compares against (default 4); "
        "one of --engine-batches. The server batches by its own defaults",
    )
    p.add_argument(
        "--engine-batches",
        default="1,4,8",
        help="the engine's batch rows, comma-separated (default 1,4,8: the server batches up to 8 at 512²)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="timed requests per client in each scenario (default 8). images/s counts those answered from "
        "the last client's end of warm-up to the first client's last answer, while every client is sending: "
        "with C clients and batches of B, about (rounds - 1) x C / B batches (steady_bursts, "
        "steady_burst_sizes). images_per_s_wall counts from the same start to the last timed answer, the "
        "tail in which the clients finish one by one included",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help="which scenarios run, each with its own timed rounds: 'KEY[:ROUNDS],...' with KEY one of "
        "LARGEx1, LARGEx4, SMALLx1, SMALLx16 (e.g. '512x1:60,1024x1'; default: all four, --rounds each)",
    )
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="untimed requests per client first, followed by its timed ones without a pause (default 2)",
    )
    p.add_argument("--engine-runs", type=int, default=5, help="timed engine calls per row (default 5)")
    p.add_argument("--engine-warmup", type=int, default=3, help="untimed engine calls per row first (default 3)")
    phase_flags(p)
    args = p.parse_args(argv)
    check_args(args)
    return args


def phase_flags(p: argparse.ArgumentParser) -> None:
    """The flags that pick which phases run, on which caches, and where their output goes."""
    p.add_argument("--output-format", default=None, help="the requests' output_format (default: not sent, png)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine's rows (no ratios then)")
    p.add_argument("--no-restart", action="store_true", help="skip the warm restart")
    p.add_argument("--no-serve", action="store_true", help="skip the cold start and the scenarios")
    p.add_argument("--no-load", action="store_true", help="start the server cold but send it no requests")
    p.add_argument(
        "--start-warm",
        action="store_true",
        help="the server's one start (no restart) finds the compile cache in --work that the engine's child "
        "filled (--engine-cache WORK/compile-cache) or an earlier run left, and is reported as the warm "
        "start, the scenarios run on it; refused where neither fills it, and just before the start where "
        "it is empty",
    )
    p.add_argument(
        "--warm-only",
        action="store_true",
        help="only the warm start, on the compile cache a run with --no-restart left in --work",
    )
    p.add_argument(
        "--engine-cache",
        default=None,
        help="the engine child's compile cache (default: WORK/engine-cache, an empty one of its own); a server "
        "run's --work DIR/compile-cache saves its compiling, for a run split over calls on one machine, and "
        "is the one --start-warm needs filled",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="LOAD_JSON",
        help="no run: one report from the load.json files of a run split over several calls",
    )
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `zturbo serve` (repeatable; --serve-arg=--ray --serve-arg=auto measures a Ray "
        "Serve deployment, docs/ray.md)",
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a start may take (default 600)")
    p.add_argument("--work", default=None, help="data and compile caches (default: a temporary directory)")
    p.add_argument("--out", default=None, help="where load.json, load.md and the logs go (default $OUT or ./load)")
    p.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the engine's child process


def check_args(args: argparse.Namespace) -> None:
    """Refuse a bad value with one line naming it and what is allowed, before anything starts."""
    for flag in ("large", "small"):
        value = getattr(args, flag)
        if value <= 0 or value % 16:
            refuse(f"--{flag} {value} must be a positive multiple of 16")
    for flag, least in (
        ("max_batch", 1),
        ("rounds", 1),
        ("engine_runs", 1),
        ("warmup_rounds", 0),
        ("engine_warmup", 0),
    ):
        if getattr(args, flag) < least:
            name = "--" + flag.replace("_", "-")
            refuse(f"{name} {getattr(args, flag)} must be at least {least}")
    if args.steps is not None and args.steps < 1:
        refuse(f"--steps {args.steps} must be at least 1")
    if not args.ready_timeout > 0:
        refuse(f"--ready-timeout {args.ready_timeout} must be a positive number")
    local = args.model != "tiny-random" and ("/" not in args.model or args.model.startswith((".", "/", "~")))
    if local and not args.merge and not Path(args.model).expanduser().is_dir():
        refuse(f"--model {args.model} is not a directory; write one with `zturbo bench --write-checkpoint DIR`")
    if args.warm_only and not (args.work and _filled(Path(args.work) / "compile-cache")):
        refuse(f"--warm-only needs --work DIR holding an earlier run's compile-cache; got --work {args.work}")
    check_batches(args)
    scenarios(args)  # a bad --scenarios item is refused here
    if args.start_warm:
        check_start_warm(args)


def check_batches(args: argparse.Namespace) -> None:
    """--engine-batches: positive whole numbers, --max-batch among them (the acceptance's reference row)."""
    try:
        batches = engine_batches(args)
    except ValueError:
        refuse(f"--engine-batches {args.engine_batches} must be comma-separated whole numbers, e.g. 1,4,8")
    if not batches or min(batches) < 1:
        refuse(f"--engine-batches {args.engine_batches} must be comma-separated numbers of at least 1")
    if args.max_batch not in batches:
        refuse(f"--max-batch {args.max_batch} must be one of --engine-batches {args.engine_batches}")


def engine_batches(args: argparse.Namespace) -> list[int]:
    """The engine's batch rows, ascending (a merged load.json's options may hold them as a list)."""
    given = args.engine_batches
    parts = given if isinstance(given, list) else [p for p in str(given).split(",") if p.strip()]
    return sorted({int(p) for p in parts})


def check_start_warm(args: argparse.Namespace) -> None:
    """--start-warm reports the server's one start as warm, so its compile cache must be warm: the
    engine's child fills WORK/compile-cache only where --engine-cache names it (its default is
    WORK/engine-cache), or an earlier run left it filled."""
    cache = Path(args.work).expanduser().resolve() / "compile-cache" if args.work else None
    engine = Path(args.engine_cache).expanduser().resolve() if args.engine_cache else None
    if cache is not None and (_filled(cache) or (engine == cache and not args.no_engine)):
        return
    refuse(
        "--start-warm needs a warm compile cache: --work DIR with --engine-cache DIR/compile-cache (the engine "
        f"rows on), or a DIR/compile-cache an earlier run filled; got --work {args.work}, "
        f"--engine-cache {args.engine_cache}{', --no-engine' if args.no_engine else ''}"
    )


def _filled(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def refuse(message: str) -> NoReturn:
    """A bad flag: one line naming it, exit status 2 (as argparse's own refusals)."""
    print(f"load_serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The four scenarios in order, or those --scenarios picks, each with its rounds."""
    large, small = args.large, args.small
    pairs = ((large, 1), (large, 4), (small, 1), (small, 16))
    every = {f"{size}x{clients}": (size, clients) for size, clients in pairs}
    rounds = scenario_rounds(args.scenarios, list(every), args.rounds)
    return [Scenario(key, *every[key], rounds[key]) for key in every if key in rounds]


def scenario_rounds(spec: str | None, keys: list[str], default: int) -> dict[str, int]:
    """--scenarios 'KEY[:ROUNDS],...' as {key: rounds}; None: every key with the default."""
    if spec is None:
        return dict.fromkeys(keys, default)
    out: dict[str, int] = {}
    for item in spec.split(","):
        key, _, count = item.strip().partition(":")
        if key not in keys or key in out or (count and not (count.isdecimal() and int(count) >= 1)):
            allowed = ", ".join(keys)
            refuse(f"--scenarios item {item!r}: want KEY or KEY:ROUNDS, each KEY once, one of {allowed}, ROUNDS >= 1")
        out[key] = int(count) if count else default
    return out


def prompts(start: int = 0) -> Iterator[tuple[str, int]]:
    """(prompt, seed) pairs, each prompt new and of one token length (the number's digits are
    tokens of their own, and zero-padding keeps their count)."""
    for i in itertools.count(start):
        yield f"{PROMPT} Variation {i:06d}.", i


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- the engine alone ---------------------------------------------------------------------------


def engine_config(args: argparse.Namespace, cache: Path | None) -> Any:
    """The RuntimeConfig a server worker would load for these flags (and, where the checkout has
    the field, this compile cache)."""
    from zturbo.config import RuntimeConfig

    given = {"model": args.model, "device": args.device, "compile": args.compile, "quantize": args.quantize}
    if cache is not None and "compile_cache" in RuntimeConfig.__dataclass_fields__:
        given["compile_cache"] = cache
    return RuntimeConfig.from_env(**given)


def engine_rates(engine: Any, args: argparse.Namespace, pairs: Iterator[tuple[str, int]]) -> dict[str, Any]:
    """Seconds per engine call (prompt to 8-bit images, no encoding) and images/s at each of
    --engine-batches, for both sizes: medians of --engine-runs after --engine-warmup calls."""
    rows: dict[str, Any] = {}
    steps = {} if args.steps is None else {"steps": args.steps}
    for size in (args.large, args.small):
        for batch in engine_batches(args):
            times, stages = [], []
            for _ in range(args.engine_warmup + args.engine_runs):
                batch_pairs = [next(pairs) for _ in range(batch)]
                tick = time.perf_counter()
                result = engine.generate([p for p, _ in batch_pairs], seed=batch_pairs[0][1], width=size,
                                         height=size, **steps)  # fmt: skip
                times.append(time.perf_counter() - tick)
                stages.append(result.timings)
            median = statistics.median(times[args.engine_warmup :])
            timed = stages[args.engine_warmup :]
            rows[f"{size}x{batch}"] = {
                "size": size,
                "batch": batch,
                "median_s": median,
                "images_per_s": batch / median,
                "runs_s": times[args.engine_warmup :],
                # the engine's own stages (`GenerateResult.timings`), as the server's workers report them
                "stages_s": {k: statistics.median(t.get(k, 0.0) for t in timed) for k in timed[0]},
            }
    return rows


def preview_cost(engine: Any, args: argparse.Namespace, pairs: Iterator[tuple[str, int]]) -> dict[str, Any]:
    """The cost of previews at the large size, batch 1: calls with the server worker's preview
    callback (a JPEG of each step's preview) alternate with plain calls; the medians of
    --engine-runs each, after one untimed call with previews (which fits the projection)."""
    from zturbo.preview import jpeg_bytes

    steps = {} if args.steps is None else {"steps": args.steps}

    def on_preview(_step: int, _steps: int, images: list[Any]) -> None:
        for image in images:
            jpeg_bytes(image)

    def timed(previews: bool) -> float:
        prompt, seed = next(pairs)
        extra = {"on_preview": on_preview} if previews else {}
        tick = time.perf_counter()
        engine.generate(prompt, seed=seed, width=args.large, height=args.large, **steps, **extra)
        return time.perf_counter() - tick

    timed(True)
    plain, shown = [], []
    for _ in range(args.engine_runs):
        plain.append(timed(False))
        shown.append(timed(True))
    plain_s, preview_s = statistics.median(plain), statistics.median(shown)
    return {
        "size": args.large,
        "plain_s": plain_s,
        "preview_s": preview_s,
        "overhead": preview_s / plain_s - 1,
        "plain_runs_s": plain,
        "preview_runs_s": shown,
    }


def engine_main(args: argparse.Namespace) -> int:
    """The child process: load, time, print one JSON line."""
    from zturbo.engine import Engine

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    tick = time.perf_counter()
    engine = Engine.load(engine_config(args, Path(cache).parent if cache else None))
    load_s = time.perf_counter() - tick
    pairs = prompts(10**5)
    rows = engine_rates(engine, args, pairs)
    previews = preview_cost(engine, args, pairs)
    result = {"load_s": load_s, "device": device_name(engine.device), "rows": rows, "previews": previews}
    print(json.dumps(result | {"runtime": engine.runtime()}, default=str))
    return 0


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure_engine(args: argparse.Namespace, argv: Sequence[str], work: Path, out: Path) -> dict[str, Any]:
    """The engine's rows, measured in a child process that exits (freeing the GPU) before a server starts."""
    env = child_env(Path(args.engine_cache) if args.engine_cache else work / "engine-cache")
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--engine-only"]
    with open(out / "engine.log", "wb") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, check=False)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the engine's child process exited {proc.returncode}; see {out / 'engine.log'}")
    return json.loads(lines[-1])


# --- the server ----------------------------------------------------------------------------------


def child_env(cache: Path, api_key: str | None = None) -> dict[str, str]:
    """The environment of a child: this checkout's zturbo first on the path, and every compile
    cache inside `cache`, so that a cold start finds none and a warm one finds the last start's."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    # As `zturbo` sets it for its own processes, so the engine's child runs as a worker does.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.pop("ZTURBO_API_KEY", None)
    if api_key:
        env["ZTURBO_API_KEY"] = api_key
    return env


def serve_features(help_text: str) -> list[str]:
    """The optional flags of issue 24 that this checkout's `zturbo serve` has."""
    return [flag for flag in OPTIONAL_SERVE_FLAGS if flag in help_text]


def serve_command(args: argparse.Namespace, port: int, work: Path, features: Sequence[str]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "zturbo.cli",
        "serve",
        "--model",
        args.model,
        "--no-ui",
        "--port",
        str(port),
        "--data-dir",
        str(work / "data"),
        "--log-level",
        "warning",
    ]
    for flag in ("device", "compile", "quantize", "gpus"):
        if getattr(args, flag, None) is not None:
            cmd += [f"--{flag}", getattr(args, flag)]
    if "--compile-cache" in features:
        cmd += ["--compile-cache", str(work / "compile-cache")]
    # The server batches by its own defaults (--max-batch, --max-batch-pixels), as a user's server
    # does; --serve-arg changes them.
    return cmd + list(args.serve_arg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `zturbo serve` process: started, timed to /ready, stopped."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Seconds from the process's start to its first 200 from /ready, and what /ready said."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            body = self._ready()
            if body is not None:
                return {"ready_s": time.perf_counter() - self.started, "ready": body}
            time.sleep(0.05)
        raise RuntimeError(f"zturbo serve was not ready within {timeout:g} s; see {self.log_path}")

    def wait_warm(self, ready: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Seconds from the process's start until the worker /ready reports on has run the warm-up
        parts it leaves until after ready (`warm_s` in /ready), and what /ready said then: no timed
        request waits for one of them. A server that warms every part before ready (its worker
        phases hold `first_call_s`) is warm at ready."""
        if "first_call_s" in ready.get("worker_phases", {}):
            return {}
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            body = self._ready()
            if body is not None and "warm_s" in body:
                return {"warm_s": time.perf_counter() - self.started, "warm": body}
            time.sleep(0.05)
        raise RuntimeError(f"zturbo serve was not fully warm within {timeout:g} s; see {self.log_path}")

    def _ready(self) -> dict[str, Any] | None:
        """What /ready says once it answers 200; None before."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"zturbo serve exited {self.proc.returncode} before ready; see {self.log_path}")
        try:
            with urllib.request.urlopen(self.url + "/ready", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- the clients ---------------------------------------------------------------------------------


def one_request(client: Any, size: int, pair: tuple[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """One images.generate call: when it was sent and answered (`sent`, `done`, perf_counter), its
    latency, and its image decoded and checked (or the error)."""
    from PIL import Image

    extra: dict[str, Any] = {"seed": pair[1]} | ({} if args.steps is None else {"steps": args.steps})
    fmt = {} if args.output_format is None else {"output_format": args.output_format}
    tick = time.perf_counter()
    try:
        res = client.images.generate(
            prompt=pair[0], size=f"{size}x{size}", n=1, response_format="b64_json", extra_body=extra, **fmt
        )
        done = time.perf_counter()  # the answer is in; decoding it below is the load generator's own time
        image = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
        if image.size != (size, size) or len(res.data) != 1:
            error = f"got {len(res.data)} image(s), the first {image.size[0]}x{image.size[1]}"
            return {"sent": tick, "done": done, "error": error}
        b64 = res.data[0].b64_json
        return {
            "sent": tick,
            "done": done,
            "latency_s": done - tick,
            "format": image.format,
            "bytes": len(b64) * 3 // 4,
        }
    except Exception as e:  # one failed request is counted and named, not the end of the run
        return {"sent": tick, "done": time.perf_counter(), "error": f"{type(e).__name__}: {str(e)[:300]}"}


class Edges:
    """The steady-state window's edges as the clients cross them: `warm` is set once every client has
    finished its warm-up requests, `finished` once the first client has finished its timed ones."""

    def __init__(self, clients: int) -> None:
        self._lock = threading.Lock()
        self._warming = clients
        self.warm = threading.Event()
        self.finished = threading.Event()

    def warmed(self) -> None:
        with self._lock:
            self._warming -= 1
            if self._warming == 0:
                self.warm.set()


def drive(
    url: str, key: str, sc: Scenario, args: argparse.Namespace, pairs: Iterator[tuple[str, int]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`sc.clients` clients at once, each sending --warmup-rounds then `sc.rounds` requests one after
    another with no pause between the two (the server never idles for a barrier), and the workers'
    /metrics account read at the window's edges: every request (with its client and whether it
    warmed up), and the readings `start` and `end`."""
    from openai import OpenAI

    warmup, total = args.warmup_rounds, args.warmup_rounds + sc.rounds
    # Drawn here: a generator's next() from several threads at once raises.
    plans = [[next(pairs) for _ in range(total)] for _ in range(sc.clients)]
    edges = Edges(sc.clients)
    readings: dict[str, Any] = {}

    def client_loop(index: int) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        warmed = False
        try:  # built before any request, so no client's construction falls in a timed window
            with OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=args.ready_timeout) as client:
                for i, pair in enumerate(plans[index]):
                    if i == warmup:
                        edges.warmed()
                        warmed = True
                    done.append(one_request(client, sc.size, pair, args) | {"client": index, "warmup": i < warmup})
        finally:  # set even where a client failed, so that the monitor never waits for ever
            if not warmed:
                edges.warmed()
            edges.finished.set()
        return done

    def monitor() -> None:
        # Each reading lands moments after its edge: the edges are approximate, by one /metrics request.
        try:
            edges.warm.wait()
            readings["start_at"] = time.perf_counter()
            readings["start"] = worker_account(url, key)
            edges.finished.wait()
            readings["end_at"] = time.perf_counter()
            readings["end"] = worker_account(url, key)
        except Exception as e:  # raised again in the caller's thread, after the clients
            readings["error"] = e

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(sc.clients) as pool:
        records = [r for results in pool.map(client_loop, range(sc.clients)) for r in results]
    watcher.join()
    if "error" in readings:
        raise readings["error"]
    return records, readings


def window_edges(records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """When every client was in its timed requests: from the moment the last client finished its
    warm-up (its first timed send where there was none) to the moment the first client finished
    its timed requests."""
    entered, left = [], []
    for c in sorted({r["client"] for r in records}):
        mine = [r for r in records if r["client"] == c]
        warm, timed = [r for r in mine if r["warmup"]], [r for r in mine if not r["warmup"]]
        entered.append(warm[-1]["done"] if warm else timed[0]["sent"] if timed else math.inf)
        left.append(timed[-1]["done"] if timed else -math.inf)
    return max(entered, default=math.inf), min(left, default=-math.inf)


def steady_window(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images/s in the server's steady state, between the `window_edges` (every client has a request
    in flight). The edges move to whole bursts of completions (a batch's answers arrive together): the
    window opens at the end of the first burst that ends at or after the start, and closes at the end
    of the last burst that begins at or before the end; the timed images answered in between, over its
    seconds, and the bursts in it (`steady_bursts`, `steady_burst_sizes`: how the answers came, beside
    the batches /metrics counts). With several workers (--gpus) the bursts of different GPUs can
    interleave into one, so the edges are exact for one worker only. None, with the reason, where
    fewer than two bursts bound it."""
    start, end = window_edges(records)
    answered = [r for r in records if "latency_s" in r]
    clients = len({r["client"] for r in records})
    bursts = _bursts(sorted(r["done"] for r in answered), _burst_gap(answered, clients))
    opened = next((b[-1] for b in bursts if b[-1] >= start), None)
    closed = next((b[-1] for b in reversed(bursts) if b[0] <= end), None)
    if opened is None or closed is None or closed <= opened:
        reason = "fewer than two bursts of answers while every client was in its timed requests"
        none = {"steady_window_s": 0.0, "steady_images": 0, "steady_bursts": 0, "steady_burst_sizes": []}
        return {"images_per_s": None, **none, "steady_reason": reason}
    images = sum(1 for r in answered if not r["warmup"] and opened < r["done"] <= closed)
    inside = [len(b) for b in bursts if opened < b[-1] <= closed]  # whole bursts: the edges are burst ends
    window = {"steady_window_s": closed - opened, "steady_images": images, "steady_reason": None}
    bursts_in = {"steady_bursts": len(inside), "steady_burst_sizes": inside}
    return {"images_per_s": images / (closed - opened), **window, **bursts_in}


def wall_rate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images/s from the window's start (every client in its timed requests, so no untimed request
    shares the span) to the last timed answer: the timed images answered in that span over its
    seconds. Unlike the steady rate it includes the tail in which the clients finish one by one."""
    start = window_edges(records)[0]
    done = [r["done"] for r in records if not r["warmup"] and "latency_s" in r and r["done"] > start]
    span = max(done) - start if done else 0.0
    return {
        "images_per_s_wall": len(done) / span if span > 0 else None,
        "wall_window_s": span,
        "wall_images": len(done),
    }


def _burst_gap(answered: Sequence[dict[str, Any]], clients: int) -> float:
    """The longest pause between two answers of one burst: half the mean spacing of answers under
    continuous load (the median latency over the clients), which is at most half the spacing of two
    batches of any size and far above the few ms between the answers of one batch; and under half
    the shortest latency, so that one client's answers (never of one batch) are never one burst."""
    latencies = [r["latency_s"] for r in answered]
    if not latencies:
        return 0.0
    return 0.5 * min(statistics.median(latencies) / max(clients, 1), min(latencies))


def _bursts(times: Sequence[float], gap: float) -> list[list[float]]:
    """Sorted times in runs whose neighbours are at most `gap` apart."""
    runs: list[list[float]] = []
    for t in times:
        if runs and t - runs[-1][-1] <= gap:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def run_scenario(url: str, key: str, sc: Scenario, args: argparse.Namespace, pairs: Iterator[Any]) -> dict[str, Any]:
    """Warm-up then timed requests under continuous load: images/s in the steady-state window (and
    from its start to the last timed answer, the tail included), latencies over every timed request,
    and the workers' account per batch over the same window with the answers that fell in it."""
    records, readings = drive(url, key, sc, args, pairs)
    timed = [r for r in records if not r["warmup"]]
    latencies = [r["latency_s"] for r in timed if "latency_s" in r]
    errors = [r["error"] for r in records if "error" in r]
    wall = max(r["done"] for r in timed) - min(r["sent"] for r in timed) if timed else 0.0
    at = (readings["start_at"], readings["end_at"])
    answers = sum(1 for r in records if "latency_s" in r and at[0] < r["done"] <= at[1])
    row: dict[str, Any] = {
        **asdict(sc),
        "requests": len(timed),
        "images": len(latencies),
        "wall_s": wall,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "formats": sorted({r["format"] for r in timed if "format" in r}),
        **steady_window(records),
        **wall_rate(records),
        "per_batch_s": per_batch(readings["start"], readings["end"]),
        "account_window_s": at[1] - at[0],  # beside steady_window_s: how close
        "account_images": answers,  # answered between the two readings: over per_batch_s's batches, the mean batch
    }
    if latencies:
        row |= {
            "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9),
            "mean_s": statistics.fmean(latencies),
        }
    return row


def worker_account(url: str, key: str) -> dict[str, float]:
    """The server's /metrics sums over its workers: seconds by phase (engine, host, idle), the engine's
    by its stages (`stage:encode_s`, ...), and batches."""
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        text = r.read().decode()
    sums: dict[str, float] = {"batches": 0.0}
    for line in text.splitlines():
        if line.startswith("zturbo_worker_seconds_total{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            sums[phase] = sums.get(phase, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("zturbo_engine_stage_seconds_total{"):
            stage = "stage:" + line.split('stage="', 1)[1].split('"', 1)[0]
            sums[stage] = sums.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("zturbo_batch_jobs_count "):
            sums["batches"] = float(line.rsplit(" ", 1)[1])
    return sums


def per_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The workers' seconds per batch by phase between two `worker_account` readings, and the batches."""
    batches = after["batches"] - before["batches"]
    phases = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / batches for k in after if k != "batches"} if batches else {}
    return {"batches": batches, **phases}


# --- the report ----------------------------------------------------------------------------------


def checks(res: dict[str, Any], args: argparse.Namespace) -> list[Check]:
    """The acceptance of issue 24, for each number this run has."""
    rows, runs, starts = res.get("engine", {}).get("rows", {}), res.get("scenarios", {}), res.get("starts", {})
    large, small, batch = args.large, args.small, args.max_batch
    out = []
    one, single = runs.get(f"{large}x1", {}), rows.get(f"{large}x1")
    if "p50_s" in one and single:
        limit = single["median_s"] * LATENCY_FACTOR + LATENCY_SLACK_S
        target = f"<= {LATENCY_FACTOR:g} x engine + {LATENCY_SLACK_S * 1000:g} ms = {limit:.3f} s"
        out.append(
            Check(f"{large}² one at a time: p50 s", one["p50_s"], single["median_s"], target, one["p50_s"] <= limit)
        )
    four = runs.get(f"{large}x4", {})
    if _rate(four) and single:
        share = four["images_per_s"] / single["images_per_s"]
        out.append(
            Check(
                f"{large}² 4 clients: images/s vs engine batch 1",
                four["images_per_s"],
                single["images_per_s"],
                f">= {SHARE_OF_BATCH1:.0%} of engine",
                share >= SHARE_OF_BATCH1,
            )
        )
    many, batched = runs.get(f"{small}x16", {}), rows.get(f"{small}x{batch}")
    if _rate(many) and batched:
        share = many["images_per_s"] / batched["images_per_s"]
        out.append(
            Check(
                f"{small}² 16 clients: images/s vs engine batch {batch}",
                many["images_per_s"],
                batched["images_per_s"],
                f">= {SHARE_OF_BATCH:.0%} of engine",
                share >= SHARE_OF_BATCH,
            )
        )
    previews = res.get("engine", {}).get("previews")
    if previews:
        out.append(
            Check(
                f"{large}² previews on: s per image",
                previews["preview_s"],
                previews["plain_s"],
                f"< {PREVIEW_COST:.0%} more than without",
                previews["overhead"] < PREVIEW_COST,
            )
        )
    if "warm" in starts:
        out.append(warm_check(starts["warm"]))
    return out


def warm_check(start: dict[str, Any]) -> Check:
    """A warm start is timed only where its worker reused the compiled artifacts: /ready saying
    compile_cache "miss" (or "off", or nothing) means it compiled, or did not compile at all, so its
    seconds are no warm start's and the check is not met, whatever they are."""
    ready, said = start["ready_s"], start["ready"].get("compile_cache")
    target = f"<= {WARM_READY_S:g} s, /ready compile_cache hit" + ("" if said == "hit" else f" (said {said})")
    return Check("start to ready, warm compile cache: s", ready, None, target, ready <= WARM_READY_S and said == "hit")


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    """Every server number beside the engine's at batch 1 and at --max-batch (and the 16-client small
    scenario beside the engine at the batch the server averaged), the starts, the acceptance checks."""
    rows, n = res.get("engine", {}).get("rows", {}), args.max_batch
    lines = [
        f"| scenario | server images/s, steady | server images/s, wall | p50 s | p90 s | engine images/s, batch 1 "
        f"| engine images/s, batch {n} | server / batch 1 | server / batch {n} | engine s/image, batch 1 "
        "| server / engine at its batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in res.get("scenarios", {}).values():
        one, many = rows.get(f"{sc['size']}x1", {}), rows.get(f"{sc['size']}x{n}", {})
        own = _at_its_batch(sc, rows) if (sc["size"], sc["clients"]) == (args.small, 16) else "-"
        lines.append(
            f"| {sc['size']}² x {sc['clients']} client(s){_notes(sc, many)} | {_num(sc, 'images_per_s')} | "
            f"{_num(sc, 'images_per_s_wall')} | "
            f"{_num(sc, 'p50_s')} | {_num(sc, 'p90_s')} | {_num(one, 'images_per_s')} | "
            f"{_num(many, 'images_per_s')} | {_share(sc, one)} | {_share(sc, many)} | "
            f"{_num(one, 'median_s')} | {own} |"
        )
    lines += ["", "| start | process start to /ready, s | to fully warm, s | what /ready said besides |"]
    lines.append("|---|---|---|---|")
    for kind, start in res.get("starts", {}).items():
        said = {k: v for k, v in start.get("warm", start["ready"]).items() if k not in ("status", "workers")}
        warm, told = f"{start['warm_s']:.1f}" if "warm_s" in start else "-", json.dumps(said) if said else "-"
        lines.append(f"| {kind} compile cache | {start['ready_s']:.1f} | {warm} | {told} |")
    lines += ["", "| check | server | engine | target | met |", "|---|---|---|---|---|"]
    for c in res.get("checks", []):
        engine = "-" if c["engine"] is None else f"{c['engine']:.3f}"
        lines.append(f"| {c['name']} | {c['server']:.3f} | {engine} | {c['target']} | {'yes' if c['met'] else 'NO'} |")
    return "\n".join(lines)


def server_batch(sc: dict[str, Any]) -> float | None:
    """The batch the server averaged: the answers between the two /metrics readings over the batches
    the workers ran between them (a load.json from before `account_images`: the steady window's)."""
    batches = (sc.get("per_batch_s") or {}).get("batches")
    images = sc.get("account_images", sc.get("steady_images"))
    return images / batches if batches and images else None


def _at_its_batch(sc: dict[str, Any], rows: dict[str, Any]) -> str:
    """The server's rate over the engine's at the engine batch nearest the one the server averaged
    (a tie goes to the larger, the engine's better rate): like against like, beside --max-batch's."""
    mean = server_batch(sc)
    measured = sorted(r["batch"] for r in rows.values() if r.get("size") == sc["size"])
    if mean is None or not measured or not _rate(sc):
        return "-"
    nearest = min(measured, key=lambda b: (abs(b - mean), -b))
    share = _share(sc, rows[f"{sc['size']}x{nearest}"])
    return f"{share} (batch {nearest}; server's mean {mean:.2f})"


def _notes(sc: dict[str, Any], engine_row: dict[str, Any]) -> str:
    """A scenario's failures, its steady window (or why it has none), and the workers' seconds per batch."""
    notes = f" ({sc['errors']} failed)" if sc["errors"] else ""
    if sc.get("steady_reason"):
        notes += f" (no steady rate: {sc['steady_reason']})"
    elif "steady_images" in sc:
        notes += f" (steady: {sc['steady_images']} images in {sc['steady_window_s']:.3f} s{_burst_note(sc)})"
    batch = sc.get("per_batch_s") or {}
    if batch.get("batches"):
        notes += " ({:.0f} batches: engine {:.4f}, host {:.4f}, idle {:.4f} s each{})".format(
            batch["batches"], *(batch.get(k, 0.0) for k in ("engine", "host", "idle")), _stages(batch, engine_row)
        )
    return notes


def _burst_note(sc: dict[str, Any]) -> str:
    """The steady window's bursts of answers, to read beside the batches /metrics counted."""
    sizes = sc.get("steady_burst_sizes")
    if not sizes:
        return ""
    low, mid, high = min(sizes), statistics.median(sizes), max(sizes)
    return f", {len(sizes)} bursts of " + (f"{low}" if low == high else f"{low}-{high}, median {mid:g}")


def _rate(row: dict[str, Any]) -> float | None:
    """A row's images/s: None where it has none (a scenario whose steady window is too short)."""
    return row.get("images_per_s")


def _share(server: dict[str, Any], engine: dict[str, Any]) -> str:
    if not _rate(server) or not _rate(engine):
        return "-"
    return f"{server['images_per_s'] / engine['images_per_s']:.1%}".replace("%", " %")


def _stages(batch: dict[str, float], row: dict[str, Any]) -> str:
    """The engine's stages per server batch, each beside the engine row's own (batch N): where a
    server batch's engine time goes that the engine's does not."""
    stages = {k.removeprefix("stage:"): v for k, v in batch.items() if k.startswith("stage:")}
    mine = row.get("stages_s", {})
    told = [f"{k} {v:.4f}" + (f" (engine {mine[k]:.4f})" if k in mine else "") for k, v in stages.items() if v]
    return "; " + ", ".join(told) if told else ""


def _num(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if row.get(key) is not None else "-"


def write(res: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    res["checks"] = [asdict(c) for c in checks(res, args)]
    (out / "load.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "load.md").write_text(markdown(res, args) + "\n")


def environment() -> dict[str, Any]:
    """Which code ran where. The commit can be stale (a device's copy of the working tree may carry
    an old .git, uncommitted edits on top), so `dirty` says whether the tree differs from it, and the
    digests of src/ and of this script say which code ran whatever git says. `machine_id` tells one
    machine from another where the host name does not (--merge's check)."""
    root = Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "--short", "HEAD")
    status = _git(root, "status", "--porcelain")
    digest = hashlib.sha256()
    for path in sorted((root / "src").rglob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": commit or None,
        "dirty": None if status is None else bool(status),
        "src_sha256": digest.hexdigest()[:16],
        "scripts_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "python": platform.python_version(),
        "host": platform.node(),
        "machine_id": _machine_id(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git(root: Path, *command: str) -> str | None:
    """A git command's output in `root`; None without git or outside a checkout."""
    try:
        proc = subprocess.run(["git", "-C", str(root), *command], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _machine_id() -> str | None:
    try:
        return Path("/etc/machine-id").read_text().strip() or None
    except OSError:
        return None


# --- the run -------------------------------------------------------------------------------------


def serve_phase(
    args: argparse.Namespace,
    work: Path,
    out: Path,
    kind: str,
    during: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Start a server, time it to /ready, run `during(url, key)` on it, stop it."""
    port, key = free_port(), secrets.token_hex(16)
    env = child_env(work / "compile-cache", key)
    features = serve_features(serve_help(env))
    server = Server(serve_command(args, port, work, features), env, port, out / f"serve-{kind}.log")
    try:
        start = server.wait_ready(args.ready_timeout) | {"features": features}
        start |= server.wait_warm(start["ready"], args.ready_timeout)
        if during is not None:
            during(server.url, key)
    finally:
        server.stop()
    return start


def serve_help(env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "zturbo.cli", "serve", "--help"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout


def run(args: argparse.Namespace, argv: Sequence[str], work: Path, out: Path) -> dict[str, Any]:
    cache = work / "compile-cache"
    res: dict[str, Any] = {"environment": environment(), "options": vars(args), "scenarios": {}, "starts": {}}
    if args.warm_only:
        res["starts"]["warm"] = serve_phase(args, work, out, "warm")
        write(res, args, out)
        return res
    if _filled(cache) and not args.no_serve and not args.start_warm:
        refuse(f"{cache} is not empty, so the first start would not be cold")
    write(res, args, out)
    if not args.no_engine:
        res["engine"] = measure_engine(args, argv, work, out)
        write(res, args, out)
    if args.no_serve:
        return res
    pairs = prompts()

    def load(url: str, key: str) -> None:
        for sc in scenarios(args):
            print(f"load_serve: {sc.size}² with {sc.clients} client(s)", file=sys.stderr, flush=True)
            res["scenarios"][sc.key] = run_scenario(url, key, sc, args, pairs)
            write(res, args, out)

    first = "warm" if args.start_warm else "cold"
    if args.start_warm and not _filled(cache):  # the engine's child may have compiled nothing (--compile off)
        refuse(f"--start-warm: {cache} is empty after the engine's rows, so the start would be cold")
    res["starts"][first] = serve_phase(args, work, out, first, during=None if args.no_load else load)
    write(res, args, out)
    if not args.no_restart and not args.start_warm:
        res["starts"]["warm"] = serve_phase(args, work, out, "warm")
        write(res, args, out)
    return res


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """One result from the load.json files of a run split over calls: the engine's rows, scenarios
    and starts of each, a later file's winning where two have the same one."""
    res: dict[str, Any] = {"merged": list(paths), "scenarios": {}, "starts": {}}
    machines: list[dict[str, Any]] = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            refuse(f"--merge {path}: not a load.json ({e})")
        machines.append(part.get("environment") or {})
        res.setdefault("environment", part.get("environment"))
        res.setdefault("options", part.get("options", {}))  # the first file's sizes label the checks
        if part.get("engine"):
            res["engine"] = part["engine"]
        res["scenarios"] |= part.get("scenarios", {})
        res["starts"] |= part.get("starts", {})
    # machine_id where every file has one (a host name can repeat across machines); else the host.
    key = "machine_id" if all(m.get("machine_id") for m in machines) else "host"
    ids = {m.get(key) for m in machines}
    if len(ids) != 1:
        refuse(f"--merge: the files come from {len(ids)} machines by {key} ({', '.join(map(str, ids))}), not one")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.engine_only:
        return engine_main(args)
    out = Path(args.out or os.environ.get("OUT") or "load")
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        res = merge(args.merge)
        run_sizes = {
            k: res["options"][k] for k in ("large", "small", "max_batch", "engine_batches") if k in res["options"]
        }
        args = argparse.Namespace(**(vars(args) | run_sizes))  # the checks at the run's sizes
        write(res, args, out)
        print(markdown(res, args))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zturbo-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args, argv, work, out)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(res, args))
    failed = sum(sc["errors"] for sc in res["scenarios"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
