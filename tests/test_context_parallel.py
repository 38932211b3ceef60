"""Context parallel (`--parallel N`, accel.sequence): N processes sharing one image's tokens make
the one-process image. CPU processes over gloo, on the tiny checkpoint in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zturbo.accel.sequence import Shards, padded
from zturbo.errors import DeviceError, InvalidRequestError

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
        seeds = [None] * size  # a random seed: each process draws its own, the first one's is used
        dist.all_gather_object(seeds, engine.generate("a cat", steps=1, width=32, height=32).images[0].seed, group)
        out["seeds", size] = seeds
    dist.barrier()
    return out


def test_two_and_three_processes_make_the_one_process_image(tiny_dir: Path, engine) -> None:
    import os

    from zturbo.distributed import launch

    shared = launch(3, "cpu", _rank_main, str(tiny_dir), os.environ["ZTURBO_CACHE"])
    want_predictions = _predictions(engine.components.transformer)
    assert all(len(set(shared["seeds", size])) == 1 for size in (2, 3)), shared
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


def test_generate_parallel_writes_the_one_process_image(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    from clirun import pixels, run
    from zturbo.imageio import read_metadata

    paths = {n: tmp_path / f"fox{n}.png" for n in (1, 2)}
    for n, path in paths.items():
        code, out, err = run(
            capsys, "generate", "a red fox", "--model", tiny_dir, "--seed", 42, "--width", 64, "--height", 48,
            "--steps", 2, "--device", "cpu", "--dtype", "float32", "--parallel", n, "-o", path,
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == f"{path}\tseed=42"
    assert np.abs(pixels(paths[2]).astype(int) - pixels(paths[1]).astype(int)).max() <= 1
    assert read_metadata(paths[2])["parallel"] == 2 and "parallel" not in read_metadata(paths[1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--parallel", "0"), "parallel 0 must be 1"),
        (("--parallel", "2", "--controlnet", "x"), "cannot run a ControlNet"),
    ],
)
def test_generate_parallel_refuses_what_cannot_run(capsys, tiny_dir: Path, tmp_path: Path, argv, message) -> None:
    from clirun import run

    code, _, err = run(capsys, "generate", "a fox", "--model", tiny_dir, "-o", tmp_path / "x.png", *argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_an_engine_of_n_processes_needs_its_group(tiny_dir: Path) -> None:
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    with pytest.raises(InvalidRequestError, match="parallel 2 needs 2 processes joined in one group"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", parallel=2))


def test_processes_run_on_the_cpu_or_one_gpu_each() -> None:
    from zturbo.distributed import device_type

    assert device_type("cpu", 3) == "cpu"
    with pytest.raises(InvalidRequestError, match="--parallel 2 with --device cuda:1 is not supported"):
        device_type("cuda:1", 2)  # process i takes GPU i: a device index would say otherwise
    if torch.cuda.device_count() < 64:
        with pytest.raises(DeviceError, match="--parallel 64 needs 64 GPUs"):
            device_type("cuda", 64)


def test_padded_rounds_up_to_a_multiple() -> None:
    assert [padded(n, 3) for n in (64, 66, 1)] == [66, 66, 3]
    assert padded(4128, 4) == 4128


def _compiled_rank(shards: Shards, model: str, cache: str) -> dict:
    """On GPU `rank`: the compiled bf16 engine of 2 processes; its images after the step graphs are
    captured, the captures, and whether step graphs were refused."""
    import os

    from zturbo.accel.graphs import STEP_SIGHTINGS
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    os.environ["ZTURBO_CACHE"] = cache
    config = RuntimeConfig(model=model, device="cuda", dtype="bfloat16", compile="on", parallel=2, compile_cache=None)
    engine = Engine.load(config, shards=shards, warmup=False)
    for _ in range(1 + STEP_SIGHTINGS):  # compiled, then seen again and captured, then replayed
        images = _images(engine, CASES[0])
    graphs = engine.accel.step_graphs
    return {"images": images, "captures": graphs.captures, "failed": graphs.failed}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallel on GPUs needs two")
def test_two_gpus_compiled_and_graphed_make_the_one_gpu_image(tiny_dir: Path) -> None:
    import os

    from zturbo.accel.graphs import STEP_SIGHTINGS
    from zturbo.config import RuntimeConfig
    from zturbo.distributed import launch
    from zturbo.engine import Engine

    shared = launch(2, "cuda", _compiled_rank, str(tiny_dir), os.environ["ZTURBO_CACHE"])
    assert shared["failed"] is None and shared["captures"] >= 1  # the collectives were captured too
    config = RuntimeConfig(model=str(tiny_dir), device="cuda", dtype="bfloat16", compile="on", compile_cache=None)
    single = Engine.load(config, warmup=False)
    want = [_images(single, CASES[0]) for _ in range(1 + STEP_SIGHTINGS)][-1]
    for g, w in zip(shared["images"], want, strict=True):
        diff = np.abs(g.astype(int) - w.astype(int))
        assert diff.mean() < 1 and diff.max() <= 8, f"mean {diff.mean():.2f}, max {diff.max()}"  # bf16 sums differ
