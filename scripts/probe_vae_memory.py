"""Peak memory of the FLUX VAE decode, eager and compiled, for the memory estimator (GPU probe).

One process, bf16 weights on the GPU. For each case the decode's peak above what was allocated
before it (weights and latents) is recorded, in GiB and in "live tensors": the excess over the
float32 image divided by one full-resolution 128-channel bf16 tensor, the unit of
`zturbo.memory.plan.VAE_LIVE_TENSORS`. The compiled cases follow the engine: the decoder compiled as
`accel.apply` compiles it (a static graph for 1024², a dynamic one for other sizes), 1024² first,
then the other sizes, then 1024² again; each case is also timed. `dynamic_1024` then decodes 1024²
through the dynamic graph alone, for the static graph's gain. Tiled cases use
`memory.set_vae_tiling`.

Usage (GPU): PYTHONPATH=src python scripts/probe_vae_memory.py [eager|slicing]
(writes $OUT/vae_memory.json). `eager`: the eager and tiled cases too. `slicing`: only the
batch-of-4 comparison, decoded image by image against all at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from diffusers import AutoencoderKL

from zturbo import tiny
from zturbo.accel import compile as accel
from zturbo.bench import speed as bench
from zturbo.engine import decode
from zturbo.memory import plan as memory

OUT = os.environ.get("OUT", ".")
GIB = 2**30
CASES = [(1024, 1), (512, 1), (1536, 1), (2048, 1), (1024, 4), (1024, 1)]


def peak(vae: torch.nn.Module, size: int, batch: int) -> dict[str, Any]:
    latents = torch.randn(batch, 16, size // 8, size // 8, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        image = decode(vae, latents)
    torch.cuda.synchronize()
    excess = torch.cuda.max_memory_allocated() - base
    del image
    unit = size * size * 128 * 2
    image_bytes = batch * 3 * size * size * 4
    return {
        "size": size,
        "batch": batch,
        "excess_gib": round(excess / GIB, 3),
        "live_tensors_per_image": round((excess - image_bytes) / unit / batch, 2),
    }


def seconds(vae: torch.nn.Module, size: int, batch: int, runs: int = 5) -> float:
    latents = torch.randn(batch, 16, size // 8, size // 8, device="cuda")
    with torch.inference_mode():
        decode(vae, latents)  # compiles when the shape is new
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            decode(vae, latents)
        torch.cuda.synchronize()
    return round((time.perf_counter() - start) / runs, 4)


def slicing(vae: torch.nn.Module, res: dict[str, Any], save: Any) -> None:
    """A batch of 4 at 1024², compiled: decoded one image at a time (the warm-up's static graph)
    against all four at once (a new shape: Inductor's dynamic graph)."""
    accel._compile_decoder(accel.Accel(), vae, "inductor")
    res["b1_static_s"] = seconds(vae, 1024, 1)
    vae.use_slicing = True
    res["b4_sliced_s"] = seconds(vae, 1024, 4)
    res["b4_sliced_peak"] = peak(vae, 1024, 4)
    save()
    vae.use_slicing = False
    res["b4_whole_s"] = seconds(vae, 1024, 4)
    res["b4_whole_peak"] = peak(vae, 1024, 4)
    save()


def main() -> None:
    vae = bench.random_module(lambda: AutoencoderKL(**tiny.FLUX_VAE_CONFIG), "cuda", torch.bfloat16)
    res: dict[str, Any] = {"weights_gib": round(torch.cuda.memory_allocated() / GIB, 3)}

    def save() -> None:
        with open(os.path.join(OUT, "vae_memory.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)

    def cases(name: str, sizes: list[tuple[int, int]]) -> None:
        res[name] = []
        for size, batch in sizes:  # saved case by case: a cut run keeps what finished
            took = seconds(vae, size, batch)  # first: compiles, so that the peak is the graph's own
            res[name].append(peak(vae, size, batch) | {"seconds": took})
            save()

    if sys.argv[1:] == ["slicing"]:
        slicing(vae, res, save)
        return
    if sys.argv[1:] == ["eager"]:
        cases("eager", CASES[1:])
    accel._compile_decoder(accel.Accel(), vae, "inductor")
    cases("compiled", CASES)
    del vae.decoder.forward
    accel.STATIC_DECODE_SIZE = 8  # no real size is static: 1024² through the dynamic graph
    accel._compile_decoder(accel.Accel(), vae, "inductor")
    cases("dynamic_1024", [(512, 1), (1024, 1)])
    if sys.argv[1:] == ["eager"]:
        memory.set_vae_tiling(vae, True)
        cases("compiled_tiled", [(2048, 1), (1024, 1)])


if __name__ == "__main__":
    main()
