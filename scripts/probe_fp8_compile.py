"""Why does the VAE decoder take minutes to compile in an fp8 process? (GPU probe)

Each mode runs in a fresh subprocess with its own empty Inductor and Triton caches:

- `vae`: the FLUX VAE decoder alone, compiled as `accel.apply` compiles it, first decode timed;
- `vae-serial`: the same with `TORCHINDUCTOR_COMPILE_THREADS=1` (compilation in the main
  process: what the decoder costs if the worker pool is not used);
- `fp8-vae`: the real transformer quantized to fp8, its blocks compiled and run once at 1024²,
  then the decoder as in `vae`;
- `bf16-vae`: the same with bf16 blocks.

Each records the first-call seconds, the state of Inductor's compile-worker pool before the
decoder compiles (ready or not, how many worker processes), and dynamo's per-phase compile times.
A thread appends the main thread's stack every 20 s into $OUT/stacks-<mode>.txt.

Usage (GPU): PYTHONPATH=src python scripts/probe_fp8_compile.py [mode ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

OUT = os.environ.get("OUT", ".")


def pool_state() -> dict[str, Any]:
    import psutil
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile

    ready = AsyncCompile._ready_future
    children = psutil.Process().children(recursive=True)
    return {
        "compile_threads": config.compile_threads,
        "worker_start_method": config.worker_start_method,
        "ready_future": None if ready is None else ready.done(),
        "use_process_pool": AsyncCompile.use_process_pool(),
        "child_processes": len(children),
        "quiesce": getattr(config, "quiesce_async_compile_pool", None),
    }


def compile_times() -> Any:
    import torch._dynamo.utils as du

    try:
        names, values = du.compile_times(repr="csv", aggregate=True)
        return {n: round(float(v), 2) for n, v in zip(names, values, strict=True) if float(v) >= 0.5}
    except Exception as e:  # a probe: record and go on
        return repr(e)


def transformer_once(quantize: str) -> dict[str, Any]:
    import torch
    from diffusers import ZImageTransformer2DModel

    from zturbo import tiny
    from zturbo.accel import compile as accel
    from zturbo.bench import speed as bench

    transformer = bench.random_module(ZImageTransformer2DModel, "cuda", torch.bfloat16)
    tiny.randomize_pad_tokens(transformer)
    if quantize != "none":
        accel.quantize_transformer(transformer, quantize)
    accel.compile_transformer(accel.Accel(), transformer)
    latents = torch.randn(1, 16, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    embeds = [torch.randn(64, 2560, device="cuda", dtype=torch.bfloat16)]
    start = time.perf_counter()
    with torch.inference_mode():
        transformer(list(latents.unbind(0)), torch.tensor([0.5], device="cuda"), embeds, return_dict=False)
    torch.cuda.synchronize()
    return {"transformer_first_s": round(time.perf_counter() - start, 1), "transformer_times": compile_times()}


def vae_once() -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL

    from zturbo import tiny
    from zturbo.accel import compile as accel
    from zturbo.bench import speed as bench
    from zturbo.engine import decode

    vae = bench.random_module(lambda: AutoencoderKL(**tiny.FLUX_VAE_CONFIG), "cuda", torch.bfloat16)
    r: dict[str, Any] = {"pool_before_vae": pool_state()}
    accel._compile_decoder(accel.Accel(), vae, "inductor")
    latents = torch.randn(1, 16, 128, 128, device="cuda")
    start = time.perf_counter()
    with torch.inference_mode():
        decode(vae, latents)
    torch.cuda.synchronize()
    r["vae_first_s"] = round(time.perf_counter() - start, 1)
    r["pool_after_vae"] = pool_state()
    r["all_times"] = compile_times()
    return r


def sample_main_stack(path: str, every: float = 20.0) -> None:
    """Append the main thread's stack to `path` every `every` seconds (faulthandler's timed dumps
    crashed these processes with SIGSEGV)."""
    main_id = threading.main_thread().ident
    start = time.perf_counter()
    while True:
        time.sleep(every)
        frame = sys._current_frames().get(main_id)
        lines = traceback.format_stack(frame)[-25:] if frame is not None else []
        with open(path, "a") as f:
            f.write(f"--- {time.perf_counter() - start:.0f} s\n" + "".join(lines))


def child(mode: str) -> None:
    threading.Thread(target=sample_main_stack, args=(os.path.join(OUT, f"stacks-{mode}.txt"),), daemon=True).start()
    res: dict[str, Any] = {"mode": mode}
    start = time.perf_counter()
    try:
        if mode in ("fp8-vae", "bf16-vae"):
            res.update(transformer_once("fp8" if mode == "fp8-vae" else "none"))
        res.update(vae_once())
    except Exception as e:  # a probe: record and go on
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
    res["total_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(OUT, f"probe-{mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if "times" not in k}), flush=True)


def main(modes: list[str]) -> None:
    for mode in modes:
        env = dict(os.environ)
        cache = tempfile.mkdtemp(prefix=f"probe-{mode}-")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        if mode == "vae-serial":
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        start = time.perf_counter()
        try:
            code: Any = subprocess.run([sys.executable, __file__, "--child", mode], env=env, timeout=420).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"{mode}: exit {code} after {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main(sys.argv[1:] or ["vae", "vae-serial", "fp8-vae"])
