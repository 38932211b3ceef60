"""The text encoder's CUDA graphs (zturbo.accel.graphs): padding, masks, when graphs are captured, reused
and dropped. CUDA graphs need a GPU; on the CPU a stand-in capture runs the same forward the graph
would replay, into the same static tensors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zturbo.accel import compile as accel
from zturbo.accel import graphs
from zturbo.memory.plan import Layout
from zturbo.pipeline import MAX_TOKENS, encode_prompt, pad_positions, transformer_step

PROMPTS = ["a red fox", "a much longer prompt about a blue bird on a branch in the snow at dawn"]


def cpu_capture(text_encoder: torch.nn.Module, shape: tuple[int, int], pool: object) -> graphs.Captured:
    """What `graphs.capture` records, without CUDA: replay runs the forward into static tensors."""
    ids = torch.zeros(shape, dtype=torch.long)
    out = graphs.encoder_forward(text_encoder, ids).clone()
    captured = graphs.Captured(lambda: None, ids, out, pool=object())

    def replay() -> None:
        out.copy_(graphs.encoder_forward(text_encoder, captured.ids))

    captured.replay = replay
    return captured


class CountingCapture:
    def __init__(self, fail: bool = False) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, text_encoder: torch.nn.Module, shape: tuple[int, int], pool: object) -> graphs.Captured:
        self.shapes.append(shape)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return cpu_capture(text_encoder, shape, pool)


def encode(engine, prompts, g=None):
    c = engine.components
    with torch.inference_mode():
        return encode_prompt(c.text_encoder, c.tokenizer, prompts, torch.device("cpu"), graphs=g)[0]


def test_lengths_are_padded_to_a_bucket_and_never_past_the_encoders_limit():
    assert [graphs.bucket_length(n, 512) for n in (1, 63, 64, 65, 449, 512)] == [64, 64, 64, 128, 512, 512]
    assert graphs.bucket_length(100, 100) == 100


def test_rows_are_right_padded_with_their_real_tokens_first():
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])  # left-padded first row
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    got_ids, got_mask = graphs.right_padded(ids, mask, 6, pad_id=9)
    assert got_ids.tolist() == [[5, 6, 9, 9, 9, 9], [1, 2, 3, 4, 9, 9]]
    assert got_mask.tolist() == [[True, True, False, False, False, False], [True] * 4 + [False] * 2]


def test_padded_graph_forward_gives_the_plain_embeddings(engine):
    # The graph runs a right-padded batch with no mask; the real tokens' states must be the plain
    # encoder's, which masks the padding (causal attention: padding after a token cannot reach it).
    want = encode(engine, PROMPTS)
    g = graphs.EncoderGraphs(capture=cpu_capture)
    got = encode(engine, PROMPTS, g)
    assert len(g) == 1  # replayed, not run the plain way
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_one_capture_per_batch_and_bucket_and_outputs_are_not_overwritten(engine):
    counting = CountingCapture()
    g = graphs.EncoderGraphs(capture=counting)
    first = encode(engine, ["a red fox"], g)[0].clone()
    kept = encode(engine, ["a red fox"], g)[0]
    encode(engine, ["a grey wolf"], g)  # same bucket: replayed, not captured
    assert counting.shapes == [(1, 64)]
    assert torch.equal(kept, first)  # the second replay did not overwrite the first result
    encode(engine, ["a grey wolf " * 30], g)
    encode(engine, PROMPTS, g)
    shapes = counting.shapes
    assert len(shapes) == 3 and shapes[1][0] == 1 and shapes[1][1] % 64 == 0 and shapes[1][1] > 64
    assert shapes[2] == (2, 64)


def test_graphs_are_dropped_when_the_encoders_weights_move(engine):
    counting = CountingCapture()
    g = graphs.EncoderGraphs(capture=counting)
    te = engine.components.text_encoder
    encode(engine, ["a red fox"], g)
    weight = te.layers[0].mlp.up_proj.weight
    before = weight.data
    try:
        weight.data = before.clone()  # what a move or a cast does: new storage, new address
        encode(engine, ["a red fox"], g)
    finally:
        weight.data = before
    assert counting.shapes == [(1, 64), (1, 64)]


def test_a_failed_capture_warns_once_and_the_encoder_runs_without_graphs(engine, caplog):
    failing = CountingCapture(fail=True)
    g = graphs.EncoderGraphs(capture=failing)
    want = encode(engine, ["a red fox"])
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        got = encode(engine, ["a red fox"], g)
        encode(engine, ["a red fox"], g)
    assert torch.equal(got[0], want[0])
    assert failing.shapes == [(1, 64)] and "stream is capturing" in g.failed
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1


def test_long_batches_run_without_a_graph(engine):
    counting = CountingCapture()
    g = graphs.EncoderGraphs(capture=counting)
    long = "a very long prompt " * 200  # truncated to MAX_TOKENS
    batch = graphs.MAX_GRAPH_TOKENS // MAX_TOKENS + 1
    encode(engine, [f"{long} {i}" for i in range(batch)], g)
    assert counting.shapes == []


def test_encoders_that_need_a_mask_for_causality_run_without_graphs(engine, monkeypatch):
    counting = CountingCapture()
    g = graphs.EncoderGraphs(capture=counting)
    config = engine.components.text_encoder.config
    monkeypatch.setattr(config, "_attn_implementation", "eager")  # no mask: every token sees every other
    assert not graphs.maskless_causal(engine.components.text_encoder)
    encode(engine, ["a red fox"], g)
    assert counting.shapes == []


def test_warm_up_captures_every_bucket_once(engine):
    from zturbo.pipeline import without_last_layer

    counting = CountingCapture()
    g = graphs.EncoderGraphs(capture=counting)
    te = engine.components.text_encoder
    with torch.inference_mode(), without_last_layer(te):
        g.capture_all(te, MAX_TOKENS)
    assert counting.shapes == [(1, n) for n in range(64, MAX_TOKENS + 1, 64)]
    encode(engine, ["a grey wolf " * 30], g)
    assert len(counting.shapes) == MAX_TOKENS // 64


def test_compiling_gives_graphs_that_reverting_drops(fresh):
    c = fresh.components
    applied = accel.apply(c, accel.AccelOptions(compile=True, quantize="none", backend="inductor"))  # compiles lazily
    try:
        assert applied.encoder_graphs is not None
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    assert applied.encoder_graphs is None
    assert accel.apply(c, accel.AccelOptions(compile=True, quantize="none", backend="eager")).encoder_graphs is None


def test_the_engine_hands_out_graphs_only_on_cuda_under_the_resident_plan(fresh, monkeypatch):
    fresh.accel.encoder_graphs = graphs.EncoderGraphs()
    assert fresh._encoder_graphs() is None  # the CPU
    monkeypatch.setattr(fresh, "device", torch.device("cuda"))
    assert fresh._encoder_graphs() is fresh.accel.encoder_graphs
    monkeypatch.setattr(fresh.placement, "layout", Layout("te-offload"))
    assert fresh._encoder_graphs() is None


def test_moving_to_a_leaner_plan_after_out_of_memory_frees_the_graphs(fresh):
    fresh.accel.encoder_graphs = graphs.EncoderGraphs()
    fresh._lean_out(fresh.request("a red fox"), "simulated out of memory", guided=False)
    assert fresh.accel.encoder_graphs is None and fresh.placement.plan == "te-offload"
    result = fresh.generate("a red fox", seed=1, steps=1, width=32, height=32)
    assert result.images  # the engine still runs, with the plain encoder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_graph_replays_the_plain_embeddings(tiny_dir):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cuda", compile="off"), warmup=False)
    want = [e.cpu() for e in encode_cuda(engine, PROMPTS)]
    got = encode_cuda(engine, PROMPTS, graphs.EncoderGraphs())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-2, atol=1e-2)


def encode_cuda(engine, prompts, g=None):
    c = engine.components
    with torch.inference_mode():
        return encode_prompt(c.text_encoder, c.tokenizer, prompts, engine.device, graphs=g)[0]


# ---------------------------------------------------------------------------------------------
# The transformer's step graphs


def cpu_step_capture(transformer, controlnet, x, t, embeds, control, pool) -> graphs.StepCaptured:
    """What `graphs.capture_step` records, without CUDA: replay runs the step into static outputs."""
    sx, st, se = [i.clone() for i in x], t.clone(), [e.clone() for e in embeds]
    sc = None if control is None else ([c.clone() for c in control[0]], control[1].clone())
    out = [o.clone() for o in transformer_step(transformer, controlnet, sx, st, se, sc)]
    captured = graphs.StepCaptured(lambda: None, sx, st, se, sc, out, pool=object())

    def replay() -> None:
        for static, new in zip(out, transformer_step(transformer, controlnet, sx, st, se, sc), strict=True):
            static.copy_(new)

    captured.replay = replay
    return captured


class CountingStepCapture:
    def __init__(self, fail: bool = False, fail_control: bool = False) -> None:
        self.keys: list[tuple] = []
        self.fail = fail
        self.fail_control = fail_control

    def __call__(self, transformer, controlnet, x, t, embeds, control, pool) -> graphs.StepCaptured:
        self.keys.append(graphs.step_key(x, t, embeds, control))
        if self.fail or (self.fail_control and control is not None):
            raise RuntimeError("operation not permitted when stream is capturing")
        return cpu_step_capture(transformer, controlnet, x, t, embeds, control, pool)


def latents_after(engine, prompt, step_graphs=None, room=lambda tokens: True, size=32):
    """Three denoising steps, plain or through `step_graphs` bound for one request."""
    from zturbo.pipeline import denoise, starting_point

    c = engine.components
    with torch.inference_mode():
        cond = encode(engine, [prompt])
        latents, sched = starting_point(c, [7], size, size, 3, engine.limits.spatial_unit)
        step = None if step_graphs is None else step_graphs.bind(c.transformer, room)
        return denoise(c.transformer, latents, cond, None, sched, 0.0, step=step)


def test_a_step_shape_is_captured_on_its_second_request_and_replayed_after(engine):
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    want = latents_after(engine, "a red fox")
    first = latents_after(engine, "a red fox", g)  # first sighting: plain steps
    assert counting.keys == [] and len(g) == 0
    second = latents_after(engine, "a red fox", g)  # second: captured at its first step, replayed after
    third = latents_after(engine, "a red fox", g)
    assert len(counting.keys) == 1 and len(g) == 1
    for got in (first, second, third):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    latents_after(engine, "a much longer prompt about a blue bird on a branch", g)  # new caption length
    assert len(counting.keys) == 1


def test_no_capture_without_room_and_the_oldest_graph_goes_beyond_the_limit(engine, monkeypatch):
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    for _ in range(2):
        latents_after(engine, "a red fox", g, room=lambda tokens: False)
    assert counting.keys == []
    monkeypatch.setattr(graphs, "MAX_STEP_GRAPHS", 1)
    for _ in range(2):
        latents_after(engine, "a red fox", g)
        latents_after(engine, "a grey wolf howling at the moon", g)
    assert len(counting.keys) == 2 and len(g) == 1


def test_step_graphs_are_recaptured_when_the_transformers_weights_move(engine):
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    for _ in range(3):
        latents_after(engine, "a red fox", g)
    assert len(counting.keys) == 1
    transformer = engine.components.transformer
    weight = transformer.all_x_embedder["2-1"].weight
    saved = weight.data
    try:
        weight.data = saved.clone()  # a new address: what moving or casting does
        latents_after(engine, "a red fox", g)
        assert len(counting.keys) == 2 and len(g) == 1  # the stale graph dropped, a new one captured
    finally:
        weight.data = saved


def test_a_failed_step_capture_warns_once_and_steps_run_plain(engine, caplog):
    counting = CountingStepCapture(fail=True)
    g = graphs.StepGraphs(counting)
    want = latents_after(engine, "a red fox")
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        got = [latents_after(engine, "a red fox", g) for _ in range(3)]
    assert len(counting.keys) == 1 and g.failed and "capture failed" in caplog.text
    for latents in got:
        torch.testing.assert_close(latents, want, rtol=0, atol=0)


def test_reverting_compilation_switches_off_a_bound_step_call(engine):
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    latents_after(engine, "a red fox", g)
    applied = accel.Accel(step_graphs=g)
    applied.revert_compile()
    assert applied.step_graphs is None and g.failed == "compilation was reverted"
    latents_after(engine, "a red fox", g)  # a second sighting, but graphs are off
    assert counting.keys == []


def test_the_engine_steps_through_graphs_only_on_cuda_under_the_resident_plan(fresh, monkeypatch):
    fresh.accel.step_graphs = graphs.StepGraphs()
    assert fresh._step_graphs() is None  # the CPU
    monkeypatch.setattr(fresh, "device", torch.device("cuda"))
    monkeypatch.setattr("zturbo.engine.budget_fraction", lambda device: 1.0)
    assert fresh._step_graphs() is fresh.accel.step_graphs
    monkeypatch.setattr("zturbo.engine.budget_fraction", lambda device: 0.5)  # --vram-budget
    assert fresh._step_graphs() is None
    monkeypatch.setattr("zturbo.engine.budget_fraction", lambda device: 1.0)
    monkeypatch.setattr(fresh.placement, "layout", Layout("te-offload"))
    assert fresh._step_graphs() is None


def test_the_engines_images_are_unchanged_through_step_graphs(fresh, monkeypatch):
    want = fresh.generate("a red fox", seed=3, steps=2, width=32, height=32).images[0]
    counting = CountingStepCapture()
    fresh.accel.step_graphs = graphs.StepGraphs(counting)
    monkeypatch.setattr(type(fresh), "_step_graphs", lambda self: self.accel.step_graphs)
    monkeypatch.setattr(type(fresh), "_step_graph_fits", lambda self, req, tokens: True)
    images = [fresh.generate("a red fox", seed=3, steps=2, width=32, height=32).images[0] for _ in range(3)]
    assert len(counting.keys) == 1
    for image in images:
        assert image.image.tobytes() == want.image.tobytes()
    fresh._lean_out(fresh.request("a red fox"), "simulated out of memory", guided=False)
    assert len(fresh.accel.step_graphs) == 0  # a leaner plan frees their pool


# ---------------------------------------------------------------------------------------------
# Step graphs with a ControlNet


@pytest.fixture(scope="module")
def controlnet(engine, tmp_path_factory):
    from zturbo.loader import load_controlnet
    from zturbo.tiny import write_tiny_controlnet

    path = write_tiny_controlnet(tmp_path_factory.mktemp("cn") / "cn.safetensors", "2.1")
    return load_controlnet(str(path), engine.components.transformer, engine.device, torch.float32)


def control_input(device, size=32, seed=0, scale=0.7, in_dim=33, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    context = [torch.randn(in_dim, 1, size // 8, size // 8, generator=g).to(device, dtype)]
    return context, torch.tensor(scale, dtype=torch.float32, device=device)


def controlled_latents(engine, cn, controls, step_graphs=None, prompt="a red fox", size=32):
    """Three steps with step i's control input `controls[i]` (None: the ControlNet does not run)."""
    from zturbo.pipeline import denoise, starting_point

    c = engine.components
    with torch.inference_mode():
        cond = encode_on(engine, [prompt])
        latents, sched = starting_point(c, [7], size, size, 3, engine.limits.spatial_unit)
        step = None if step_graphs is None else step_graphs.bind(c.transformer, lambda tokens: True, controlnet=cn)
        latents = latents.to(engine.device)
        return denoise(c.transformer, latents, cond, None, sched, 0.0, step=step, controlnet=cn, controls=controls)


def encode_on(engine, prompts):
    c = engine.components
    with torch.inference_mode():
        return encode_prompt(c.text_encoder, c.tokenizer, prompts, engine.device)[0]


def test_a_control_step_is_keyed_by_its_context_shapes_and_replays_any_scale(engine, controlnet):
    cn, cpu = controlnet.model, torch.device("cpu")
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    strong, weak = control_input(cpu, scale=0.9), control_input(cpu, seed=1, scale=0.2)
    want_strong = controlled_latents(engine, cn, [strong] * 3)
    want_weak = controlled_latents(engine, cn, [weak] * 3)
    assert not torch.equal(want_strong, want_weak)
    for controls, want in (([strong] * 3, want_strong), ([strong] * 3, want_strong), ([weak] * 3, want_weak)):
        torch.testing.assert_close(controlled_latents(engine, cn, controls, g), want, rtol=0, atol=0)
    assert len(counting.keys) == 1  # another image and scale replayed the graph captured for the shapes
    # Without a control input the same shapes are another graph: the ControlNet is not in it.
    plain = [None] * 3
    want_plain = controlled_latents(engine, cn, plain)
    for _ in range(2):
        torch.testing.assert_close(controlled_latents(engine, cn, plain, g), want_plain, rtol=0, atol=0)
    assert len(counting.keys) == 2 and counting.keys[1][-1] is None and counting.keys[0][-1] is not None
    # control_end: the ControlNet's steps and the plain steps of one request replay their own graphs.
    mixed = [strong, strong, None]
    torch.testing.assert_close(
        controlled_latents(engine, cn, mixed, g), controlled_latents(engine, cn, mixed), rtol=0, atol=0
    )
    assert len(counting.keys) == 2


def test_step_graphs_are_recaptured_when_the_controlnets_weights_move(engine, controlnet):
    cn = controlnet.model
    counting = CountingStepCapture()
    g = graphs.StepGraphs(counting)
    control = control_input(torch.device("cpu"))
    for _ in range(2):
        controlled_latents(engine, cn, [control] * 3, g)
    assert len(counting.keys) == 1
    weight = cn.control_layers[0].after_proj.weight
    saved = weight.data
    try:
        weight.data = saved.clone()
        controlled_latents(engine, cn, [control] * 3, g)
        assert len(counting.keys) == 2 and len(g) == 1
        latents_after(engine, "a red fox", g)  # no ControlNet bound: only the transformer's weights count
        latents_after(engine, "a red fox", g)
        assert len(counting.keys) == 3 and len(g) == 2
    finally:
        weight.data = saved


def test_a_failed_control_capture_leaves_the_plain_steps_their_graphs(engine, controlnet, caplog):
    cn = controlnet.model
    counting = CountingStepCapture(fail_control=True)
    g = graphs.StepGraphs(counting)
    control = control_input(torch.device("cpu"))
    want = controlled_latents(engine, cn, [control] * 3)
    with caplog.at_level(logging.WARNING, logger="zturbo"):
        got = [controlled_latents(engine, cn, [control] * 3, g) for _ in range(3)]
    assert g.control_failed and g.failed is None and "with the ControlNet failed" in caplog.text
    for latents in got:
        torch.testing.assert_close(latents, want, rtol=0, atol=0)
    for _ in range(2):
        latents_after(engine, "a red fox", g)
    assert len(counting.keys) == 2 and len(g) == 1  # one failed control capture, then the plain one


class HostSyncs(TorchDispatchMode):
    """Records the ops a CUDA graph capture refuses: reading a value back, or indexing by a
    boolean mask (which counts its True entries on the host first)."""

    READS = frozenset({"nonzero", "_local_scalar_dense", "is_nonzero", "equal", "masked_select"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        if name in self.READS or any(getattr(i, "dtype", None) == torch.bool for i in indices or ()):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("sizes", "captions"), [((4,), (7,)), ((4, 6), (7, 40)), ((16,), (64,))])
def test_a_control_step_syncs_with_nothing_and_predicts_as_diffusers_forward(engine, controlnet, sizes, captions):
    # Pads on both the image (4x4 latents: 4 tokens of 32) and the caption; none at 16x16 and 64 tokens.
    cn, transformer = controlnet.model, engine.components.transformer
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, n, n, generator=g) for n in sizes]
    caps = [torch.randn(n, transformer.config.cap_feat_dim, generator=g) for n in captions]
    context = [torch.randn(cn.config.control_in_dim, 1, n, n, generator=g) for n in sizes]
    t, scale = torch.full((len(sizes),), 0.4), torch.tensor(0.7)
    with torch.inference_mode():
        samples = cn(x, t, caps, context, conditioning_scale=scale)  # diffusers' own, boolean masks
        want = transformer(x, t, caps, controlnet_block_samples=samples, return_dict=False)[0]
        with HostSyncs() as syncs:
            got = transformer_step(transformer, cn, x, t, caps, (context, scale))
    assert syncs.ops == []
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "patchify_and_embed" not in vars(cn)  # the model is diffusers' own again


def test_pad_positions_are_the_masks_true_entries_across_items():
    masks = [torch.tensor([False] * 5 + [True] * 3), torch.zeros(4, dtype=torch.bool), torch.tensor([False, True])]
    positions = torch.cat(pad_positions(masks, [5, 4, 1]))
    assert positions.tolist() == torch.cat(masks).nonzero().squeeze(1).tolist() == [5, 6, 7, 13]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_step_graph_with_a_controlnet_replays_the_plain_step(tiny_dir, tmp_path):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine
    from zturbo.loader import load_controlnet
    from zturbo.tiny import write_tiny_controlnet

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cuda", compile="off"), warmup=False)
    path = write_tiny_controlnet(tmp_path / "cn.safetensors", "2.1")
    transformer = engine.components.transformer
    cn = load_controlnet(str(path), transformer, engine.device, transformer.dtype).model
    g = graphs.StepGraphs()
    for scale in (0.9, 0.9, 0.4):
        controls = [control_input(engine.device, scale=scale, dtype=transformer.dtype)] * 3
        want = controlled_latents(engine, cn, controls).cpu()
        got = controlled_latents(engine, cn, controls, g).cpu()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Captured once (the ControlNet's pad writes sync with nothing) and replayed for the other scale.
    assert g.failed is None and g.control_failed is None and (g.captures, len(g)) == (1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_step_graph_replays_the_plain_step(tiny_dir):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cuda", compile="off"), warmup=False)
    g = graphs.StepGraphs()
    want = latents_after_cuda(engine, None)
    for _ in range(3):
        got = latents_after_cuda(engine, g)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(g) == 1 and g.failed is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_engine_on_cuda_captures_a_step_graph_and_keeps_its_images(tiny_dir):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cuda", compile="off"), warmup=False)
    want = engine.generate("a red fox", seed=3, steps=2, width=32, height=32).images[0].image.tobytes()
    engine.accel.step_graphs = g = graphs.StepGraphs()  # what compiling with Inductor sets
    images = [engine.generate("a red fox", seed=3, steps=2, width=32, height=32).images[0] for _ in range(3)]
    assert len(g) == 1 and g.failed is None
    assert all(image.image.tobytes() == want for image in images)


def latents_after_cuda(engine, step_graphs):
    from zturbo.pipeline import denoise, starting_point

    c = engine.components
    with torch.inference_mode():
        cond = encode_cuda(engine, ["a red fox"])
        latents, sched = starting_point(c, [7], 32, 32, 3, engine.limits.spatial_unit)
        step = None if step_graphs is None else step_graphs.bind(c.transformer, lambda tokens: True)
        return denoise(c.transformer, latents.to(engine.device), cond, None, sched, 0.0, step=step).cpu()
