"""Classifier-free guidance in two passes: where the doubled batch does not fit, the positive and
negative halves run one after the other, with the batched run's images (float32, CPU, tiny base
checkpoint), and the plan says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
from zturbo.memory import plan as memory
from zturbo.memory.plan import Layout
from zturbo.profiles import BASE, Chosen

GIB = memory.GIB
BF16 = {"transformer": 2, "text_encoder": 2, "vae": 2}
# Two images with captions of different lengths (the batched call pads them to one length), a
# renormalization and a truncation that leaves the last steps unguided (one half only).
REQUEST = {
    "negative_prompt": "blurry, low quality",
    "seed": 5,
    "steps": 6,
    "guidance_scale": 4.0,
    "cfg_normalization": 1.2,
    "cfg_truncation": 0.3,
    "width": 48,
    "height": 48,
}
PROMPTS = ["a lighthouse at dusk", "a very small red fox asleep in the snow under a pine tree, at night"]
PROFILE = Chosen(BASE, "preset")


def same_image(ours: np.ndarray, reference: np.ndarray) -> bool:
    """The batched run's image: float32 matrix products of another batch size may round one value
    of a few thousand by one 8-bit step on some CPUs (seen on an AVX2 EPYC), never more; a wrong
    half, guidance or renormalization changes far more."""
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    return ours.shape == reference.shape and int(diff.max()) <= 1 and float((diff > 0).mean()) < 1e-3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zturbo.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), seed=1, profile=BASE)


@pytest.fixture(scope="module")
def base_engine(base_dir: Path) -> Engine:
    loaded = Engine.load(RuntimeConfig(model=str(base_dir), device="cpu", dtype="float32"))
    return with_layout(loaded, Layout())


def with_layout(engine: Engine, layout: Layout) -> Engine:
    return Engine(
        engine.components, engine.model, engine.device, engine.dtypes, engine.limits, layout=layout, profile=PROFILE
    )


def generate(engine: Engine) -> tuple[list[np.ndarray], list[int], list[str]]:
    """(the images, the rows of every transformer call, each image's recorded memory plan)."""
    rows: list[int] = []
    hook = engine.components.transformer.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    try:
        result = engine.generate(PROMPTS, **REQUEST)
    finally:
        hook.remove()
    images = [np.asarray(image.image, dtype=np.int16) for image in result.images]
    return images, rows, [image.metadata["memory_plan"] for image in result.images]


def test_a_layout_with_two_pass_cfg_gives_the_batched_images(base_engine):
    batched, batched_rows, batched_plans = generate(base_engine)
    split, split_rows, split_plans = generate(with_layout(base_engine, Layout(split_cfg=True)))
    assert all(image.std() > 10 for image in batched)  # flat images would match anything
    for ours, reference in zip(split, batched, strict=True):
        assert same_image(ours, reference)
    # Batched: 4 rows on guided steps, 2 past the truncation. Two passes: never more than 2 rows,
    # one more call for each guided step.
    guided = batched_rows.count(4)
    assert 0 < guided < REQUEST["steps"] and set(batched_rows) == {4, 2}
    assert split_rows == [2] * (REQUEST["steps"] + guided)
    assert batched_plans == ["resident"] * 2 and split_plans == ["resident + two-pass-cfg"] * 2


def test_two_passes_keep_each_passs_predictions_when_a_step_reuses_its_outputs():
    """A replayed CUDA graph returns the same output tensors at every replay; where both halves
    replay one graph (their shapes agree), the first half's predictions must survive the second."""
    from zturbo.pipeline import in_passes

    static = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]

    def replay(x, t, embeds, control):
        for out, row in zip(static, x, strict=True):
            out.copy_(row * 2)
        return static

    x = [torch.full((1, 2, 2), float(i)) for i in range(4)]
    got = in_passes(replay, 2)(x, torch.zeros(4), [torch.zeros(3, 8)] * 4, None)
    assert [float(p[0, 0, 0]) for p in got] == [0.0, 2.0, 4.0, 6.0]


def test_a_request_whose_doubled_batch_does_not_fit_runs_in_two_passes(base_engine, monkeypatch):
    batched, _, _ = generate(base_engine)
    # The planner's count of the doubled batch's activations (float32, captions at their longest).
    args = (base_engine.shape, 4, REQUEST["width"], REQUEST["height"], len(PROMPTS), True, base_engine.max_tokens)
    doubled = memory.transformer_activation(*args) / memory.FREE_SHARE
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: int(doubled) - 1)
    split, rows, plans = generate(base_engine)
    assert max(rows) == 2 and plans == ["resident + two-pass-cfg"] * 2
    assert all(same_image(a, b) for a, b in zip(split, batched, strict=True))
    assert base_engine.runtime()["memory_plan"] == "resident"  # the layout is kept for later requests
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: int(doubled) + 1)
    _, rows, plans = generate(base_engine)
    assert max(rows) == 4 and plans == ["resident"] * 2


@pytest.mark.parametrize(
    ("budget", "size", "batch", "expected"),
    [
        (40, 2048, 4, "resident"),
        (32, 2048, 4, "resident + two-pass-cfg"),  # before te-offload: the weights stay put
        (4, 2048, 1, "block-offload (2 blocks resident) + vae-tiling + two-pass-cfg"),
    ],
)
def test_the_planner_runs_cfg_in_two_passes_where_the_doubled_batch_does_not_fit(shape, budget, size, batch, expected):
    request = {"width": size, "height": size, "batch": batch}
    choice = memory.choose(shape, BF16, budget * GIB, cfg=True, **request)
    assert choice.chosen is not None and choice.chosen.label() == expected
    usable = memory.usable_budget(budget * GIB)
    assert choice.chosen.peak <= usable
    if choice.chosen.split_cfg:
        # The same layout with the halves batched does not fit, nor does any faster plan.
        chosen = choice.chosen
        kept = {"resident_blocks": chosen.resident_blocks, "resident_layers": chosen.resident_layers}
        together = memory.estimate(
            shape, BF16, plan=chosen.plan, cfg=True, vae_tiling=chosen.vae_tiling, **kept, **request
        )
        assert together.peak > usable
        assert all(e.peak > usable for e in choice.considered[:-1])
        assert memory.layout_of(chosen).split_cfg
    # Without CFG there is nothing to split.
    assert not memory.choose(shape, BF16, budget * GIB, cfg=False, **request).chosen.split_cfg


def test_an_explicit_streaming_plan_splits_cfg_where_its_doubled_batch_does_not_fit(monkeypatch, shape):
    from zturbo.device import probe

    monkeypatch.setattr(memory, "shape_from_source", lambda source, controlnet=None: shape)
    monkeypatch.setattr(memory, "PLANNED_SIZE", 2048)

    class Source:
        transformer_file = None

        def profile(self, preset: str) -> Chosen:
            return Chosen(BASE, "preset")

    config = RuntimeConfig(model="x", memory="block-offload")
    dtypes = {name: torch.bfloat16 for name in BF16}
    caps = probe(torch.device("cpu"))
    tight = memory.plan_layout(config, Source(), dtypes, 4 * GIB, caps, compiled_vae=False)
    roomy = memory.plan_layout(config, Source(), dtypes, 12 * GIB, caps, compiled_vae=False)
    assert tight.split_cfg and not roomy.split_cfg


def test_info_plans_the_base_models_doubled_batch(capsys, monkeypatch, shape, base_dir):
    from clirun import run

    monkeypatch.setattr(memory, "shape_from_source", lambda source, controlnet=None: shape)
    args = ("info", "--plan", "--width", 2048, "--height", 2048, "--batch", 4, "--vram-budget", 32, "--device", "cpu")
    args += ("--dtype", "bfloat16")
    code, out, err = run(capsys, *args, "--model", base_dir)
    assert code == 0, err
    chosen = [line for line in out.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].strip().startswith("resident + two-pass-cfg"), out
    code, out, _ = run(capsys, *args, "--model", base_dir, "--preset", "turbo")  # no CFG: nothing to split
    assert code == 0 and "two-pass-cfg" not in out


def test_running_out_of_memory_under_cfg_retries_in_two_passes(base_engine):
    from zturbo.testing import inject_oom

    batched, _, _ = generate(base_engine)
    engine = with_layout(base_engine, Layout())
    inject_oom(engine.components.transformer)
    result = engine.generate(PROMPTS, **REQUEST)
    assert [(f["component"], f["from"], f["to"]) for f in result.fallbacks] == [
        ("memory", "resident", "resident + two-pass-cfg")
    ]
    got = [np.asarray(image.image, dtype=np.int16) for image in result.images]
    assert all(same_image(a, b) for a, b in zip(got, batched, strict=True))
    assert engine.runtime()["memory_plan"] == "resident + two-pass-cfg"  # kept, as leaner plans are


def test_running_out_of_memory_under_cfg_first_tries_two_passes():
    assert memory.leaner(Layout(), guided=True) == Layout(split_cfg=True)
    assert memory.leaner(Layout(split_cfg=True), guided=True) == Layout("te-offload", split_cfg=True)
    assert memory.leaner(Layout("block-offload", 16), guided=False) == Layout("block-offload")


class RecordingMerger:
    """Stands in for the engine's LoRA merger: counts how often its merged weights are dropped."""

    def __init__(self) -> None:
        self.forgotten = 0

    def apply(self, loras: object, key: object) -> bool:
        return False

    def forget(self) -> None:
        self.forgotten += 1


def test_two_passes_after_running_out_of_memory_keep_compilation_loras_and_streams(base_dir):
    from zturbo.accel.graphs import EncoderGraphs
    from zturbo.testing import inject_oom

    config = RuntimeConfig(model=str(base_dir), device="cpu", dtype="float32", memory="block-offload")
    engine = Engine.load(config)
    want = engine.generate(PROMPTS, **REQUEST).images
    # What a compiled engine holds, as the fallback would find it: a compiled module (compiling
    # ends if it is reverted), the encoder's graphs and a LoRA merger.
    compiled = torch.nn.Identity()
    compiled.forward = compiled.forward  # torch.compile's instance attribute; reverting deletes it
    engine.accel.compiled.append(compiled)
    graphs = engine.accel.encoder_graphs = EncoderGraphs()
    merger = engine.merger = RecordingMerger()
    streamers = dict(engine.placement.streamers)
    assert streamers and engine.accel.compiling
    inject_oom(engine.components.transformer)
    result = engine.generate(PROMPTS, **REQUEST)
    plan = engine.placement.describe(split_cfg=False)
    assert [(f["from"], f["to"]) for f in result.fallbacks] == [(plan, f"{plan} + two-pass-cfg")]
    assert engine.accel.compiled == [compiled] and engine.accel.encoder_graphs is graphs
    assert engine.merger is merger and merger.forgotten == 0
    assert engine.placement.streamers.keys() == streamers.keys()
    assert all(engine.placement.streamers[name] is streamer for name, streamer in streamers.items())
    for got, image in zip(result.images, want, strict=True):
        assert same_image(np.asarray(got.image), np.asarray(image.image))


def test_running_out_of_memory_after_two_passes_moves_to_the_next_plan(base_dir, monkeypatch):
    """Where the request already ran in two passes (its doubled batch did not fit the free memory),
    or ran out of memory outside the denoise stage, two passes would gain nothing."""
    from zturbo.testing import inject_oom

    engine = Engine.load(RuntimeConfig(model=str(base_dir), device="cpu", dtype="float32"))
    args = (engine.shape, 4, REQUEST["width"], REQUEST["height"], len(PROMPTS), True, engine.max_tokens)
    doubled = memory.transformer_activation(*args) / memory.FREE_SHARE
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: int(doubled) - 1)
    inject_oom(engine.components.transformer)
    result = engine.generate(PROMPTS, **REQUEST)
    assert [(f["from"], f["to"]) for f in result.fallbacks] == [("resident", engine.placement.describe())]
    assert engine.placement.plan == "te-offload" and not engine.placement.layout.split_cfg
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: None)
    inject_oom(engine.components.text_encoder)
    result = engine.generate(["a new prompt, not in the prompt cache"], **REQUEST)
    assert [f["to"] for f in result.fallbacks] == [engine.placement.describe()]
    assert engine.placement.plan == "block-offload" and not engine.placement.layout.split_cfg


def test_model_offload_asks_for_two_passes_once_the_text_encoder_has_left_the_device(base_engine, monkeypatch):
    engine = with_layout(base_engine, Layout("model-offload"))
    shape = engine.shape
    args = (shape, 4, REQUEST["width"], REQUEST["height"], len(PROMPTS), True, engine.max_tokens)
    doubled = int(memory.transformer_activation(*args) / memory.FREE_SHARE) + 1
    # A device that holds the weights of the stage placed last (model-offload: one model at a
    # time), with room for the doubled batch beside the transformer.
    weights = {"encode": shape.text_encoder_params * 4, "denoise": shape.transformer_params * 4}
    placed: list[str] = []
    stage = engine.placement.stage
    monkeypatch.setattr(engine.placement, "stage", lambda name: (placed.append(name), stage(name))[1])
    free = weights["denoise"] + doubled
    monkeypatch.setattr("zturbo.engine.memory_room", lambda device, budget: free - weights.get(placed[-1], 0))
    _, rows, plans = generate(engine)
    assert "encode" in placed and max(rows) == 4 and plans == ["model-offload"] * 2
    # Sequential's group offloading still brings the transformer's leaves on during the forward.
    assert memory.denoise_onload(shape, BF16, Layout("model-offload"), staged=True) == 0
    sequential = memory.denoise_onload(shape, BF16, Layout("sequential"))
    assert sequential > 0 and memory.denoise_onload(shape, BF16, Layout("sequential"), staged=True) == sequential


@pytest.mark.parametrize(
    ("plan", "size", "budgets"),
    [("te-offload", 1024, (13.5, 14.25)), ("block-offload", 2048, (4.75, 8.0)), ("block-offload", 1024, (6.0,))],
)
def test_an_explicit_streaming_plan_takes_the_layout_the_planner_would(monkeypatch, shape, plan, size, budgets):
    """Batched with a tiled decode before two passes, and for block-offload more resident blocks
    before an untiled decode: `choose`'s order, where the planner picks the same plan."""
    from zturbo.device import probe

    monkeypatch.setattr(memory, "shape_from_source", lambda source, controlnet=None: shape)
    monkeypatch.setattr(memory, "PLANNED_SIZE", size)

    class Source:
        transformer_file = None

        def profile(self, preset: str) -> Chosen:
            return Chosen(BASE, "preset")

    config = RuntimeConfig(model="x", memory=plan)
    dtypes = {name: torch.bfloat16 for name in BF16}
    for budget in budgets:
        chosen = memory.choose(shape, BF16, int(budget * GIB), cfg=True, width=size, height=size).chosen
        assert chosen is not None and chosen.plan == plan and chosen.vae_tiling and not chosen.split_cfg
        layout = memory.plan_layout(
            config, Source(), dtypes, int(budget * GIB), probe(torch.device("cpu")), compiled_vae=False
        )
        assert layout == memory.layout_of(chosen), budget


def test_a_compiled_engine_guides_with_truncation_as_the_eager_one_and_diffusers_do(base_dir, base_engine):
    """The compiled blocks (dynamo with the eager backend: traced, no codegen) see the batch of
    both halves on guided steps and of one half once `cfg_truncation` ends guidance mid-run; the
    images are the uncompiled engine's and diffusers' given the same request."""
    from diffusers import ZImagePipeline

    from zturbo.accel import compile as accel

    eager, eager_rows, _ = generate(base_engine)
    engine = Engine.load(RuntimeConfig(model=str(base_dir), device="cpu", dtype="float32"))
    # The VAE stays eager: what is under test is the transformer's batch changing mid-run.
    options = accel.AccelOptions(compile=True, backend="eager", vae=False)
    engine.accel = accel.apply(engine.components, options)
    try:
        assert engine.accel.compiling
        compiled, rows, _ = generate(engine)
    finally:
        torch._dynamo.reset()
    guided = rows.count(4)
    assert rows == eager_rows and 0 < guided < REQUEST["steps"] and rows == [4] * guided + [2] * (len(rows) - guided)
    pipe = ZImagePipeline.from_pretrained(base_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt=PROMPTS,
        negative_prompt=[REQUEST["negative_prompt"]] * len(PROMPTS),
        height=REQUEST["height"],
        width=REQUEST["width"],
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        cfg_normalization=REQUEST["cfg_normalization"],
        cfg_truncation=REQUEST["cfg_truncation"],
        generator=[torch.Generator("cpu").manual_seed(REQUEST["seed"] + i) for i in range(len(PROMPTS))],
        output_type="pil",
    ).images
    for ours, plain, theirs in zip(compiled, eager, reference, strict=True):
        assert ours.std() > 10  # a flat image would match anything
        assert np.abs(ours - plain).max() <= 1
        assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
