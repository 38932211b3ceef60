"""Engine invariants: seeds, batching, the number and shape of transformer calls, the schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zturbo.errors import CheckpointError
from zturbo.pipeline import prepare_latents, schedule


def pixels(result):
    return [np.asarray(img.image) for img in result.images]


def test_batch_equals_singles(engine):
    batch = engine.generate("a red fox", seed=100, batch=3, width=64, height=64)
    assert [img.seed for img in batch.images] == [100, 101, 102]
    for i, got in enumerate(pixels(batch)):
        single = pixels(engine.generate("a red fox", seed=100 + i, width=64, height=64))[0]
        assert np.abs(got.astype(int) - single.astype(int)).max() <= 1


def test_same_seed_same_image_and_other_seed_differs(engine):
    a = pixels(engine.generate("a red fox", seed=5, width=64, height=64))[0]
    b = pixels(engine.generate("a red fox", seed=5, width=64, height=64))[0]
    c = pixels(engine.generate("a red fox", seed=6, width=64, height=64))[0]
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_noise_comes_from_cpu_generator_per_seed():
    both = prepare_latents([3, 4], 16, 8, 8)
    alone = prepare_latents([4], 16, 8, 8)
    assert torch.equal(both[1:], alone)
    assert torch.equal(both[0], torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(3))[0])


def test_random_seed_is_resolved_and_reported(engine):
    result = engine.generate("a red fox", width=32, height=32, steps=1)
    assert result.request.seed_was_random
    assert result.images[0].seed == result.request.seed
    assert result.images[0].metadata["seed"] == result.request.seed


class CallRecorder:
    """Wraps a module's forward and records the batch size of each call."""

    def __init__(self, module: torch.nn.Module, batch_of) -> None:
        self.calls: list[int] = []
        self._module = module
        self._forward = module.forward
        self._batch_of = batch_of

    def __enter__(self) -> CallRecorder:
        def forward(*args, **kwargs):
            self.calls.append(self._batch_of(*args, **kwargs))
            return self._forward(*args, **kwargs)

        self._module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self._module.forward  # back to the class's forward


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_one_transformer_forward_per_step(engine, steps):
    with CallRecorder(engine.components.transformer, lambda x, *a, **k: len(x)) as rec:
        engine.generate("a red fox", seed=1, steps=steps, width=32, height=32, batch=2)
    assert rec.calls == [2] * steps


def calls_per_forward(engine, guidance_scale: float) -> tuple[list[int], list[int]]:
    """Batch size of each text-encoder and transformer call of one 3-step request, cold prompt cache."""
    engine.prompt_cache.clear()
    te = engine.components.text_encoder
    tr = engine.components.transformer
    with (
        CallRecorder(te, lambda *a, input_ids, **k: input_ids.shape[0]) as text,
        CallRecorder(tr, lambda x, *a, **k: len(x)) as trans,
    ):
        engine.generate(
            "a red fox", negative_prompt="blurry", guidance_scale=guidance_scale, seed=1, steps=3, width=32, height=32
        )
    return text.calls, trans.calls


def test_guidance_zero_runs_no_unconditional_pass(engine):
    text, trans = calls_per_forward(engine, 0.0)
    assert text == [1]  # the negative prompt is never encoded
    assert trans == [1, 1, 1]


def test_guidance_batches_positive_and_negative_in_one_call(engine):
    text, trans = calls_per_forward(engine, 3.0)
    assert text == [1, 1]
    assert trans == [2, 2, 2]


def test_guidance_changes_the_image(engine):
    plain = pixels(engine.generate("a red fox", seed=9, width=64, height=64))[0]
    cfg = pixels(engine.generate("a red fox", seed=9, guidance_scale=4.0, width=64, height=64))[0]
    assert np.abs(plain.astype(int) - cfg.astype(int)).mean() > 1


def test_schedule_matches_turbo_definition(tiny_dir):
    import json

    config = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    sched = schedule(config, 8, 4096)
    base = np.linspace(1.0, 1 / 8, 8)
    shifted = 3.0 * base / (1 + 2.0 * base)  # shift 3.0, no dynamic shifting
    np.testing.assert_allclose(sched.sigmas[:-1], shifted, rtol=1e-6)
    assert sched.sigmas[-1] == 0.0
    np.testing.assert_allclose(sched.dts, np.diff(sched.sigmas), rtol=1e-6)
    np.testing.assert_allclose(sched.model_t.numpy(), 1 - shifted, rtol=1e-5, atol=1e-6)


def test_metadata_records_parameters_and_dtypes(engine):
    result = engine.generate(
        "a red fox", negative_prompt="blurry", seed=11, steps=2, guidance_scale=1.5, width=48, height=32
    )
    meta = result.images[0].metadata
    assert meta["prompt"] == "a red fox" and meta["negative_prompt"] == "blurry"
    assert (meta["seed"], meta["steps"], meta["guidance_scale"], meta["width"], meta["height"]) == (11, 2, 1.5, 48, 32)
    assert meta["dtypes"] == {"transformer": "float32", "text_encoder": "float32", "vae": "float32"}
    assert len(meta["model_fingerprint"]) == 64
    assert result.images[0].image.size == (48, 32)
    # Text-to-image on an engine without a ControlNet: no inputs, no ControlNet anywhere.
    assert meta["inputs"] == {} and meta["controlnet"] is None and engine.runtime()["controlnet"] is None


def test_repeated_prompt_skips_the_text_encoder(tiny_dir):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32"))
    calls = []
    engine.components.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    first = engine.generate("a red fox", seed=1, steps=2, width=32, height=32)
    again = engine.generate("a red fox", seed=1, steps=2, width=32, height=32)
    assert len(calls) == 1 and (engine.prompt_cache.hits, engine.prompt_cache.misses) == (1, 1)
    assert np.array_equal(np.asarray(first.images[0].image), np.asarray(again.images[0].image))
    # Two new prompts and one cached: one text-encoder call for both new ones.
    engine.generate(["a red fox", "a blue bird", "a green frog"], seed=1, steps=1, width=32, height=32)
    assert len(calls) == 2
    engine.prompt_cache.clear()
    engine.generate("a red fox", seed=1, steps=1, width=32, height=32)
    assert len(calls) == 3


def test_cached_long_prompt_still_warns(engine):
    long_prompt = "a very long prompt " * 200
    first = engine.generate(long_prompt, seed=1, steps=1, width=32, height=32)
    again = engine.generate(long_prompt, seed=1, steps=1, width=32, height=32)
    assert first.warnings == again.warnings and "tokens are dropped" in again.warnings[0]


def test_prompt_embeddings_are_the_last_layers_input_and_that_layer_never_runs(engine):
    from zturbo.pipeline import encode_prompt

    te, tok = engine.components.text_encoder, engine.components.tokenizer
    prompts = ["a red fox", "a much longer prompt about a blue bird on a branch"]  # padded batch
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tok(texts, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        full = te(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
        calls = []
        handle = te.layers[-1].register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            got, _ = encode_prompt(te, tok, prompts, torch.device("cpu"))
        finally:
            handle.remove()
    assert calls == []
    for i, embed in enumerate(got):
        assert torch.equal(embed, full.hidden_states[-2][i][enc.attention_mask[i].bool()])
    # The encoder is whole again afterwards (the bench's reference pipeline shares it).
    assert te.config.num_hidden_layers == len(te.layers) and not isinstance(te.norm, torch.nn.Identity)


def test_pixels_come_back_contiguous():
    from zturbo.pipeline import to_uint8

    pixels = to_uint8(torch.rand(2, 3, 8, 6) * 2 - 1)
    assert pixels.shape == (2, 8, 6, 3) and pixels.is_contiguous()  # PIL gathers strided arrays slowly


def test_a_batch_is_decoded_one_image_at_a_time(engine):
    # Four 1024² images decoded at once hold every image's activations (8.0 GiB above the weights on
    # an H100, against 1.3 GiB one by one), and a compiled decoder would need a graph for the batch.
    from zturbo.pipeline import decode

    vae = engine.components.vae
    latents = torch.randn(3, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    shapes = []
    hook = vae.decoder.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    try:
        images = decode(vae, latents)
    finally:
        hook.remove()
    assert [s[0] for s in shapes] == [1, 1, 1] and images.shape[0] == 3
    whole = vae.decode(
        (latents / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype), return_dict=False
    )[0].float()
    torch.testing.assert_close(images, whole, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def short_rope_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a 66-entry position table on the caption axis (axes_lens[0])."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("short-rope") / "model"
    shutil.copytree(tiny_dir, root)
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["axes_lens"] = [66, *config["axes_lens"][1:]]
    config_path.write_text(json.dumps(config))
    return root


def test_a_prompt_longer_than_the_position_table_is_truncated_with_a_warning(short_rope_dir):
    # Caption tokens take positions 1..P (P: the caption padded to 32) and the image P + 1, which
    # must index the 66-entry table: 64 tokens fit, and a 512-token prompt would end in IndexError.
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(short_rope_dir), device="cpu", dtype="float32"))
    assert engine.max_tokens == 64
    result = engine.generate("a very long prompt " * 200, seed=1, steps=1, width=32, height=32)
    assert len(result.images) == 1 and "the model takes 64, so the last" in result.warnings[0]
    assert engine.generate("a red fox", seed=1, steps=1, width=32, height=32).warnings == []


def test_each_image_carries_the_warnings_of_its_own_prompts(short_rope_dir):
    # A batch of several requests (as the server combines jobs) must say which image lost what: a
    # long prompt on one, a long negative prompt on another, nothing on the third.
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine
    from zturbo.request import GenerateRequest

    engine = Engine.load(RuntimeConfig(model=str(short_rope_dir), device="cpu", dtype="float32"))
    common = {"limits": engine.limits, "seed": 1, "steps": 1, "width": 32, "height": 32, "guidance_scale": 2.0}
    requests = [
        GenerateRequest.create("a long prompt " * 30, negative_prompt="blur", **common),
        GenerateRequest.create("a red fox", negative_prompt="a long negative " * 30, **common),
        GenerateRequest.create("a red fox", negative_prompt="blur", **common),
    ]
    result = engine.generate(GenerateRequest.combine(requests))
    long, negative, clean = (image.warnings for image in result.images)
    assert len(long) == 1 and long[0].startswith("prompt 'a long prompt") and "tokens are dropped" in long[0]
    assert len(negative) == 1 and negative[0].startswith("negative prompt 'a long negative")
    assert clean == []
    assert result.warnings == [*long, *negative]


def test_the_caption_limit_is_the_largest_the_position_table_takes(engine):
    # One table entry fewer, and a 64-token caption no longer fits (diffusers indexes past the table).
    from types import SimpleNamespace

    from zturbo.pipeline import caption_limit

    assert caption_limit(SimpleNamespace(axes_lens=[66, 8, 8])) == 64
    assert caption_limit(SimpleNamespace(axes_lens=[65, 8, 8])) == 32
    assert caption_limit(SimpleNamespace(axes_lens=[1536, 512, 512])) == 512  # the real model: the encoder's 512
    with pytest.raises(CheckpointError, match="axes_lens\\[0\\] 20 leaves no room for a caption"):
        caption_limit(SimpleNamespace(axes_lens=[20, 8, 8]))
    transformer = engine.components.transformer
    embed = torch.randn(64, transformer.config.cap_feat_dim)
    x = [torch.randn(transformer.config.in_channels, 1, 4, 4)]
    t = torch.tensor([0.5])
    table = transformer.rope_embedder.axes_lens
    try:
        transformer.rope_embedder.axes_lens = [65, *table[1:]]
        transformer.rope_embedder.freqs_cis = None  # rebuilt from axes_lens on the next call
        with torch.inference_mode(), pytest.raises(IndexError):
            transformer(x, t, [embed], return_dict=False)
        transformer.rope_embedder.axes_lens = [66, *table[1:]]
        transformer.rope_embedder.freqs_cis = None
        with torch.inference_mode():
            transformer(x, t, [embed], return_dict=False)
    finally:
        transformer.rope_embedder.axes_lens = table
        transformer.rope_embedder.freqs_cis = None


def test_load_and_apply_leave_the_environment_alone(tiny_dir):
    import os

    import zturbo
    from zturbo.accel import compile as accel

    before = dict(os.environ)
    engine = zturbo.load(str(tiny_dir), device="cpu", dtype="float32")
    applied = accel.apply(engine.components, accel.AccelOptions(compile=True, backend="eager"))
    try:
        assert applied.compiling and dict(os.environ) == before
    finally:
        applied.revert_compile()
        torch._dynamo.reset()


def test_an_engine_starts_with_its_layouts_vae_tiling(fresh):
    from zturbo.engine import Engine
    from zturbo.memory.plan import Layout

    tiled = Engine(
        fresh.components, fresh.model, fresh.device, fresh.dtypes, fresh.limits, layout=Layout(vae_tiling=True)
    )
    assert tiled.vae_tiling and fresh.components.vae.use_tiling
