"""ComfyUI's single files: the tiny checkpoint rewritten in ComfyUI's key layout loads from a
models/ tree and through --transformer/--text-encoder/--vae with the diffusers layout's pixels;
fp8-scaled files load with their scales; truncated, foreign and unreadable files are refused by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clirun import pixels, run
from zturbo.config import RuntimeConfig
from zturbo.errors import CheckpointError, InvalidRequestError, ModelNotFoundError
from zturbo.loader import fingerprint, resolve_model

# ---------------------------------------------------------------------------------------------
# The converter: diffusers names -> ComfyUI's, written from ComfyUI's model code
# (comfy/ldm/lumina/model.py NextDiT: fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
# `x_embedder`, `final_layer`, an unused `norm_final`; comfy/ldm/modules/diffusionmodules/model.py
# Encoder/Decoder for FLUX's ae: `down.i.block.j`, `mid.block_1`, `mid.attn_1.{norm,q,k,v,proj_out}`
# as 1x1 convolutions, `up.i` numbered from the bottom; comfy/text_encoders/llama.py: Qwen3 with
# transformers' `model.` names).

_TRANSFORMER_RENAMES = (
    (r"^all_x_embedder\.2-1\.", "x_embedder."),
    (r"^all_final_layer\.2-1\.", "final_layer."),
    (r"\.attention\.to_out\.0\.", ".attention.out."),
    (r"\.attention\.norm_q\.", ".attention.q_norm."),
    (r"\.attention\.norm_k\.", ".attention.k_norm."),
)


def comfy_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if key.endswith(".attention.to_q.weight"):
            block = key.removesuffix(".to_q.weight")
            parts = [state[f"{block}.to_{x}.weight"] for x in "qkv"]
            out[f"{block}.qkv.weight"] = torch.cat(parts, dim=0)
            continue
        for pattern, new in _TRANSFORMER_RENAMES:
            key = re.sub(pattern, new, key)
        out[key] = tensor
    dim = state["cap_pad_token"].shape[-1]
    out["norm_final.weight"] = torch.randn(dim)  # NextDiT has one; Z-Image never uses it
    return out


def comfy_vae(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    resnet = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", key):
            side, kind, i, j, layer, leaf = m.groups()
            i = int(i) if kind == "down" else blocks - 1 - int(i)
            new = f"{side}.{kind}.{i}.block.{j}.{resnet.get(layer, layer)}.{leaf}"
        elif m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(\w+)$", key):
            side, kind, i, _, leaf = m.groups()
            i = int(i) if kind == "down" else blocks - 1 - int(i)
            new = f"{side}.{kind}.{i}.{kind}sample.conv.{leaf}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)$", key):
            side, j, layer, leaf = m.groups()
            new = f"{side}.mid.block_{int(j) + 1}.{layer}.{leaf}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            side, layer, leaf = m.groups()
            new = f"{side}.mid.attn_1.{attn[layer]}.{leaf}"
            if leaf == "weight" and layer != "group_norm":
                tensor = tensor[:, :, None, None]  # ComfyUI's attention projections are 1x1 convolutions
        out[new] = tensor.contiguous()
    return out


def read_component(root: Path, component: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted((root / component).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return state


def write_comfy_files(root: Path, target: Path) -> dict[str, Path]:
    """The checkpoint at `root` as ComfyUI's three files under `target`/models/ (dtypes kept)."""
    blocks = len(json.loads((root / "vae" / "config.json").read_text())["block_out_channels"])
    files = {
        "transformer": target / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors",
        "text_encoder": target / "models" / "text_encoders" / "qwen_3_4b.safetensors",
        "vae": target / "models" / "vae" / "ae.safetensors",
    }
    states = {
        "transformer": comfy_transformer(read_component(root, "transformer")),
        "text_encoder": read_component(root, "text_encoder"),
        "vae": comfy_vae(read_component(root, "vae"), blocks),
    }
    for component, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(states[component], str(path))
    return files


@pytest.fixture(scope="module")
def comfy_tree(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("ComfyUI")
    write_comfy_files(tiny_dir, target)
    # What else a models/ tree holds: another model's transformer and a CLIP text encoder.
    save_file(
        {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
        str(target / "models" / "diffusion_models" / "flux1-dev.safetensors"),
    )
    save_file(
        {"text_model.embeddings.position_ids": torch.zeros(1, 2)},
        str(target / "models" / "text_encoders" / "clip_l.safetensors"),
    )
    return target


GEN = ("--seed", "7", "--width", "64", "--height", "48", "--steps", "3", "--device", "cpu", "--dtype", "float32")


def generate(capsys, out: Path, *model_args: str) -> np.ndarray:
    code, _, err = run(capsys, "generate", "a red fox", *model_args, *GEN, "-o", out)
    assert code == 0, err
    return pixels(out)


# ---------------------------------------------------------------------------------------------


def test_models_tree_and_flags_give_the_diffusers_layouts_pixels(capsys, tiny_dir, comfy_tree, tmp_path):
    reference = generate(capsys, tmp_path / "ref.png", "--model", tiny_dir)
    from_tree = generate(capsys, tmp_path / "tree.png", "--model", comfy_tree)
    models = comfy_tree / "models"
    from_flags = generate(
        capsys, tmp_path / "flags.png",
        "--transformer", models / "diffusion_models" / "z_image_turbo_bf16.safetensors",
        "--text-encoder", models / "text_encoders" / "qwen_3_4b.safetensors",
        "--vae", models / "vae" / "ae.safetensors",
    )  # fmt: skip
    assert reference.std() > 0
    assert np.array_equal(from_tree, reference)
    assert np.array_equal(from_flags, reference)


def test_a_flat_directory_and_the_environment_name_the_files(tiny_dir, comfy_tree, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (comfy_tree / "models").rglob("*.safetensors"):
        if path.name in ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"):
            shutil.copy(path, flat / path.name)
    source = resolve_model(str(flat))
    assert source.files is not None and source.files.vae == (flat / "ae.safetensors").resolve()
    assert (source.path / "tokenizer" / "tokenizer.json").is_file()
    names = {
        "transformer": "z_image_turbo_bf16.safetensors",
        "text_encoder": "qwen_3_4b.safetensors",
        "vae": "ae.safetensors",
    }
    environ = {f"ZTURBO_{c.upper()}_FILE": str(flat / n) for c, n in names.items()}
    config = RuntimeConfig.from_env(environ)
    assert config.component_files() == {c: str(flat / n) for c, n in names.items()}
    # The fingerprint follows the files' content, not the shared config directory.
    before = fingerprint(source)
    with safe_open(str(flat / "ae.safetensors"), framework="pt") as f:
        vae = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 1
    save_file(vae, str(flat / "ae.safetensors"))
    assert fingerprint(resolve_model(str(flat))) != before


def test_the_lora_base_reader_reads_the_single_file(tiny_dir, comfy_tree):
    from diffusers import ZImageTransformer2DModel

    from zturbo.loader import _empty, base_reader

    source = resolve_model(str(comfy_tree))
    assert not list(source.path.rglob("*.safetensors"))  # configs and tokenizer only
    module = _empty(lambda: ZImageTransformer2DModel.from_config(source.config("transformer")))
    read = base_reader(source, module, torch.bfloat16)
    reference = base_reader(resolve_model(str(tiny_dir)), module, torch.bfloat16)
    for key in (
        "layers.1.attention.to_k.weight",
        "all_x_embedder.2-1.weight",
        "context_refiner.0.attention.to_v.weight",
    ):
        assert read(key).dtype == torch.bfloat16
        assert torch.equal(read(key), reference(key))


def test_the_flags_come_as_a_set():
    with pytest.raises(InvalidRequestError, match="text_encoder_file and vae_file missing"):
        RuntimeConfig(transformer_file="t.safetensors")


def test_real_size_configs_are_the_published_ones():
    from transformers import Qwen3Config

    from zturbo import singlefile, tiny
    from zturbo.bench.common import QWEN3_4B_CONFIG

    published = {c: singlefile.variant_config(singlefile.PUBLISHED_VARIANT, c) for c in singlefile.PARTS}
    assert published["text_encoder"] == tiny.published_text_encoder_config(Qwen3Config(**QWEN3_4B_CONFIG))
    assert {k: v for k, v in published["vae"].items() if not k.startswith("_")} == tiny.FLUX_VAE_CONFIG
    assert published["transformer"]["dim"] == 3840 and published["transformer"]["n_layers"] == 30


def test_truncated_file_is_refused_by_name(capsys, comfy_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(comfy_tree, tree)
    vae = tree / "models" / "vae" / "ae.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1000])
    code, _, err = run(capsys, "generate", "a fox", "--model", tree, *GEN, "-o", tmp_path / "x.png")
    assert code == 1
    assert f"{vae} is truncated or corrupt" in err


def test_a_flux_file_is_refused_by_name(comfy_tree):
    flux = comfy_tree / "models" / "diffusion_models" / "flux1-dev.safetensors"
    models = comfy_tree / "models"
    files = {
        "transformer": str(flux),
        "text_encoder": str(models / "text_encoders" / "qwen_3_4b.safetensors"),
        "vae": str(models / "vae" / "ae.safetensors"),
    }
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(flux))} is not a Z-Image transformer file: it looks like a FLUX.1 transformer",
    ):
        resolve_model("unused", files=files)
    files["transformer"], files["vae"] = files["vae"], files["transformer"]
    with pytest.raises(CheckpointError, match="is a Z-Image vae file, not a transformer file"):
        resolve_model("unused", files=files)


def test_a_missing_component_names_what_was_looked_at(comfy_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(comfy_tree, tree)
    (tree / "models" / "vae" / "ae.safetensors").unlink()
    with pytest.raises(
        ModelNotFoundError, match=r"holds no Z-Image vae file \(expected vae/ae.safetensors; found .*clip_l"
    ):
        resolve_model(str(tree))


def test_an_extra_tensor_is_refused_before_any_weight_loads(comfy_tree, tmp_path):
    from zturbo.engine import Engine

    tree = tmp_path / "tree"
    shutil.copytree(comfy_tree, tree)
    path = tree / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["layers.0.attention.extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'layers.0.attention.extra.weight'"):
        Engine.load(RuntimeConfig(model=str(tree), device="cpu", dtype="float32"), warmup=False)


def test_a_mis_sized_file_set_names_the_shape(comfy_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(comfy_tree, tree)
    path = tree / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["cap_embedder.1.weight"] = torch.zeros(32, 24)
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError, match=r"'cap_embedder.1.weight' has shape \(32, 24\), Z-Image-Turbo's is \(3840, 2560\)"
    ):
        resolve_model(str(tree))


# ---------------------------------------------------------------------------------------------
# fp8


def scaled_fp8(state: dict[str, torch.Tensor], style: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ComfyUI's fp8 file, the weights it stands for): 2-D block weights as float8_e4m3fn with a
    per-tensor scale, as ComfyUI writes them: `scale_weight`, `scale_input` and a `scaled_fp8` marker
    (scaled_fp8), or `weight_scale` with a `comfy_quant` JSON entry (its mixed-precision files)."""
    file: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    if style == "scaled_fp8":
        file["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2 and key.startswith(("layers.", "noise_refiner.")):
            scale = tensor.abs().amax().float() / 448.0
            q = (tensor.float() / scale).to(torch.float8_e4m3fn)
            layer = key.removesuffix(".weight")
            file[key] = q
            if style == "scaled_fp8":
                file[f"{layer}.scale_weight"], file[f"{layer}.scale_input"] = scale.reshape(1), torch.ones(1)
            else:
                file[f"{layer}.weight_scale"] = scale
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                file[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
            dequantized[key] = q.to(torch.float32) * scale
        else:
            file[key] = tensor
            dequantized[key] = tensor
    return file, dequantized


_QUANT_KEYS = ("scale_weight", "scale_input", "scaled_fp8", "weight_scale", "comfy_quant")


@pytest.mark.parametrize("style", ["scaled_fp8", "comfy_quant"])
def test_scaled_fp8_loads_with_its_scales(capsys, tiny_dir, comfy_tree, tmp_path, style):
    models = comfy_tree / "models"
    with safe_open(str(models / "diffusion_models" / "z_image_turbo_bf16.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fp8, dequantized = scaled_fp8(state, style)
    tree, expected, unscaled = tmp_path / "fp8", tmp_path / "dequantized", tmp_path / "unscaled"
    for root in (tree, expected, unscaled):
        shutil.copytree(comfy_tree, root)
    name = "models/diffusion_models/z_image_turbo_bf16.safetensors"
    (tree / name).unlink()
    save_file(fp8, str(tree / "models" / "diffusion_models" / "z_image_turbo_fp8_scaled.safetensors"))
    save_file(dequantized, str(expected / name))
    save_file({k: v for k, v in fp8.items() if not k.endswith(_QUANT_KEYS)}, str(unscaled / name))
    code, _, err = run(capsys, "generate", "a red fox", "--model", tree, *GEN, "-o", tmp_path / "fp8.png")
    assert code == 0, err
    got = pixels(tmp_path / "fp8.png")
    weights = sum(1 for k in fp8 if k.endswith(".weight") and fp8[k].dtype == torch.float8_e4m3fn)
    assert f"transformer: {weights} fp8 weights ({weights} scaled) dequantized to torch.float32" in err
    assert np.array_equal(got, generate(capsys, tmp_path / "want.png", "--model", expected))
    assert not np.array_equal(got, generate(capsys, tmp_path / "raw.png", "--model", unscaled))


def test_an_unreadable_quantization_is_refused_naming_it(comfy_tree, tmp_path):
    from zturbo.engine import Engine

    tree = tmp_path / "tree"
    shutil.copytree(comfy_tree, tree)
    path = tree / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    conf = json.dumps({"format": "nvfp4"}).encode()
    state["layers.0.feed_forward.w1.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"'layers.0.feed_forward.w1.comfy_quant' is quantized as 'nvfp4'"):
        Engine.load(RuntimeConfig(model=str(tree), device="cpu", dtype="float32"), warmup=False)


def test_the_shipped_configs_fit_comfyuis_real_size_layout(monkeypatch):
    """Real-size ComfyUI headers (meta tensors, no weights) plan against the shipped configs."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoConfig, Qwen3Model

    from zturbo import singlefile
    from zturbo.loader import _empty, text_encoder_key

    root = singlefile.config_dir(singlefile.PUBLISHED_VARIANT)
    transformer = _empty(
        lambda: ZImageTransformer2DModel.from_config(singlefile.variant_config("Z-Image-Turbo", "transformer"))
    )
    vae = _empty(lambda: AutoencoderKL.from_config(singlefile.variant_config("Z-Image-Turbo", "vae")))
    text_encoder = _empty(lambda: Qwen3Model._from_config(AutoConfig.from_pretrained(root / "text_encoder")))
    with torch.device("meta"):
        states = {
            "transformer": comfy_transformer(transformer.state_dict()),
            "vae": comfy_vae(vae.state_dict(), 4),
            "text_encoder": {f"model.{k}": v for k, v in text_encoder.state_dict().items()},
        }
    headers = {c: {k: ("BF16", tuple(v.shape)) for k, v in s.items()} for c, s in states.items()}
    monkeypatch.setattr(singlefile, "_header", lambda path: headers[path.name])
    files = singlefile.FileSet(Path("transformer"), Path("text_encoder"), Path("vae"))
    assert singlefile.variant_of(files) == "Z-Image-Turbo"
    modules = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    for component, module in modules.items():
        rename = text_encoder_key(set(module.state_dict())) if component == "text_encoder" else (lambda k: k)
        plan = singlefile.plan(
            component,
            files.path(component),
            module.config.to_dict() if component == "text_encoder" else module.config,
            module,
            rename,
        )
        assert sum(len(p) for p in plan.pieces.values()) == len(module.state_dict())
    qkv = dict(singlefile.plan("transformer", files.transformer, transformer.config, transformer).pieces)[
        "layers.29.attention.qkv.weight"
    ]
    assert [(p.key, p.offset) for p in qkv] == [
        (f"layers.29.attention.to_{x}.weight", i * 3840 * 3840) for i, x in enumerate("qkv")
    ]


@pytest.mark.parametrize(
    ("name", "profile", "how"),
    [
        ("Z-Image-Turbo-Q8_0.gguf", "turbo", "file name"),
        ("z_image_fp8_e4m3fn_scaled.safetensors", "base", "file name"),
        ("Z-Image-Q4_K_M.gguf", "base", "file name"),
        ("z_image_base_v1.safetensors", "base", "file name"),
        ("z_image_realism_v2.safetensors", "turbo", "assumed"),  # a fine-tune's name tells neither model
        ("z_image_bf16_realism.safetensors", "turbo", "assumed"),
        ("z_image_fp8merged_realistic.safetensors", "turbo", "assumed"),
        ("z_image_IQ4_XS.gguf", "base", "file name"),
        ("my_finetune.safetensors", "turbo", "assumed"),
    ],
)
def test_only_the_base_models_own_names_select_its_profile(name, profile, how):
    from zturbo.profiles import file_name_profile

    chosen = file_name_profile("auto", name)
    assert (chosen.profile.name, chosen.how) == (profile, how)


@pytest.mark.parametrize(
    ("name", "preset", "profile", "how"),
    [
        ("z_image_turbo_bf16.safetensors", "auto", "turbo", "file name"),
        ("z_image_bf16.safetensors", "auto", "base", "file name"),  # the base model, as ComfyUI names it
        ("my_finetune.safetensors", "auto", "turbo", "assumed"),
        ("my_finetune.safetensors", "base", "base", "preset"),
    ],
)
def test_a_single_files_profile_comes_from_its_name_or_the_preset(comfy_tree, tmp_path, name, preset, profile, how):
    from zturbo.profiles import scheduler_config

    models = comfy_tree / "models"
    renamed = tmp_path / name
    shutil.copy(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", renamed)
    files = {"transformer": str(renamed), "text_encoder": str(models / "text_encoders" / "qwen_3_4b.safetensors"),
             "vae": str(models / "vae" / "ae.safetensors")}  # fmt: skip
    source = resolve_model("unused", files=files)
    chosen = source.profile(preset)
    assert (chosen.profile.name, chosen.how) == (profile, how)
    # The packaged scheduler config is Turbo's: a base profile must bring its own shift.
    assert scheduler_config(chosen, source.config("scheduler"))["shift"] == chosen.profile.shift


def test_info_shows_the_profile_the_three_files_load_with(capsys, comfy_tree, tmp_path):
    models = comfy_tree / "models"
    base = tmp_path / "z_image_bf16.safetensors"  # the base model's file, as ComfyUI names it
    shutil.copy(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", base)
    files = ("--transformer", base, "--text-encoder", models / "text_encoders" / "qwen_3_4b.safetensors",
             "--vae", models / "vae" / "ae.safetensors")  # fmt: skip
    code, text, err = run(capsys, "info", *files, "--device", "cpu")
    assert code == 0, err
    line = next(line for line in text.splitlines() if line.startswith("profile"))
    assert line.split(None, 1)[1].startswith("base (file name): 28 steps") and "scheduler shift 6.0" in line


def test_info_names_a_comfyui_tree_as_single_files(capsys, comfy_tree, tiny_dir):
    from zturbo.loader import describe_origin

    code, text, err = run(capsys, "info", "--model", comfy_tree, "--device", "cpu")
    assert code == 0, err
    assert f"{comfy_tree}  (ComfyUI single files)" in text
    assert describe_origin(str(comfy_tree / "models")) == "ComfyUI single files"
    assert describe_origin(str(tiny_dir)) == "local directory"  # a diffusers directory
