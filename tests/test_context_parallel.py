"""Context parallel (`--parallel N`, accel.sequence): N processes sharing one image's tokens make
the one-process image. CPU processes over gloo, on the tiny checkpoint in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zturbo.accel.sequence import Shards

# diffusers pads the image's tokens and the caption's each to a multiple of 32: 64² and "a cat"
# make 64 tokens, which 3 processes share after padding to 66; a batch of two prompts of different
# lengths brings diffusers' own pad mask into the split.
CASES = (
    {"prompt": "a cat", "width": 64, "height": 64, "seed": 1},
    {"prompt": "a red fox in the snow", "width": 48, "height": 64, "seed": 2},
    {"prompt": ["a cat", "a very long prompt " * 6], "width": 48, "height": 48, "seed": 3},
)


def _images(engine, case: dict) -> list[np.ndarray]:
    result = engine.generate(case["prompt"], seed=case["seed"], steps=2, width=case["width"], height=case["height"])
    return [np.asarray(image.image) for image in result.images]


def _predictions(transformer: torch.nn.Module) -> list[torch.Tensor]:
    """The transformer's float32 predictions for a batch of two latents (64² and 128²) with
    captions of 7 and 40 tokens. diffusers pads each to a multiple of 32 tokens: 64 and 128, which
    differ (diffusers masks the first item's end) and which 3 does not divide (the split pads)."""
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 8, 8, generator=gen), torch.randn(16, 1, 16, 16, generator=gen)]
    caps = [torch.randn(7, 16, generator=gen), torch.randn(40, 16, generator=gen)]
    with torch.no_grad():
        return transformer(x, torch.tensor([0.3, 0.7]), caps, return_dict=False)[0]


def _rank_main(shards: Shards, model: str, cache: str) -> dict:
    """In each of 3 processes: images and raw predictions with all 3 sharing the tokens, then with
    the first 2."""
    import os

    import torch.distributed as dist

    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    os.environ["ZTURBO_CACHE"] = cache
    out: dict = {}
    pair = dist.new_group([0, 1])  # every process of the group must create it
    for size, group in ((3, shards.group), (2, pair)):
        if shards.rank >= size:
            continue
        config = RuntimeConfig(model=model, device="cpu", dtype="float32", parallel=size)
        engine = Engine.load(config, shards=Shards(group, shards.rank, size))
        out[size] = [_images(engine, case) for case in CASES]
        out["predictions", size] = _predictions(engine.components.transformer)
    dist.barrier()
    return out


def test_two_and_three_processes_make_the_one_process_image(tiny_dir: Path, engine) -> None:
    import os

    from zturbo.distributed import launch

    shared = launch(3, "cpu", _rank_main, str(tiny_dir), os.environ["ZTURBO_CACHE"])
    want_predictions = _predictions(engine.components.transformer)
    for size in (2, 3):
        for got, want in zip(shared["predictions", size], want_predictions, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{size} processes' predictions")
    for case_index, case in enumerate(CASES):
        want = _images(engine, case)
        for size in (2, 3):
            got = shared[size][case_index]
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                diff = np.abs(g.astype(int) - w.astype(int)).max()
                assert diff <= 1, f"{size} processes, case {case}: pixels differ by up to {diff}/255"
