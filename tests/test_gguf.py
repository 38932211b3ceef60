"""GGUF transformers: loaded quantized through diffusers' GGUF support, against their dequantized weights."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zturbo.config import RuntimeConfig
from zturbo.engine import Engine
from zturbo.errors import CheckpointError, InvalidRequestError, ModelNotFoundError
from zturbo.loader import _file_digest, iter_tensors, resolve_model, weight_files
from zturbo.memory import plan as memory
from zturbo.tiny import TRANSFORMER_CONFIG

pytest.importorskip("gguf")

from gguf_files import dequantized, write_gguf

CPU32 = {"device": "cpu", "dtype": "float32"}
ARGS = {"seed": 3, "steps": 2, "width": 64, "height": 64}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def transformer_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    files = weight_files(tiny_dir / "transformer", "diffusion_pytorch_model")
    return {key: tensor for key, _, tensor in iter_tensors(files)}


@pytest.fixture(scope="module")
def files(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    state = transformer_state(tiny_dir)
    return {q: write_gguf(root / f"tiny-{q}.gguf", state, q) for q in ("Q8_0", "Q4_K", "Q4_0", "F16")}


def with_file(tiny_dir: Path, path: Path):
    return dataclasses.replace(resolve_model(str(tiny_dir)), transformer_file=path)


def dequantized_checkpoint(tiny_dir: Path, gguf: Path, target: Path) -> Path:
    """The tiny checkpoint with the GGUF file's weights, dequantized by the gguf package, as its transformer."""
    shutil.copytree(tiny_dir, target)
    for old in (target / "transformer").glob("diffusion_pytorch_model*"):
        old.unlink()
    weights = {k: v.contiguous() for k, v in dequantized(gguf).items()}
    save_file(weights, str(target / "transformer" / "diffusion_pytorch_model.safetensors"))
    return target


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q4_0", "F16"])
def test_a_gguf_transformer_gives_the_image_of_its_dequantized_weights(tiny_dir, files, tmp_path, qtype):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files[qtype]))
    reference = Engine.load(RuntimeConfig(model=str(dequantized_checkpoint(tiny_dir, files[qtype], tmp_path / "d"))))
    got = engine.generate("a red fox", **ARGS)
    expected = pixels(reference.generate("a red fox", **ARGS))
    assert np.abs(pixels(got) - expected).max() <= 1
    linear = engine.components.transformer.layers[0].attention.to_q
    if qtype == "F16":  # nothing quantized: plain linears in the compute dtype
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
    else:  # kept quantized on the device, dequantized at each call
        assert isinstance(linear, GGUFLinear) and linear.weight.dtype == torch.uint8
    weights = got.images[0].metadata["transformer_weights"]
    assert weights["file"] == files[qtype].name and weights["format"] == "gguf"
    assert weights["quantization"] == (qtype if qtype != "F16" else "F16+F32")
    if qtype == "Q4_K":  # the timestep MLP's rows (256, 1024 wide) fit super-blocks; the narrower ones take Q8_0
        assert [m.weight.quant_type.name for m in engine.components.transformer.t_embedder.mlp[::2]] == ["Q4_K"] * 2
        assert weights["types"]["Q4_K"] == 2 and weights["types"]["Q8_0"] > 2
    # The file's own identity: the model fingerprint covers the directory, the same for every file.
    others = {_file_digest(files[q]) for q in files if q != qtype}
    assert re.fullmatch("[0-9a-f]{64}", weights["fingerprint"]) and weights["fingerprint"] not in others


@pytest.fixture
def dequantizations(monkeypatch) -> list[tuple[str, bool]]:
    """Every GGUF dequantization from now on: (GGML type, whether Dynamo was tracing it). Traced
    calls are recorded when their graph runs (Dynamo replays the append), eager ones as they run."""
    import diffusers.quantizers.gguf.utils as gguf_utils

    calls: list[tuple[str, bool]] = []
    dequantize = gguf_utils.dequantize_gguf_tensor

    def recorded(tensor: torch.Tensor) -> torch.Tensor:
        calls.append((tensor.quant_type.name, torch.compiler.is_compiling()))
        return dequantize(tensor)

    monkeypatch.setattr(gguf_utils, "dequantize_gguf_tensor", recorded)  # GGUFLinear looks it up per call
    return calls


def test_a_compiled_gguf_transformer_dequantizes_only_inside_its_graphs(tiny_dir, files, tmp_path, dequantizations):
    # Eager on CUDA, a Q4_K dequantization copies index constants from pageable host memory, which
    # a step's CUDA-graph capture refuses; traced, Inductor writes them into its kernels. The tiny
    # file's Q4_K weights are the timestep MLP's: outside the blocks, in the transformer's own forward.
    from zturbo.accel import compile as accel

    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q4_K"]))
    options = accel.AccelOptions(compile=True, backend="eager", fuse=False)  # fuse: as Engine.load sets it for GGUF
    engine.accel = accel.apply(engine.components, options)
    dequantizations.clear()
    try:
        got = engine.generate("a red fox", **ARGS)
    finally:
        engine.accel.revert_compile()
        torch._dynamo.reset()
    assert set(dequantizations) == {("Q4_K", True), ("Q8_0", True)}
    reference = Engine.load(RuntimeConfig(model=str(dequantized_checkpoint(tiny_dir, files["Q4_K"], tmp_path / "d"))))
    assert np.abs(pixels(got) - pixels(reference.generate("a red fox", **ARGS))).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_compiled_q4_k_transformer_steps_through_cuda_graphs(tiny_dir, files):
    config = RuntimeConfig(model=str(tiny_dir), device="cuda", dtype="bfloat16", compile="on", compile_cache=None)
    engine = Engine.load(config, source=with_file(tiny_dir, files["Q4_K"]))
    images = [pixels(engine.generate("a red fox", **ARGS)) for _ in range(3)]  # captured on the second request
    graphs = engine.accel.step_graphs
    assert graphs is not None and graphs.failed is None and graphs.captures >= 1
    assert np.abs(images[2] - images[0]).max() <= 1


# The tiny transformer at width 256: its blocks' rows fit Q4_K's 256-weight super-blocks, as a real file's do.
WIDE = {**TRANSFORMER_CONFIG, "dim": 256, "n_layers": 1, "axes_dims": [64, 32, 32]}


def test_compiled_q4_k_blocks_trace_their_dequantization(tmp_path, dequantizations):
    from diffusers import ZImageTransformer2DModel

    from zturbo.accel import compile as accel
    from zturbo.gguf import load_transformer

    torch.manual_seed(0)
    plain = ZImageTransformer2DModel(**WIDE).eval()
    path = write_gguf(tmp_path / "wide-Q4_K.gguf", plain.state_dict(), "Q4_K")
    plain.load_state_dict(dequantized(path))
    model, _ = load_transformer(path, dict(plain.config), torch.device("cpu"), torch.float32)
    assert model.layers[0].feed_forward.w1.weight.quant_type.name == "Q4_K"
    inputs = ([torch.randn(16, 1, 8, 8)], torch.tensor([0.3]), [torch.randn(8, 16)])
    with torch.no_grad():
        eager, want = model(*inputs, return_dict=False)[0][0], plain(*inputs, return_dict=False)[0][0]
    applied = accel.Accel(accel.AccelOptions(compile=True, backend="eager", graph_steps=False))
    accel.compile_transformer(applied, model)  # fullgraph: a graph break in a block would raise
    dequantizations.clear()
    try:
        with torch.no_grad():
            got = model(*inputs, return_dict=False)[0][0]
    finally:
        applied.revert_compile()
        torch._dynamo.reset()
    assert ("Q4_K", True) in dequantizations and all(traced for _, traced in dequantizations)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
    # diffusers dequantizes through float16 scales, the gguf package in float32: 0.3 % of the spread.
    assert (got - want).abs().max() < 0.01 * want.std()


def test_the_coarse_quantization_changes_the_image(tiny_dir, files, engine):
    # What makes the comparison above tell weights apart: Q4_0's weights give another image.
    q4 = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q4_0"]))
    assert np.abs(pixels(q4.generate("a red fox", **ARGS)) - pixels(engine.generate("a red fox", **ARGS))).max() > 1


def test_an_unreadable_type_is_refused_by_name(tiny_dir, tmp_path):
    path = write_gguf(
        tmp_path / "mx.gguf", transformer_state(tiny_dir), "Q8_0", odd={"layers.1.feed_forward.w1.weight": "MXFP4"}
    )
    with pytest.raises(CheckpointError, match=r"'layers.1.feed_forward.w1.weight' is stored as MXFP4.*Q8_0"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, path))


def test_a_file_that_is_not_gguf_is_refused_by_name(tiny_dir, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match=r"cut\.gguf is not a readable GGUF file"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, bad))
    with pytest.raises(CheckpointError, match=r"does not exist"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, tmp_path / "none.gguf"))


def test_the_planner_counts_the_files_bytes(tiny_dir, files):
    from gguf import GGUFReader

    plain = memory.shape_from_source(resolve_model(str(tiny_dir)))
    q8 = memory.shape_from_source(with_file(tiny_dir, files["Q8_0"]))
    tensors = list(GGUFReader(files["Q8_0"]).tensors)
    # The quantized linear weights (34 bytes per 32 weights); the quantized pad tokens load dequantized.
    stored = [t for t in tensors if t.tensor_type.name == "Q8_0" and t.name.endswith(".weight")]
    assert q8.transformer_stored_bytes == sum(int(t.n_bytes) for t in stored)
    assert q8.transformer_params == plain.transformer_params  # weights, not bytes
    rest = plain.transformer_params - q8.transformer_stored_params
    assert memory._transformer_bytes(q8, 2, "none") == q8.transformer_stored_bytes + rest * 2
    # The file holds those bytes plus its F16/F32 tensors: the planner's count is the file's, at bf16.
    on_file = sum(int(t.n_bytes) for t in tensors)
    assert files["Q8_0"].stat().st_size >= on_file > memory._transformer_bytes(q8, 2, "none") * 0.9
    resident = dict(plan="resident", width=64, height=64)
    sizes = {"transformer": 2, "text_encoder": 2, "vae": 2}
    saved = memory.estimate(plain, sizes, **resident).peak - memory.estimate(q8, sizes, **resident).peak
    assert saved == plain.transformer_params * 2 - memory._transformer_bytes(q8, 2, "none") > 0


def test_the_loaded_engine_counts_what_the_planner_counted(tiny_dir, files):
    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q4_0"]))
    planned = memory.shape_from_source(with_file(tiny_dir, files["Q4_0"]))
    assert engine.shape == planned


def test_gguf_weights_are_never_quantized_again_nor_run_under_the_plain_weight_plan(tiny_dir, files):
    shape = memory.shape_from_source(with_file(tiny_dir, files["Q8_0"]))
    sizes = {"transformer": 2, "text_encoder": 2, "vae": 2}
    with pytest.raises(ValueError, match="GGUF"):
        memory.estimate(shape, sizes, plan="sequential", width=1024, height=1024)
    considered = memory.choose(shape, sizes, 1, width=1024, height=1024).considered  # nothing fits 1 byte
    assert {e.plan for e in considered} == {"resident", "te-offload", "block-offload", "model-offload"}
    source = with_file(tiny_dir, files["Q8_0"])
    refused = [
        ({"memory": "sequential"}, torch.bfloat16, "--memory sequential.*plain weights only.*GGUF"),
        ({"quantize": "int8"}, torch.bfloat16, "int8.*GGUF"),
        ({}, torch.float16, "GGUF.*cannot run in float16"),
    ]
    for flags, dtype, message in refused:
        config = RuntimeConfig(model=str(tiny_dir), **CPU32, **flags)
        with pytest.raises(InvalidRequestError, match=message):
            memory.plan_layout(config, source, {"transformer": dtype}, None, None, compiled_vae=False)


@pytest.mark.parametrize("plan", ["te-offload", "model-offload", "block-offload"])
def test_the_plans_a_gguf_transformer_runs_under_give_the_resident_image(tiny_dir, files, plan):
    source = with_file(tiny_dir, files["Q8_0"])
    resident = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=source)
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), memory=plan, **CPU32), source=source)
    result = planned.generate("a red fox", **ARGS)
    assert result.images[0].metadata["memory_plan"].startswith(plan)
    assert np.array_equal(pixels(result), pixels(resident.generate("a red fox", **ARGS)))


def test_streamed_gguf_blocks_move_the_files_bytes(tiny_dir, files):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    source = with_file(tiny_dir, files["Q8_0"])  # the tiny blocks' rows are too short for Q4_K's super-blocks
    resident = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=source)
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), memory="block-offload", **CPU32), source=source)
    streamer = planned.placement.streamers["transformer"]
    for prompt in ("a red fox", "a cat"):  # every block streamed, twice through its slot
        want = pixels(resident.generate(prompt, **ARGS))
        assert np.array_equal(pixels(planned.generate(prompt, **ARGS)), want)
    # The quantized weights keep their type tag and point into a slot; the host copy holds their
    # stored bytes (uint8 blocks), not dequantized floats.
    block = streamer.blocks[0]
    weight = block.module.attention.to_q.weight
    assert isinstance(weight, GGUFParameter) and weight.dtype == torch.uint8 and weight.quant_type.name == "Q8_0"
    slots = {s.untyped_storage().data_ptr() for s in streamer.slots}
    assert weight.untyped_storage().data_ptr() in slots
    tensors = [*block.module.parameters(), *block.module.buffers()]
    assert block.host.numel() == sum(-(-t.numel() * t.element_size() // 256) * 256 for t in tensors)
    assert weight.numel() == math.prod(weight.quant_shape) * 34 // 32  # Q8_0: 34 bytes per 32 weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming through CUDA slots needs a GPU")
def test_streamed_gguf_blocks_on_the_gpu_give_the_resident_image(tiny_dir, files):
    source = with_file(tiny_dir, files["Q8_0"])
    cuda = {"device": "cuda", "dtype": "bfloat16", "compile": "off"}
    resident = Engine.load(RuntimeConfig(model=str(tiny_dir), **cuda), source=source)
    planned = Engine.load(RuntimeConfig(model=str(tiny_dir), memory="block-offload", **cuda), source=source)
    planned.placement.change(memory.Layout("block-offload"))  # every block streams
    weight = planned.placement.streamers["transformer"].blocks[0].module.attention.to_q.weight
    assert weight.is_cuda and weight.quant_type.name == "Q8_0"
    for prompt in ("a red fox", "a cat"):
        assert np.array_equal(pixels(planned.generate(prompt, **ARGS)), pixels(resident.generate(prompt, **ARGS)))


def test_a_lora_is_refused_with_a_gguf_transformer(tiny_dir, files, engine, tmp_path):
    from loras import write_lora
    from zturbo.errors import LoraError

    lora = tmp_path / "style.safetensors"
    write_lora(lora, "peft", engine.components.transformer)
    gguf_engine = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q8_0"]))
    with pytest.raises(LoraError, match=r"LoRAs cannot merge into the transformer of tiny-Q8_0\.gguf"):
        gguf_engine.generate("a red fox", loras=[(str(lora), 1.0)], **ARGS)


def test_the_transformer_flag_alone_takes_a_gguf_file_beside_the_models_other_parts(tiny_dir, files, tmp_path):
    config = RuntimeConfig(model=str(tiny_dir), transformer_file=str(files["Q8_0"]), **CPU32)
    assert config.component_files() == {"transformer": str(files["Q8_0"])}
    by_flag = Engine.load(config)
    assert by_flag.components.transformer_weights["format"] == "gguf"
    direct = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q8_0"]))
    args = {"seed": 3, "steps": 2, "width": 64, "height": 64}
    assert np.array_equal(np.asarray(by_flag.generate("a fox", **args).images[0].image),
                          np.asarray(direct.generate("a fox", **args).images[0].image))  # fmt: skip
    with pytest.raises(InvalidRequestError, match="single files come as a set"):
        RuntimeConfig(model=str(tiny_dir), transformer_file=str(tmp_path / "t.safetensors"))  # not GGUF: all three
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Engine.load(RuntimeConfig(model=str(tiny_dir), transformer_file=str(tmp_path / "none.gguf"), **CPU32))


def test_info_names_the_model_and_its_gguf_transformer(tiny_dir, files, capsys):
    from zturbo.cli import main

    assert main(["info", "--model", str(tiny_dir), "--transformer", str(files["Q8_0"]), "--device", "cpu"]) == 0
    assert f"+ GGUF transformer {files['Q8_0']}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "says"), [({"quantize": "int8"}, "--quantize int8"), ({"memory": "sequential"}, "--memory sequential")]
)
def test_settings_a_gguf_transformer_refuses_are_refused_with_the_config(tmp_path, setting, says):
    # Before any model is resolved or downloaded: the file need not even exist yet.
    with pytest.raises(InvalidRequestError, match=says):
        RuntimeConfig(model="Tongyi-MAI/Z-Image-Turbo", transformer_file=str(tmp_path / "t.gguf"), **setting)


# ---------------------------------------------------------------------------------------------
# A GGUF transformer with ComfyUI's single files, or beside a checkpoint without transformer weights


def without_transformer_weights(tiny_dir: Path, target: Path) -> Path:
    """The tiny checkpoint with its transformer's config but none of its weights."""
    shutil.copytree(tiny_dir, target)
    for weights in (target / "transformer").glob("diffusion_pytorch_model*"):
        weights.unlink()
    return target


def gguf_comfy_tree(tiny_dir: Path, target: Path, *transformers: Path) -> Path:
    """A ComfyUI tree whose diffusion_models/ holds only GGUF transformers (ComfyUI's text encoder and VAE)."""
    from test_singlefile import write_comfy_files

    written = write_comfy_files(tiny_dir, target)
    written["transformer"].unlink()
    for path in transformers:
        shutil.copy(path, written["transformer"].parent / path.name)
    return target


def test_a_gguf_transformer_loads_with_comfyuis_single_files_and_no_checkpoint(capsys, tiny_dir, files, tmp_path):
    from clirun import pixels as png_pixels
    from clirun import run
    from zturbo.imageio import read_metadata

    gen = ("a red fox", "--seed", "7", "--width", "64", "--height", "48", "--steps", "3", "--device", "cpu")
    gen += ("--dtype", "float32")
    tree = gguf_comfy_tree(tiny_dir, tmp_path / "ComfyUI", files["Q8_0"])
    models = tree / "models"
    runs = {
        "beside --model": ("--model", tiny_dir, "--transformer", files["Q8_0"]),
        "models tree": ("--model", tree),
        "three files": (
            "--transformer", files["Q8_0"],
            "--text-encoder", models / "text_encoders" / "qwen_3_4b.safetensors",
            "--vae", models / "vae" / "ae.safetensors",
        ),
    }  # fmt: skip
    images = {}
    for name, model_args in runs.items():
        out = tmp_path / f"{name}.png"
        code, _, err = run(capsys, "generate", *gen, *model_args, "-o", out)
        assert code == 0, f"{name}: {err}"
        images[name] = png_pixels(out)
        assert read_metadata(out)["transformer_weights"]["file"] == "tiny-Q8_0.gguf", name
    assert images["beside --model"].std() > 0
    assert np.array_equal(images["models tree"], images["beside --model"])
    assert np.array_equal(images["three files"], images["beside --model"])
    source = resolve_model(str(tree))
    assert source.transformer_file == (models / "diffusion_models" / "tiny-Q8_0.gguf").resolve()
    assert source.origin == "single-files"
    assert not list(source.path.rglob("*.safetensors"))  # the package's configs and tokenizer, no weights


def test_a_tree_with_several_gguf_files_takes_the_one_the_flag_names(tiny_dir, files, tmp_path):
    tree = gguf_comfy_tree(tiny_dir, tmp_path / "ComfyUI", files["Q8_0"], files["Q4_K"])
    with pytest.raises(ModelNotFoundError, match=r"several transformer files.*pass --transformer FILE"):
        resolve_model(str(tree))
    chosen = tree / "models" / "diffusion_models" / "tiny-Q4_K.gguf"
    source = resolve_model(str(tree), files={"transformer": str(chosen)})
    assert source.transformer_file == chosen.resolve() and source.files.transformer == chosen.resolve()
    with pytest.raises(CheckpointError, match=r"not a Z-Image transformer file"):
        resolve_model(str(tree), files={"transformer": str(write_foreign_gguf(tmp_path / "llm.gguf"))})


def test_info_takes_the_gguf_file_the_flag_names_from_a_tree_with_several(capsys, tiny_dir, files, tmp_path):
    from clirun import run

    base = shutil.copy(files["Q4_K"], tmp_path / "z_image-Q4_K.gguf")  # named as the base model's
    tree = gguf_comfy_tree(tiny_dir, tmp_path / "ComfyUI", files["Q8_0"], Path(base))
    chosen = tree / "models" / "diffusion_models" / "z_image-Q4_K.gguf"
    code, text, err = run(capsys, "info", "--model", tree, "--transformer", chosen, "--device", "cpu")
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in text.splitlines() if line.startswith(("model ", "profile ")))
    assert rows["model"].strip() == f"{tree}  (ComfyUI single files) + GGUF transformer {chosen}"
    assert rows["profile"].startswith("base (file name): 28 steps") and "scheduler shift 6.0" in rows["profile"]


def test_a_gguf_named_as_the_base_model_beside_turbos_directory_runs_as_base(capsys, tiny_dir, files, tmp_path):
    from clirun import run

    gguf = shutil.copy(files["Q8_0"], tmp_path / "z_image-Q8_0.gguf")
    code, text, err = run(capsys, "info", "--model", tiny_dir, "--transformer", gguf, "--device", "cpu")
    assert code == 0, err
    assert "base (file name): 28 steps" in text and "scheduler shift 6.0" in text
    assert f"transformer file {gguf} is named as the base model's, but {tiny_dir}" in err
    engine = Engine.load(RuntimeConfig(model=str(tiny_dir), transformer_file=str(gguf), **CPU32))
    assert (engine.profile.profile.name, engine.profile.how) == ("base", "file name")  # as info said
    assert engine.components.scheduler_config["shift"] == 6.0
    preset = Engine.load(RuntimeConfig(model=str(tiny_dir), transformer_file=str(gguf), preset="turbo", **CPU32))
    assert preset.profile.how == "preset" and preset.components.scheduler_config["shift"] == 3.0


def write_foreign_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_beside_a_checkpoint_never_needs_its_transformer_weights(tiny_dir, files, tmp_path, monkeypatch):
    import huggingface_hub

    bare = without_transformer_weights(tiny_dir, tmp_path / "bare")
    config = RuntimeConfig(model=str(bare), transformer_file=str(files["Q8_0"]), **CPU32)
    got = Engine.load(config).generate("a red fox", **ARGS)
    full = Engine.load(RuntimeConfig(model=str(tiny_dir), **CPU32), source=with_file(tiny_dir, files["Q8_0"]))
    assert np.array_equal(pixels(got), pixels(full.generate("a red fox", **ARGS)))
    # The checkpoint's transformer weights play no part in its identity either.
    assert got.images[0].metadata["model_fingerprint"] == full.model.fingerprint
    with pytest.raises(CheckpointError, match=r"no weights in .*transformer"):
        resolve_model(str(bare))  # without the GGUF file they are needed
    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append(allow_patterns)
        return str(bare)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = resolve_model("Tongyi-MAI/Z-Image-Turbo", files={"transformer": str(files["Q8_0"])})
    assert source.transformer_file == files["Q8_0"].resolve() and source.origin == "hf"
    assert "transformer/*.safetensors" not in asked[0] and "vae/*.safetensors" in asked[0]


def test_settings_a_gguf_transformer_refuses_are_refused_with_a_file_set(tmp_path):
    with pytest.raises(InvalidRequestError, match="--quantize int8"):
        RuntimeConfig(
            transformer_file=str(tmp_path / "t.gguf"),
            text_encoder_file=str(tmp_path / "te.safetensors"),
            vae_file=str(tmp_path / "ae.safetensors"),
            quantize="int8",
        )


def test_block_offload_is_accepted_with_a_gguf_transformer(tmp_path):
    gguf = str(tmp_path / "t.gguf")  # checked before any download: the file need not exist yet
    config = RuntimeConfig(model="Tongyi-MAI/Z-Image-Turbo", transformer_file=gguf, memory="block-offload")
    assert config.memory == "block-offload" and config.gguf_transformer()
