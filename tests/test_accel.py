"""Speed paths on the CPU: the compile-friendly attention equals diffusers', compiled graphs have
no breaks, a failing compiler falls back to eager with one warning, bad settings are refused."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zturbo.accel import compile as accel
from zturbo.accel import fuse, quantize
from zturbo.config import RuntimeConfig
from zturbo.device import Capabilities
from zturbo.engine import Engine
from zturbo.errors import DeviceError, InvalidRequestError

PARAMS = {"seed": 5, "steps": 3, "width": 64, "height": 48}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def test_real_rope_processor_matches_diffusers(fresh):
    transformer = fresh.components.transformer
    block = transformer.layers[0]
    x = torch.randn(2, 40, transformer.dim)
    ids = torch.stack(torch.meshgrid(torch.arange(40), torch.tensor([0]), torch.tensor([0]), indexing="ij"), -1)
    freqs = transformer.rope_embedder(ids.reshape(-1, 3)).unsqueeze(0).expand(2, -1, -1)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    with torch.inference_mode():
        expected = block.attention(x, attention_mask=mask, freqs_cis=freqs)
        block.attention.set_processor(accel.RealRopeAttnProcessor())
        got = block.attention(x, attention_mask=mask, freqs_cis=freqs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_graphs_have_no_breaks_and_same_image(fresh, engine):
    # backend="eager" traces with dynamo (fullgraph=True fails on any graph break) without codegen.
    fresh.accel = accel.apply(fresh.components, accel.AccelOptions(compile=True, quantize="none", backend="eager"))
    assert fresh.accel.compiling
    try:
        result = fresh.generate("a red fox", **PARAMS)
        assert np.abs(pixels(result) - pixels(engine.generate("a red fox", **PARAMS))).max() <= 1
        assert result.images[0].metadata["compiled"] is True
    finally:
        torch._dynamo.reset()


def test_blocks_compile_once_per_kind_whatever_the_token_count(fresh):
    # Two block graphs (modulated; the caption refiner's unmodulated one), the text encoder's layer
    # and the decoder's, on the first image; new prompt lengths and image sizes then recompile
    # nothing but the decoder.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fresh.accel = accel.apply(fresh.components, accel.AccelOptions(compile=True, quantize="none", backend=counter))
    try:
        fresh.generate("a red fox", **PARAMS)
        assert counter.frame_count == 4
        fresh.generate("a much longer prompt about a red fox in the snow at dawn " * 3, **PARAMS)
        fresh.generate("a red fox", **{**PARAMS, "width": 96, "height": 64})
        assert counter.frame_count == 5  # only the decoder's graph for other sizes
    finally:
        torch._dynamo.reset()


def test_the_warm_up_size_always_decodes_through_its_own_static_graph(fresh, monkeypatch):
    # Left to torch.compile (dynamic=None), the dynamic graph built for a second size would serve
    # the warm-up size too, holding 8 full-resolution tensors instead of 5 (the planner counts 5).
    from zturbo.pipeline import decode

    ran: list[bool] = []  # per decode: whether the graph that ran has symbolic sizes

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        shapes = [d for v in values if isinstance(v, torch.Tensor) for d in v.shape]
        symbolic = any(isinstance(v, torch.SymInt) for v in values + shapes)

        def run(*args: object) -> object:
            ran.append(symbolic)
            return gm.forward(*args)

        return run

    monkeypatch.setattr(accel, "STATIC_DECODE_SIZE", 64)  # the tiny VAE on the CPU
    vae = fresh.components.vae
    applied = accel.Accel(accel.AccelOptions(backend=backend))
    accel._compile_decoder(applied, vae)
    sizes = [(64, 64), (96, 64), (64, 64), (128, 96), (64, 64)]
    try:
        with torch.inference_mode():
            for width, height in sizes:
                image = decode(vae, torch.randn(1, 16, height // 8, width // 8))
                assert image.shape == (1, 3, height, width)
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    assert ran == [False, True, False, True, False]
    assert "forward" not in vars(vae.decoder)  # reverted: the class's forward again


def test_compiled_text_encoder_layers_give_the_eager_embeddings(fresh):
    # The compiled layers bypass the attention modules' output hooks; the prompt embeddings (the
    # input of the last layer, which does not run) must be exactly the eager ones.
    from zturbo.pipeline import encode_prompt

    c = fresh.components
    prompts = ["a red fox", "a much longer prompt about a red fox in the snow at dawn"]  # padded batch
    with torch.inference_mode():
        expected, _ = encode_prompt(c.text_encoder, c.tokenizer, prompts, torch.device("cpu"))
        fresh.accel = accel.apply(c, accel.AccelOptions(compile=True, quantize="none", backend="eager"))
        try:
            got, _ = encode_prompt(c.text_encoder, c.tokenizer, prompts, torch.device("cpu"))
        finally:
            fresh.accel.revert_compile()
            torch._dynamo.reset()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def failing_backend(gm, example_inputs):
    raise RuntimeError("simulated compiler failure")


def test_compile_failure_falls_back_to_eager_once(fresh, engine, caplog):
    fresh.accel = accel.apply(
        fresh.components, accel.AccelOptions(compile=True, quantize="none", backend=failing_backend)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="zturbo"):
            result = fresh.generate("a red fox", **PARAMS)
            again = fresh.generate("a red fox", **PARAMS)
    finally:
        torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "simulated compiler failure" in warnings[0]
    assert not fresh.accel.compiling and result.images[0].metadata["compiled"] is False
    # Eager again: diffusers' own processors are back and the image is the eager one.
    processor = fresh.components.transformer.layers[0].attention.processor
    assert not isinstance(processor, accel.RealRopeAttnProcessor)
    expected = pixels(engine.generate("a red fox", **PARAMS))
    assert np.array_equal(pixels(result), expected) and np.array_equal(pixels(again), expected)


def test_fp8_refused_without_fp8_hardware():
    turing = Capabilities("cuda", "Tesla T4", (7, 5), bf16=False, fp16=True, fp8=False, flash_attention=False)
    with pytest.raises(DeviceError, match=r"--quantize fp8 needs .* Tesla T4 has none"):
        quantize.check_quantize("fp8", turing)


def test_fp8_refused_on_cpu_engine(tiny_dir):
    with pytest.raises(DeviceError, match="fp8"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", quantize="fp8"))


@pytest.mark.parametrize(("field", "value"), [("compile", "maybe"), ("quantize", "int3")])
def test_bad_settings_name_the_value(field, value):
    with pytest.raises(InvalidRequestError, match=f"{field} '{value}' is not one of"):
        RuntimeConfig(**{field: value})


def test_compile_auto_means_cuda_only():
    assert accel.resolve_compile("auto", torch.device("cuda")) is True
    assert accel.resolve_compile("auto", torch.device("cpu")) is False
    assert accel.resolve_compile("on", torch.device("cpu")) is True
    assert accel.resolve_compile("off", torch.device("cuda")) is False


def test_fused_projections_share_storage_and_keep_the_state_dict(fresh):
    transformer = fresh.components.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    bytes_before = sum(p.numel() * p.element_size() for p in transformer.parameters())
    fuse.fuse_projections(transformer)
    after = transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ffn = transformer.layers[0].feed_forward
    assert ffn.w1.weight.untyped_storage().data_ptr() == ffn.w3.weight.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in transformer.parameters()) == bytes_before
    fused_image = pixels(fresh.generate("a red fox", **PARAMS))
    fuse.unfuse_projections(transformer)
    assert np.abs(fused_image.astype(int) - pixels(fresh.generate("a red fox", **PARAMS))).max() <= 1


def test_int8_weights_on_the_cpu_stay_close_to_float32(tiny_dir, engine):
    pytest.importorskip("torchao")  # in the [test] extra; the import is optional for users
    expected = pixels(engine.generate("a red fox", **PARAMS))
    quantized = Engine.load(RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="bfloat16", quantize="int8"))
    w1 = quantized.components.transformer.layers[0].feed_forward.w1.weight
    assert "Int8" in type(w1).__name__  # a torchao tensor, not a plain Parameter
    result = quantized.generate("a red fox", **PARAMS)
    assert result.images[0].metadata["quantize"] == "int8"
    assert np.abs(pixels(result) - expected).mean() < 2  # measured 0.40 (bf16 alone is most of it)


def test_compiled_int8_blocks_keep_their_matmul_and_the_eager_output(fresh):
    # Inductor's pattern matcher would turn the int8 products into aten._weight_int8pack_mm, a
    # kernel for a few rows (on CUDA a thread per output, no tensor cores; on the CPU it crashed
    # here). Inductor itself runs, on the CPU: the backend="eager" tests never reach its passes.
    pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    transformer = fresh.components.transformer.to(torch.bfloat16)
    quantize.quantize_transformer(transformer, "int8")
    block = transformer.layers[0]
    tokens = 24
    x = torch.randn(1, tokens, transformer.dim, dtype=torch.bfloat16)
    ids = torch.stack(torch.meshgrid(torch.arange(tokens), torch.tensor([0]), torch.tensor([0]), indexing="ij"), -1)
    freqs = transformer.rope_embedder(ids.reshape(-1, 3)).unsqueeze(0)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    adaln = torch.randn(1, min(transformer.dim, 256), dtype=torch.bfloat16)
    with torch.inference_mode():
        block.attention.set_processor(accel.RealRopeAttnProcessor())
        expected = block(x, mask, freqs, adaln)
        counters.clear()
        state = accel.Accel(accel.AccelOptions(compile=True, quantize="int8"))
        accel.compile_blocks(state, [block], accel.INT8_INDUCTOR_OPTIONS)
        try:
            got = block(x, mask, freqs, adaln)
        finally:
            state.revert_compile()
            torch._dynamo.reset()
    assert counters["inductor"]["woq_matcher_count"] == 0
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)  # bf16, fused differently


def test_blocks_holding_int8_weights_compile_with_those_options_and_others_without(fresh, monkeypatch):
    pytest.importorskip("torchao")
    seen = []
    monkeypatch.setattr(accel, "_compile_block", lambda state, block, options=None: seen.append(options))
    transformer = fresh.components.transformer

    def compiled(mode: str, **fields: bool) -> list:
        seen.clear()
        options = accel.AccelOptions(compile=True, quantize=mode, **fields)
        accel.compile_transformer(accel.Accel(options), transformer)
        return seen[:]

    assert set(map(str, compiled("none"))) == {"None"}  # plain weights: Inductor's defaults
    quantize.quantize_transformer(transformer, "int8")
    assert compiled("int8") == [accel.INT8_INDUCTOR_OPTIONS] * len(list(fuse.transformer_blocks(transformer)))
    assert compiled("none") == compiled("int8")  # the weights decide, whatever the options say
    assert set(map(str, compiled("int8", int8_patterns=True))) == {"None"}  # a probe's A/B


def test_fp8_leaves_the_caption_refiner_plain_and_weight_only_modes_do_not(fresh):
    transformer = fresh.components.transformer
    linears = [(n, m) for n, m in transformer.named_modules() if quantize.is_block_linear(m, n)]
    fp8 = {n for n, m in linears if quantize.quantizes("fp8", m, n)}
    int8 = {n for n, m in linears if quantize.quantizes("int8", m, n)}
    assert int8 == {n for n, _ in linears} and fp8 == {n for n in int8 if not n.startswith("context_refiner.")}
    assert fp8 and any(n.startswith("context_refiner.") for n in int8)


def test_quantizing_block_by_block_onto_the_device_matches_quantizing_in_place(fresh):
    # Engine.load quantizes on arrival (one block of plain weights on the device at a time); the
    # result must be the in-place quantization: the same linears, the same quantized values.
    import copy

    pytest.importorskip("torchao")
    in_place = copy.deepcopy(fresh.components.transformer).to(torch.bfloat16)
    arriving = copy.deepcopy(in_place)
    quantize.quantize_transformer(in_place, "int8")
    quantize.quantize_transformer(arriving, "int8", device=torch.device("cpu"))

    def quantized(model):
        return {n: m.weight for n, m in model.named_modules() if "Int8" in type(getattr(m, "weight", None)).__name__}

    a, b = quantized(in_place), quantized(arriving)
    assert a.keys() == b.keys() and len(a) == 7 * len(list(fuse.transformer_blocks(in_place)))
    assert not any("adaLN" in name for name in a)  # the (B, 256)-input modulation stays plain
    for name in a:
        torch.testing.assert_close(a[name].dequantize(), b[name].dequantize(), rtol=0, atol=0)
    assert getattr(arriving, quantize.QUANTIZED) == "int8"


def test_quantizing_leaves_inductors_settings_alone(fresh):
    # torchao's configs switch on coordinate-descent tuning process-wide unless told not to; every
    # kernel compiled afterwards (the fp8 blocks, the VAE decoder) was then tuned candidate by
    # candidate: minutes of an fp8 first image on an H100.
    import copy

    import torch._inductor.config as inductor_config

    pytest.importorskip("torchao")
    touched = (
        "coordinate_descent_tuning",
        "coordinate_descent_check_all_directions",
        "force_fuse_int_mm_with_mul",
        "fx_graph_cache",
        "triton.unique_kernel_names",
    )
    before = inductor_config.get_config_copy()
    with inductor_config.patch({k: before[k] for k in touched}):  # restored even if the test fails
        quantize.quantize_transformer(copy.deepcopy(fresh.components.transformer).to(torch.bfloat16), "int8")
        after = inductor_config.get_config_copy()
    assert {k: after[k] for k in touched} == {k: before[k] for k in touched}


@pytest.mark.parametrize(
    ("mode", "dtype", "message"),
    [
        ("int4", None, "int4 needs a CUDA GPU"),
        ("fp8", torch.float16, "fp8 computes with bfloat16"),
        ("int8", torch.float16, "does not combine with the float16 overflow guard"),
    ],
)
def test_quantization_refusals_name_the_fix(mode, dtype, message):
    caps = CPU_CAPS if mode == "int4" else ADA
    with pytest.raises(DeviceError, match=message):
        quantize.check_quantize(mode, caps, dtype)


CPU_CAPS = Capabilities("cpu", "CPU", None, bf16=True, fp16=True, fp8=False, flash_attention=False)
ADA = Capabilities("cuda", "NVIDIA L4", (8, 9), bf16=True, fp16=True, fp8=True, flash_attention=True)


def test_int4_on_cuda_is_refused_up_front_without_its_kernel_package(monkeypatch):
    # torchao's int4 path needs mslk's kernels and says so only deep inside quantize_ (after the
    # weights loaded): the check names the package and how to install it, before any loading.
    monkeypatch.setattr(quantize, "int4_kernels_missing", lambda: "ModuleNotFoundError: No module named 'mslk'")
    with pytest.raises(DeviceError) as refused:
        quantize.check_quantize("int4", ADA)
    message = str(refused.value)
    assert "No module named 'mslk'" in message and "pip install mslk-cuda" in message and "int8" in message
    assert quantize.usable_quantizations(ADA, torch.bfloat16) == ("fp8", "int8")  # the planner's options too
    monkeypatch.setattr(quantize, "int4_kernels_missing", lambda: None)
    quantize.check_quantize("int4", ADA, torch.bfloat16)
    assert quantize.usable_quantizations(ADA, torch.bfloat16) == ("fp8", "int8", "int4")


def test_the_int4_probe_tries_the_import_torchao_makes(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mslk", None)  # import mslk... then raises ImportError, installed or not
    assert "mslk" in quantize.int4_kernels_missing()
    fake = SimpleNamespace(int4_row_quantize_zp=object())
    monkeypatch.setitem(sys.modules, "mslk.quantize.shuffle", fake)
    assert quantize.int4_kernels_missing() is None
    monkeypatch.setitem(sys.modules, "mslk.quantize.shuffle", SimpleNamespace())
    assert "older than 1.0" in quantize.int4_kernels_missing()


def test_apply_can_leave_the_vae_decoder_eager(fresh):
    c = fresh.components
    applied = accel.apply(c, accel.AccelOptions(compile=True, quantize="none", backend="eager", vae=False))
    try:
        assert c.vae.decoder not in applied.compiled and "forward" not in vars(c.vae.decoder)
        assert any(block in applied.compiled for block in c.transformer.layers)
    finally:
        applied.revert_compile()
        torch._dynamo.reset()


def test_speed_levers_are_options_of_one_apply_call(fresh):
    # No module state: two engines' options differ only through what each passed to `apply`.
    c = fresh.components
    plain = accel.AccelOptions(compile=True, backend="inductor", graph_text_encoder=False, graph_steps=False)
    applied = accel.apply(c, plain)  # Inductor compiles lazily: nothing runs here
    try:
        assert applied.options is plain and applied.encoder_graphs is None and applied.step_graphs is None
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    no_fused_kernel = accel.AccelOptions(compile=True, backend="eager", fused_norm_rope=False, flash_attention_3=False)
    applied = accel.apply(c, no_fused_kernel)
    try:
        assert all(attn.processor.norm_rope is None and attn.processor.flash3 is None for attn, _ in applied.processors)
        assert applied.attention == "sdpa"
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    graphed = accel.apply(c, accel.AccelOptions(compile=True, backend="inductor"))
    try:
        assert graphed.encoder_graphs is not None and graphed.step_graphs is not None
    finally:
        graphed.revert_compile()
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# A ControlNet's blocks and the VAE encoder


def fifteen_layer_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 30-layer transformer at the tiny widths and a Union-2.1-shaped ControlNet for it (15 control
    layers, every second layer; 2 control refiner blocks): the real arrangement, built in a second."""
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    from zturbo.tiny import TRANSFORMER_CONFIG, tiny_controlnet_config

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**{**TRANSFORMER_CONFIG, "n_layers": 30, "n_refiner_layers": 2}).eval()
    config = {**tiny_controlnet_config("2.1"), "control_layers_places": list(range(0, 30, 2)), "n_refiner_layers": 2}
    config["control_refiner_layers_places"] = [0, 1]
    controlnet = ZImageControlNetModel(**config).eval()
    for name, module in controlnet.named_modules():
        if name.endswith(("before_proj", "after_proj")):
            module.reset_parameters()
    return transformer, ZImageControlNetModel.from_transformer(controlnet, transformer)


def blocks_only(transformer: torch.nn.Module, controlnet: torch.nn.Module) -> SimpleNamespace:
    """Components with a transformer and a ControlNet and nothing else for `apply` to compile."""
    return SimpleNamespace(
        transformer=transformer, controlnet=SimpleNamespace(model=controlnet), text_encoder=SimpleNamespace(layers=[])
    )


def controlled_step(transformer, controlnet, size: int, caption: int, seed: int = 0) -> list[torch.Tensor]:
    from zturbo.pipeline import transformer_step

    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, size, size, generator=g)]
    caps = [torch.randn(caption, transformer.config.cap_feat_dim, generator=g)]
    control = ([torch.randn(controlnet.config.control_in_dim, 1, size, size, generator=g)], torch.tensor(0.7))
    with torch.inference_mode():
        return transformer_step(transformer, controlnet, x, torch.tensor([0.4]), caps, control)


def test_fifteen_control_layers_compile_fused_to_one_graph_and_give_the_eager_prediction():
    # Each control layer gets a deeper hint stack: compiled whole, 15 layers would be 16 graphs
    # and hit torch.compile's limit of 8 (fullgraph: an error). The control blocks share one graph;
    # the shared refiners gain their masked variants (the ControlNet passes masks, the transformer None).
    from torch._dynamo.testing import CompileCounter

    transformer, controlnet = fifteen_layer_model()
    want = [controlled_step(transformer, controlnet, n, c) for n, c in ((8, 20), (12, 50))]
    counter = CompileCounter()
    options = accel.AccelOptions(compile=True, quantize="none", backend=counter, vae=False, graph_steps=False)
    applied = accel.apply(blocks_only(transformer, controlnet), options)
    try:
        got = [controlled_step(transformer, controlnet, n, c) for n, c in ((8, 20), (12, 50))]
        assert counter.frame_count == 5  # the transformer's 2 block kinds x (mask, no mask) and the control core
        controlled_step(transformer, controlnet, 4, 70)
        assert counter.frame_count == 5
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g[0], w[0], rtol=1e-4, atol=1e-4)
        control_blocks = list(fuse.controlnet_blocks(controlnet))
        assert len(control_blocks) == 17 and all(b in applied.compiled for b in control_blocks)
        # Fused with the transformer's: q/k/v one product, the separate weights views of it.
        assert applied.fused_blocks == control_blocks
        first = control_blocks[0].attention
        assert first.to_q.weight.data_ptr() == getattr(first, fuse.FUSED_QKV).data_ptr()
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    assert all("forward" not in vars(b) for b in control_blocks)
    assert all(type(b.attention.processor).__name__ == "ZSingleStreamAttnProcessor" for b in control_blocks)
    assert not applied.fused_blocks and all(getattr(b.attention, fuse.FUSED_QKV, None) is None for b in control_blocks)
    again = controlled_step(transformer, controlnet, 8, 20)
    torch.testing.assert_close(again[0], want[0][0], rtol=0, atol=0)


def test_the_vae_encoder_compiles_once_for_every_size_and_encodes_as_eager(fresh):
    from torch._dynamo.testing import CompileCounter

    vae = fresh.components.vae
    # Sizes under the CPU convolution's own size threshold (a guard of its own, not the compile's).
    images = [torch.rand(1, 3, h, w) * 2 - 1 for h, w in ((64, 64), (48, 96))]
    with torch.inference_mode():
        want = [vae.encode(i).latent_dist.mean for i in images]
    counter = CompileCounter()
    applied = accel.apply(fresh.components, accel.AccelOptions(compile=True, backend=counter, graph_steps=False))
    try:
        with torch.inference_mode():
            before = counter.frame_count
            got = [vae.encode(i).latent_dist.mean for i in images]
        assert counter.frame_count == before + 1  # dynamic height and width from the first image
        assert vae.encoder in applied.compiled
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    assert "forward" not in vars(vae.encoder)
    off = accel.apply(fresh.components, accel.AccelOptions(compile=True, backend="eager", vae_encoder=False))
    try:
        assert vae.encoder not in off.compiled and vae.decoder in off.compiled
    finally:
        off.revert_compile()
        torch._dynamo.reset()
