"""ControlNets (zturbo.control, loader.load_controlnet): every published form loads strictly with the
config its file needs, real-size configs are inferred as diffusers and ComfyUI place the layers,
bad files and names are refused by name, and the block samples equal diffusers' ZImageControlNetModel."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zturbo.control import controlnet_in_dim, resolve_controlnet, structure
from zturbo.control.model import file_sha256, own_parameters
from zturbo.errors import CheckpointError, InvalidRequestError, ModelNotFoundError
from zturbo.loader import load_components, load_controlnet, resolve_model
from zturbo.tiny import TRANSFORMER_CONFIG, tiny_controlnet_config, write_tiny_controlnet

CPU = torch.device("cpu")
VERSIONS = ("1.0", "2.0", "2.1")
REAL_TRANSFORMER = {"dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30}
# hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1's config.json (diffusers' own conversion of the file).
HLKY_2_1 = {
    "add_control_noise_refiner": "control_noise_refiner",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "control_in_dim": 33,
    "control_layers_places": list(range(0, 30, 2)),
    "control_refiner_layers_places": [0, 1],
    "dim": 3840,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """Every tiny form: (version, single_file) -> path."""
    root = tmp_path_factory.mktemp("controlnets")
    out = {}
    for version in VERSIONS:
        out[version, True] = write_tiny_controlnet(
            root / f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors", version
        )
        out[version, False] = write_tiny_controlnet(root / f"diffusers-{version}", version, single_file=False)
    return out


@pytest.fixture(scope="module")
def transformer(engine) -> torch.nn.Module:
    return engine.components.transformer


def reference(path: Path, version: str, transformer: torch.nn.Module) -> torch.nn.Module:
    """diffusers' own ZImageControlNetModel for the same weights: from_pretrained for a directory, the
    single-file converter and a strict load_state_dict for a file."""
    from diffusers import ZImageControlNetModel
    from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers

    if path.is_dir():
        model = ZImageControlNetModel.from_pretrained(path, torch_dtype=torch.float32)
    else:
        config = tiny_controlnet_config(version)
        model = ZImageControlNetModel(**config)
        state = convert_z_image_controlnet_checkpoint_to_diffusers(load_file(path), config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ZImageControlNetModel.from_transformer(model.eval(), transformer)


def forward_inputs(in_dim: int, seed: int = 0, rows: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(rows)]
    t = torch.full((rows,), 0.4)
    caps = [torch.randn(n, TRANSFORMER_CONFIG["cap_feat_dim"], generator=g) for n in (5, 40)[:rows]]
    context = [torch.randn(in_dim, 1, 8, 8, generator=g) for _ in range(rows)]
    return x, t, caps, context


@pytest.mark.parametrize("single_file", [True, False], ids=["single-file", "diffusers"])
@pytest.mark.parametrize("version", VERSIONS)
def test_each_published_form_loads_with_the_config_its_file_needs(files, transformer, version, single_file):
    path = files[version, single_file]
    loaded = load_controlnet(str(path), transformer, CPU, torch.float32)
    config = tiny_controlnet_config(version)
    assert loaded.version == f"union-{version}"
    assert loaded.control_in_dim == config["control_in_dim"]
    assert loaded.control_layers == config["control_layers_places"]
    assert loaded.model.config.add_control_noise_refiner == config["add_control_noise_refiner"]
    assert loaded.describe() == {
        "name": str(path),
        "version": f"union-{version}",
        "sha256": loaded.sha256,
        "control_in_dim": config["control_in_dim"],
        "control_layers": config["control_layers_places"],
    }
    # It shares the transformer's modules (diffusers' from_transformer) and owns only its own.
    assert loaded.model.noise_refiner is transformer.noise_refiner and loaded.model.t_embedder is transformer.t_embedder
    owned = {id(p) for p in own_parameters(loaded.model)}
    assert not owned & {id(p) for p in transformer.parameters()}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_inferred_config_loads_the_file_strictly_in_diffusers(files, transformer, version):
    from diffusers import ZImageControlNetModel
    from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers

    files_ = resolve_controlnet(str(files[version, True]))
    config, kept = structure.resolve_config(files_, transformer.config)
    assert config == tiny_controlnet_config(version)  # what the diffusers directory form says
    model = ZImageControlNetModel.from_config(config)
    state = convert_z_image_controlnet_checkpoint_to_diffusers(load_file(files_.weights[0]), config)
    result = model.load_state_dict(state, strict=True)  # raises on a missing or unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == kept
    if version == "2.0":  # the file's unused refiner blocks are left out, as diffusers' converter does
        assert any(k.startswith("control_noise_refiner.") for k in load_file(files_.weights[0]))
        assert not any(k.startswith("control_noise_refiner.") for k in kept)


def real_header(config: dict, extra: dict | None = None) -> dict:
    """The header a real-size file of `config` has: its meta-device model's names and shapes."""
    shapes = structure.expected_shapes(config)
    return {k: ("BF16", shape) for k, shape in shapes.items()} | (extra or {})


REAL_FILES = {
    # name: (config, refiner before_proj all zero, inferred version)
    "2.1": (HLKY_2_1, False, "union-2.1"),
    "2.1-lite": ({**HLKY_2_1, "control_layers_places": [0, 10, 20]}, False, "union-2.1-lite"),
    "2.0": ({**HLKY_2_1, "add_control_noise_refiner": "control_layers"}, True, "union-2.0"),
    "1.0": (
        {**HLKY_2_1, "control_in_dim": 16, "control_layers_places": [0, 5, 10, 15, 20, 25],
         "add_control_noise_refiner": None, "control_refiner_layers_places": None},
        None,
        "union-1.0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_size_configs_are_inferred_from_the_keys_alone(name):
    config, zero, want_version = REAL_FILES[name]
    header = real_header(config)
    if name == "2.0":  # the published 2.0 file carries refiner blocks with zero projections
        refiner = real_header({**HLKY_2_1, "control_layers_places": [0]})
        header |= {k: v for k, v in refiner.items() if k.startswith("control_noise_refiner.")}
    calls = []

    def before_proj_is_zero() -> bool:
        calls.append(1)
        return bool(zero)

    inferred = structure.infer_config(header, REAL_TRANSFORMER, name, before_proj_is_zero)
    assert inferred == config
    assert bool(calls) == (zero is not None)  # the tensor is read only where its value decides
    assert structure.version(inferred, REAL_TRANSFORMER, name) == want_version
    structure.check_fits(inferred, REAL_TRANSFORMER, name)


def test_a_15_layer_file_without_refiner_projections_is_2_0_as_diffusers_detects_it():
    header = real_header({**HLKY_2_1, "add_control_noise_refiner": None, "control_refiner_layers_places": None})
    assert structure.refiner_mode(header, lambda: pytest.fail("no before_proj to read")) == "control_layers"


def test_tile_and_8_step_files_are_named_by_their_file_names():
    version = structure.version(HLKY_2_1, REAL_TRANSFORMER, "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors")
    assert version == "tile-2.1-8steps"


def test_block_samples_equal_diffusers_on_the_same_weights(files, transformer):
    for (version, single_file), path in files.items():
        ours = load_controlnet(str(path), transformer, CPU, torch.float32).model
        theirs = reference(path, version, transformer)
        x, t, caps, context = forward_inputs(ours.config.control_in_dim)
        with torch.no_grad():
            want = theirs(x, t, caps, context, conditioning_scale=0.7)
            got = ours(x, t, caps, context, conditioning_scale=torch.tensor(0.7))
        assert sorted(got) == sorted(want) == ours.config.control_layers_places
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0, msg=f"{version} {single_file}")
        assert all(want[layer].abs().max() > 0 for layer in want)  # the projections are not zero
        other = forward_inputs(ours.config.control_in_dim, seed=1)[3]
        with torch.no_grad():
            moved = ours(x, t, caps, other, conditioning_scale=0.7)
        assert not torch.equal(moved[0], want[0])  # the control input changes what is added


def test_load_components_puts_it_on_the_components_and_none_without(tiny_dir, files):
    source = resolve_model(str(tiny_dir))
    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), torch.float32)
    assert load_components(source, CPU, dtypes).controlnet is None
    components = load_components(source, CPU, dtypes, controlnet=str(files["2.1", True]))
    assert components.controlnet.model.cap_embedder is components.transformer.cap_embedder
    assert {p.dtype for p in own_parameters(components.controlnet.model)} == {torch.float32}


def test_the_hash_is_the_files_and_is_computed_again_only_when_it_changes(files, tmp_path):
    path = tmp_path / "cn.safetensors"
    path.write_bytes(files["2.1", True].read_bytes())
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) == hashlib.sha256(bytes(data)).hexdigest()


# ---------------------------------------------------------------------------------------------
# Refusals


def test_a_file_that_is_not_a_controlnet_is_refused_saying_what_it_looks_like(tiny_dir, transformer):
    vae = tiny_dir / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match=r"is not a Z-Image ControlNet: it looks like a VAE"):
        load_controlnet(str(vae), transformer, CPU, torch.float32)
    with pytest.raises(CheckpointError, match=r"its config\.json describes a ZImageTransformer2DModel"):
        controlnet_in_dim(str(tiny_dir / "transformer"))  # a diffusers directory of the wrong model


def test_a_flux_controlnet_is_refused_by_name(tmp_path, transformer):
    flux = tmp_path / "flux-controlnet.safetensors"
    save_file(
        {"controlnet_x_embedder.weight": torch.zeros(4, 4), "controlnet_blocks.0.weight": torch.zeros(4, 4)}, flux
    )
    with pytest.raises(
        CheckpointError, match=rf"{flux.name} is not a Z-Image ControlNet: it looks like a FLUX ControlNet"
    ):
        load_controlnet(str(flux), transformer, CPU, torch.float32)


def test_a_controlnet_for_another_model_size_is_refused_before_loading(tmp_path, transformer):
    from diffusers import ZImageControlNetModel

    wide = ZImageControlNetModel(**{**tiny_controlnet_config("2.1"), "dim": 64})
    path = tmp_path / "wide.safetensors"
    save_file(wide.state_dict(), path)
    with pytest.raises(CheckpointError, match="has dim 64, this model's transformer has 32"):
        load_controlnet(str(path), transformer, CPU, torch.float32)
    directory = write_tiny_controlnet(tmp_path / "heads", "2.1", single_file=False)
    config = (directory / "config.json").read_text().replace('"n_heads": 2', '"n_heads": 4')
    (directory / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="has n_heads 4, this model's transformer has 2"):
        load_controlnet(str(directory), transformer, CPU, torch.float32)


def test_a_controlnet_for_another_model_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    import zturbo.loader as loader

    directory = write_tiny_controlnet(tmp_path / "heads", "2.1", single_file=False)
    config = (directory / "config.json").read_text().replace('"n_heads": 2', '"n_heads": 4')
    (directory / "config.json").write_text(config)
    monkeypatch.setattr(loader, "load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), torch.float32)
    with pytest.raises(CheckpointError, match="has n_heads 4, this model's transformer has 2"):
        load_components(resolve_model(str(tiny_dir)), CPU, dtypes, controlnet=str(directory))


def test_a_file_whose_tensors_do_not_fit_is_refused_naming_them(tmp_path, files, transformer):
    state = load_file(files["2.1", True])
    del state["control_layers.1.after_proj.bias"]
    state["control_layers.0.feed_forward.w1.weight"] = torch.zeros(8, 32)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(
        CheckpointError, match=r"1 missing \(control_layers.1.after_proj.bias\).*w1.weight is \(8, 32\)"
    ):
        load_controlnet(str(path), transformer, CPU, torch.float32)


def test_missing_bad_and_ambiguous_names_are_refused_naming_them(tmp_path, files):
    with pytest.raises(ModelNotFoundError, match=r"controlnet file .*nowhere.safetensors does not exist"):
        resolve_controlnet(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ModelNotFoundError, match=r"neither an existing \.safetensors file nor a directory nor a hub"):
        resolve_controlnet("no such thing")
    pickled = tmp_path / "cn.pth"
    pickled.write_bytes(b"x")
    with pytest.raises(InvalidRequestError, match=r"only \.safetensors files are loaded"):
        resolve_controlnet(str(pickled))
    folder = tmp_path / "several"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes(files["2.1", True].read_bytes())
    with pytest.raises(InvalidRequestError, match=r"several .safetensors files \(a.safetensors, b.safetensors\)"):
        resolve_controlnet(str(folder))
    (folder / "b.safetensors").unlink()
    assert resolve_controlnet(str(folder)).weights == (folder.resolve() / "a.safetensors",)


def test_a_truncated_file_is_refused_and_controlnet_in_dim_reads_its_header_only(tmp_path, files, transformer):
    path = tmp_path / "cut.safetensors"
    data = files["2.1", True].read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is whole, the tensors are not
    assert controlnet_in_dim(str(path)) == 33
    assert controlnet_in_dim(str(files["1.0", False])) == 16  # a directory: its config
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is corrupt or truncated"):
        load_controlnet(str(path), transformer, CPU, torch.float32)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable \.safetensors file"):
        controlnet_in_dim(str(path))


# ---------------------------------------------------------------------------------------------
# Hub repositories (from a cache laid out as huggingface_hub stores downloads; offline)


def fake_hub_repo(hub_cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_repo_with_several_files_needs_one_named(offline_hub, files, transformer):
    repo = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
    full, lite = files["2.1", True].read_bytes(), files["1.0", True].read_bytes()
    fake_hub_repo(
        offline_hub, repo, {"README.md": b"#", "Union-2.1.safetensors": full, "Union-2.1-lite.safetensors": lite}
    )
    with pytest.raises(
        InvalidRequestError,
        match=rf"several ControlNet files \(Union-2.1-lite.safetensors, Union-2.1.safetensors\); pick one as {repo}:",
    ):
        resolve_controlnet(repo)
    loaded = load_controlnet(f"{repo}:Union-2.1.safetensors", transformer, CPU, torch.float32)
    assert loaded.version == "union-2.1" and loaded.sha256 == hashlib.sha256(full).hexdigest()  # the blob's name
    assert controlnet_in_dim(f"{repo}:Union-2.1-lite.safetensors") == 16
    with pytest.raises(
        ModelNotFoundError, match=r"has no file 'Union-3.safetensors'; its .safetensors files: Union-2.1-lite"
    ):
        resolve_controlnet(f"{repo}:Union-3.safetensors")


def test_a_diffusers_hub_repo_and_a_missing_one(offline_hub, files, transformer):
    directory = files["2.1", False]
    fake_hub_repo(offline_hub, "hlky/cn", {p.name: p.read_bytes() for p in directory.iterdir()})
    loaded = load_controlnet("hlky/cn", transformer, CPU, torch.float32)
    assert loaded.version == "union-2.1" and controlnet_in_dim("hlky/cn") == 33
    with pytest.raises(ModelNotFoundError, match="controlnet repo owner/absent is not in the local Hugging Face cache"):
        resolve_controlnet("owner/absent")
