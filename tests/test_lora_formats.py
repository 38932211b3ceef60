"""LoRA files: every layout maps onto the transformer with the delta its trainer meant (checked
against tests/loras.py's independent arithmetic and against diffusers + peft themselves), every
refusal names what it refuses, and the library never leaves its directory."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from loras import (
    FORMATS,
    kohya_name,
    save,
    select_modules,
    write_flux_lora,
    write_lora,
    write_partial_lora,
    write_sdxl_lora,
    write_text_encoder_lora,
)
from zturbo.adapters import library as library_module
from zturbo.adapters.formats import (
    ParsedLora,
    linear_targets,
    parse,
    published_targets,
    read_file,
)
from zturbo.adapters.library import LoraLibrary
from zturbo.errors import LoraError
from zturbo.tiny import TRANSFORMER_CONFIG

LAYOUT = {
    "peft": "diffusers",
    "kohya": "kohya",
    "comfyui": "comfyui",
    "dot-names": "dot-names",
    "fused-qkv": "dot-names",
    "kohya-qkv": "kohya",
    "lokr": "lokr",
    "lokr-full": "lokr",
    "lokr-kohya": "lokr",
    "loha": "loha",
}
# What diffusers 0.42.1 + peft load themselves (LoHa and LyCORIS-named LoKr they cannot).
DIFFUSERS_READS = ("peft", "kohya", "comfyui", "dot-names", "fused-qkv", "kohya-qkv", "lokr", "lokr-full")


def _transformer(**overrides: object) -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides}).eval()


@pytest.fixture(scope="module")
def transformer() -> ZImageTransformer2DModel:
    return _transformer()


@pytest.fixture(scope="module")
def targets(transformer: ZImageTransformer2DModel) -> dict[str, tuple[int, int]]:
    return linear_targets(transformer)


def _load(path: Path, targets: dict[str, tuple[int, int]]) -> ParsedLora:
    return parse(*read_file(path), targets, name=path.name)


def _deltas(parsed: ParsedLora) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for patch in parsed.patches:
        out[patch.target] = out.get(patch.target, 0) + patch.delta()
    return out


def _diffusers_deltas(path: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """Weight after diffusers loads and fuses the file, minus the weight before."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    model = _transformer()
    before = {m: model.get_submodule(m).weight.detach().clone() for m in modules}
    state_dict, metadata = ZImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model.load_lora_adapter(state_dict, prefix="transformer", metadata=metadata, adapter_name="test")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {m: model.get_submodule(m).weight.detach() - before[m] for m in modules}


def _assert_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, atol=1e-5, rtol=1e-4, msg=module)


# ---------------------------------------------------------------------------------------------
# Every layout


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_layout_maps_onto_the_transformer_with_the_expected_delta(fmt, transformer, targets, tmp_path):
    expected = write_lora(tmp_path / f"{fmt}.safetensors", fmt, transformer)
    parsed = _load(tmp_path / f"{fmt}.safetensors", targets)
    assert parsed.format == LAYOUT[fmt]
    _assert_deltas(_deltas(parsed), expected)
    assert all(delta.abs().mean() > 0.02 for delta in expected.values())  # large enough to see in an image
    assert len({p.target for p in parsed.patches}) == len(parsed.patches) == 28


@pytest.mark.parametrize("fmt", DIFFUSERS_READS)
def test_each_layout_diffusers_reads_gives_diffusers_delta(fmt, transformer, targets, tmp_path):
    path = tmp_path / f"{fmt}.safetensors"
    write_lora(path, fmt, transformer, alpha=6.0 if fmt == "peft" else None)
    ours = _deltas(_load(path, targets))
    _assert_deltas(ours, _diffusers_deltas(path, sorted(ours)))


def test_loha_delta_is_peft_loha_delta(transformer, targets, tmp_path):
    """diffusers cannot load LoHa; peft's LoHa layer (alpha / r, LyCORIS' rule) can check the arithmetic."""
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    expected = write_lora(tmp_path / "loha.safetensors", "loha", transformer, rank=4, alpha=3.0)
    parsed = _load(tmp_path / "loha.safetensors", targets)
    model = _transformer()
    inject_adapter_in_model(LoHaConfig(r=4, alpha=3.0, target_modules=sorted(expected)), model, adapter_name="t")
    state = {f"{p.target}.hada_{k}": v for p in parsed.patches for k, v in p.tensors.items()}
    assert not set_peft_model_state_dict(model, state, adapter_name="t").unexpected_keys
    peft_deltas = {p.target: model.get_submodule(p.target).get_delta_weight("t") for p in parsed.patches}
    _assert_deltas(_deltas(parsed), peft_deltas)


def test_peft_metadata_scales_by_module_as_peft_does(transformer, targets, tmp_path):
    """rank_pattern / alpha_pattern / r / lora_alpha from the header, resolved per module like peft."""
    modules = select_modules(transformer, "attention")
    tensors, config = {}, {"r": 4, "lora_alpha": 2, "target_modules": sorted(modules)}
    config["rank_pattern"] = {"layers.0.attention.to_q": 2}
    config["alpha_pattern"] = {"layers.0.attention.to_q": 8, "to_k": 12}
    for module, (out, inp) in modules.items():
        rank = 2 if module == "layers.0.attention.to_q" else 4
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, inp) * 0.3
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, rank) * 0.3
    header = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = save(tmp_path / "patterns.safetensors", tensors, header)
    parsed = _load(path, targets)
    scales = {p.target: p.scale for p in parsed.patches}
    assert scales["layers.0.attention.to_q"] == 8 / 2
    assert scales["layers.1.attention.to_k"] == 12 / 4
    assert scales["layers.1.attention.to_v"] == 2 / 4
    _assert_deltas(_deltas(parsed), _diffusers_deltas(path, sorted(modules)))


def test_a_peft_file_without_metadata_has_scale_one_and_raw_peft_prefixes_map(transformer, targets, tmp_path):
    expected = write_lora(tmp_path / "a.safetensors", "peft", transformer)
    tensors, _ = read_file(tmp_path / "a.safetensors")
    for prefix in ("", "base_model.model."):
        renamed = {prefix + k.removeprefix("transformer."): v for k, v in tensors.items()}
        parsed = parse(renamed, {}, targets)
        assert {p.scale for p in parsed.patches} == {1.0}
        _assert_deltas(_deltas(parsed), expected)


@pytest.mark.parametrize("prefix", ["lycoris_", "lora_transformer_", "diffusion_model.", "model.diffusion_model."])
def test_kohya_pairs_under_other_trainers_prefixes(prefix, transformer, targets, tmp_path):
    expected = write_lora(tmp_path / "k.safetensors", "kohya", transformer)
    tensors, _ = read_file(tmp_path / "k.safetensors")
    renamed = {}
    for key, value in tensors.items():
        base, suffix = key.removeprefix("lora_unet_").split(".", 1)
        module = next(m for m in expected if m.replace(".", "_") == base)
        renamed[prefix + (module if prefix.endswith(".") else base) + "." + suffix] = value
    _assert_deltas(_deltas(parse(renamed, {}, targets)), expected)


def test_every_linear_maps_in_kohya_spelling_and_the_summary_counts_them(transformer, targets, tmp_path):
    expected = write_lora(tmp_path / "all.safetensors", "kohya", transformer, modules="all", rank=2, alpha=3.0)
    parsed = _load(tmp_path / "all.safetensors", targets)
    _assert_deltas(_deltas(parsed), expected)
    assert len(parsed.patches) == len(targets)
    summary = parsed.summary()
    assert summary["format"] == "kohya"
    assert summary["ranks"] == [2] and summary["alphas"] == [3.0]
    assert summary["keys"] == 3 * len(targets) and summary["patches"] == len(targets)
    assert summary["modules"] == {
        "attention": 16,
        "feed_forward": 12,
        "adaLN": 4,
        "x_embedder": 1,
        "final_layer": 1,
        "t_embedder": 2,
        "cap_embedder": 1,
    }


def test_tensors_stay_as_stored_and_delta_takes_dtype_and_rows(transformer, targets, tmp_path):
    expected = write_lora(tmp_path / "bf16.safetensors", "fused-qkv", transformer, dtype=torch.bfloat16)
    parsed = _load(tmp_path / "bf16.safetensors", targets)
    assert {t.dtype for p in parsed.patches for t in p.tensors.values()} == {torch.bfloat16}
    _assert_deltas(_deltas(parsed), expected)
    q = next(p for p in parsed.patches if p.target == "layers.0.attention.to_q")
    assert q.rows == (0, 32) and q.delta(dtype=torch.bfloat16).dtype == torch.bfloat16
    assert parsed.nbytes == sum(t.numel() * 2 for t in read_file(tmp_path / "bf16.safetensors")[0].values() if t.ndim)


def test_published_targets_are_the_real_size_linears():
    targets = published_targets()
    assert len(targets) == 276
    assert targets["layers.29.attention.to_q"] == (3840, 3840)
    assert targets["layers.0.feed_forward.w1"] == (10240, 3840)
    assert targets["context_refiner.1.attention.to_out.0"] == (3840, 3840)
    down, up = torch.randn(1, 3840), torch.randn(3840, 1)
    parsed = parse(
        {
            "lora_unet_layers_29_attention_to_q.lora_down.weight": down,
            "lora_unet_layers_29_attention_to_q.lora_up.weight": up,
        },
        {},
        targets,
    )
    assert [p.target for p in parsed.patches] == ["layers.29.attention.to_q"]


# ---------------------------------------------------------------------------------------------
# Refusals


def test_keys_that_map_nowhere_are_named_and_nothing_is_applied(transformer, targets, tmp_path):
    stray = write_partial_lora(tmp_path / "partial.safetensors", transformer)
    with pytest.raises(
        LoraError, match=r"partial\.safetensors: 9 of 57 keys do not map onto Z-Image's transformer"
    ) as err:
        _load(tmp_path / "partial.safetensors", targets)
    assert all(key in str(err.value) for key in stray[:5])


@pytest.mark.parametrize(
    ("writer", "model", "key"),
    [
        (write_flux_lora, "FLUX.1", "lora_unet_double_blocks_0_img_attn_qkv"),
        (write_sdxl_lora, "SDXL", "lora_te1_text_model"),
    ],
)
def test_a_lora_for_another_model_is_named(writer, model, key, targets, tmp_path):
    path = writer(tmp_path / "other.safetensors")
    with pytest.raises(
        LoraError, match=rf"other\.safetensors looks like a LoRA for {model} \(keys like .*{key}.*not Z-Image"
    ):
        _load(path, targets)


@pytest.mark.parametrize(
    ("key", "model"),
    [
        ("transformer.single_transformer_blocks.0.attn.to_q", "FLUX.1"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "Stable Diffusion 1.x/2.x"),
        ("joint_blocks.0.context_block.attn.qkv", "SD3"),
        ("transformer_blocks.0.img_mlp.net.0.proj", "Qwen-Image"),
        ("diffusion_model.blocks.0.cross_attn.q", "Wan"),
        ("transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q", "HunyuanVideo"),
        ("distilled_guidance_layer.layers.0.linear_1", "Chroma"),
        ("transformer.layers.0.attn.to_q", "Lumina 2"),
    ],
)
def test_other_models_signatures(key, model, targets):
    state = {f"{key}.lora_A.weight": torch.zeros(1, 4), f"{key}.lora_B.weight": torch.zeros(4, 1)}
    with pytest.raises(LoraError, match=f"looks like a LoRA for {model}"):
        parse(state, {}, targets)


def test_metadata_tells_apart_models_that_share_key_names(tmp_path, targets):
    tensors, _ = read_file(write_flux_lora(tmp_path / "hv.safetensors"))
    with pytest.raises(LoraError, match=r"for HunyuanVideo \(keys like lora_unet_double_blocks.*hunyuan_video\)"):
        parse(tensors, {"ss_base_model_version": "hunyuan_video"}, targets)


def test_a_lora_for_a_wider_model_names_the_width(tmp_path, targets):
    wide = _transformer(dim=48, n_heads=3, n_kv_heads=3)
    write_lora(tmp_path / "wide.safetensors", "kohya", wide)
    tensors, _ = read_file(tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match=r"fit a model 48 wide, Z-Image-Turbo is 32 .*lumina2"):
        parse(tensors, {"ss_base_model_version": "lumina2"}, targets, name="wide.safetensors")


def test_a_shape_mismatch_names_the_key_and_both_shapes(transformer, targets, tmp_path):
    write_lora(tmp_path / "ffn.safetensors", "comfyui", transformer, modules="ffn")
    tensors, metadata = read_file(tmp_path / "ffn.safetensors")
    tensors["diffusion_model.layers.1.feed_forward.w2.lora_A.weight"] = torch.zeros(4, 84)
    with pytest.raises(
        LoraError,
        match=r"w2\.lora_A\.weight \(4, 84\) and .*w2\.lora_B\.weight \(32, 4\) give 32x84, "
        r"layers\.1\.feed_forward\.w2 is 32x85",
    ):
        parse(tensors, metadata, targets)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("lora_te_model_layers_0_self_attn_q_proj.lora_down.weight", r"has 1 text-encoder keys \(lora_te_model"),
        ("lora_unet_layers_0_attention_to_q.dora_scale", r"DoRA magnitudes .*to_q\.dora_scale"),
        ("lora_unet_layers_0_attention_to_q.lora_up.bias", "bias changes"),
        ("lora_unet_layers_0_attention_to_q.diff_b", "bias changes"),
        ("lora_unet_layers_0_attention_to_q.diff", "full weight differences"),
        ("lora_unet_layers_0_attention_to_q.hada_t1", "Tucker factors"),
        ("lora_unet_layers_0_attention_to_k.lora_mystery.weight", r"1 of 85 keys do not map.*lora_mystery"),
    ],
)
def test_parts_zturbo_does_not_apply_are_refused_by_name(extra, match, transformer, targets, tmp_path):
    write_lora(tmp_path / "k.safetensors", "kohya", transformer)
    tensors, metadata = read_file(tmp_path / "k.safetensors")
    tensors[extra] = torch.zeros(1, 32)
    with pytest.raises(LoraError, match=match):
        parse(tensors, metadata, targets)


def test_text_encoder_keys_are_refused_with_their_count(transformer, targets, tmp_path):
    keys = write_text_encoder_lora(tmp_path / "te.safetensors", transformer)
    with pytest.raises(LoraError, match=rf"te\.safetensors has {len(keys)} text-encoder keys .*transformer only"):
        _load(tmp_path / "te.safetensors", targets)


def test_dora_regex_patterns_and_broken_peft_metadata_are_refused(transformer, targets, tmp_path):
    write_lora(tmp_path / "p.safetensors", "peft", transformer, alpha=4.0)
    tensors, metadata = read_file(tmp_path / "p.safetensors")
    config = json.loads(metadata["lora_adapter_metadata"])
    dora = json.dumps(config | {"transformer.use_dora": True})
    with pytest.raises(LoraError, match=r"^this LoRA is a DoRA \(its lora_adapter_metadata says use_dora\)"):
        parse(tensors, {"lora_adapter_metadata": dora}, targets)
    regex = json.dumps(config | {"transformer.rank_pattern": {"(a+)+$": 2}})
    with pytest.raises(LoraError, match=r"pattern '\(a\+\)\+\$' is a regular expression"):
        parse(tensors, {"lora_adapter_metadata": regex}, targets)
    with pytest.raises(LoraError, match="not a peft config"):
        parse(tensors, {"lora_adapter_metadata": "{not json"}, targets)


def test_half_a_pair_and_redundant_copies_that_disagree_are_refused(transformer, targets, tmp_path):
    write_lora(tmp_path / "d.safetensors", "dot-names", transformer)
    tensors, metadata = read_file(tmp_path / "d.safetensors")
    changed = dict(tensors)
    changed["layers.0.attention.qkv.lora.up.weight"] = tensors["layers.0.attention.qkv.lora.up.weight"] * 1.5
    with pytest.raises(LoraError, match=r"changes layers\.0\.attention\.to_q twice, differently"):
        parse(changed, metadata, targets)
    del tensors["layers.1.feed_forward.w1.lora.up.weight"]
    with pytest.raises(LoraError, match=r"layers\.1\.feed_forward\.w1 has only .*needs its other parts"):
        parse(tensors, metadata, targets)


def test_the_lokr_alpha_applies_only_to_decomposed_factors(transformer, targets, tmp_path):
    write_lora(tmp_path / "l.safetensors", "lokr", transformer, rank=4, alpha=2.0)
    parsed = _load(tmp_path / "l.safetensors", targets)
    scales = {p.target: (p.scale, "w2_b" in p.tensors) for p in parsed.patches}
    assert scales["layers.0.attention.to_q"] == (1.0, False)  # 32 = 4 x 8: rank 4 is not below 8 / 2
    assert scales["layers.0.feed_forward.w1"] == (0.5, True)


def test_only_safetensors_are_read_and_damaged_files_are_named(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin"):
        (tmp_path / f"x{suffix}").write_bytes(b"\x80\x04")
        with pytest.raises(LoraError, match=rf"x\{suffix}: only \.safetensors .* can run code"):
            read_file(tmp_path / f"x{suffix}")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match=r"broken\.safetensors is not a readable \.safetensors file"):
        read_file(tmp_path / "broken.safetensors")
    with pytest.raises(LoraError, match=r"missing\.safetensors does not exist"):
        read_file(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="holds no tensors"):
        parse({}, {}, {"a": (1, 1)})


# ---------------------------------------------------------------------------------------------
# The library


@pytest.fixture
def lora_dir(tmp_path: Path, transformer: ZImageTransformer2DModel) -> Path:
    root = tmp_path / "loras"
    write_lora(root / "style.safetensors", "kohya", transformer, modules="attention")
    write_lora(root / "sub" / "detail.safetensors", "peft", transformer, modules="ffn")
    (root / "notes.txt").write_text("not a LoRA")
    return root


def test_listing_hashes_once_and_names_relative_to_the_directory(lora_dir, monkeypatch):
    calls = []
    real = library_module.sha256_file
    monkeypatch.setattr(library_module, "sha256_file", lambda path: calls.append(path) or real(path))
    library = LoraLibrary(lora_dir)
    files = library.list()
    assert [f.name for f in files] == ["style.safetensors", "sub/detail.safetensors"]
    for f in files:
        assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest()
        assert f.size == f.path.stat().st_size and f.short_hash == f.sha256[:10]
    assert len(calls) == 2
    assert library.list() == files and len(calls) == 2  # unchanged files are not hashed again
    assert library.find_hash(files[1].sha256[:10]) == files[1]
    assert library.find_hash(files[0].sha256) == files[0]
    assert library.find_hash("0" * 10) is None
    with pytest.raises(LoraError, match="hexadecimal"):
        library.find_hash("xyz")
    assert LoraLibrary(lora_dir / "nowhere").list() == []


def test_resolve_takes_names_with_or_without_the_suffix(lora_dir):
    library = LoraLibrary(lora_dir)
    assert library.resolve("style").name == "style.safetensors"
    assert library.resolve("sub/detail.safetensors").path == (lora_dir / "sub" / "detail.safetensors").resolve()
    with pytest.raises(
        LoraError,
        match=r"no LoRA named 'nope' in the LoRA directory; available: style\.safetensors, sub/detail\.safetensors",
    ):
        library.resolve("nope")
    with pytest.raises(LoraError, match=r"only \.safetensors"):
        library.resolve("style.ckpt")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../x", "'..' component"),
        ("sub/../../x", "'..' component"),
        ("/etc/passwd", "absolute path"),
        ("sub\\detail", "backslash"),
        ("", "non-empty"),
        ("st\x00yle", "control character"),
        ("st\nyle", "control character"),
        ("st\x85yle", "control character"),
        ("st\u2028yle", "control character"),
        ("outside", "leads outside the LoRA directory"),
    ],
)
def test_names_never_leave_the_directory(name, match, lora_dir, tmp_path, transformer):
    write_lora(tmp_path / "secret.safetensors", "kohya", transformer, modules="attention")
    (lora_dir / "outside.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(LoraError, match=match) as err:
        LoraLibrary(lora_dir).resolve(name)
    assert err.value.http_status == 400
    assert "outside.safetensors" not in [f.name for f in LoraLibrary(lora_dir).list()]


def test_allow_paths_accepts_a_real_file_anywhere(lora_dir, tmp_path, transformer, monkeypatch):
    write_lora(tmp_path / "elsewhere.safetensors", "kohya", transformer, modules="attention")
    library = LoraLibrary(lora_dir, allow_paths=True)
    assert (
        library.resolve(str(tmp_path / "elsewhere.safetensors")).path == (tmp_path / "elsewhere.safetensors").resolve()
    )
    monkeypatch.chdir(tmp_path)
    assert library.resolve("elsewhere.safetensors").name == "elsewhere.safetensors"
    assert library.resolve("loras/../elsewhere.safetensors").size > 0
    assert library.resolve("style").path.parent == lora_dir.resolve()  # the directory comes first
    with pytest.raises(LoraError, match="no LoRA named"):
        library.resolve("/nonexistent/file.safetensors")


def test_load_caches_by_bytes_least_recently_used_first_and_rereads_changed_files(lora_dir, targets, transformer):
    library = LoraLibrary(lora_dir)
    style, detail = library.resolve("style"), library.resolve("sub/detail")
    first = library.load(style, targets)
    assert library.load(style, targets) is first and (library.hits, library.misses) == (1, 1)
    both = first.nbytes + library.load(detail, targets).nbytes
    assert library.cached_bytes == both
    small = LoraLibrary(lora_dir, cache_bytes=max(first.nbytes, both - first.nbytes))
    small.load(style, targets), small.load(detail, targets)
    assert small.load(detail, targets) is not None and small.hits == 1
    small.load(style, targets)  # evicted by detail: read again
    assert (small.hits, small.misses) == (1, 3) and small.cached_bytes <= small.cache_bytes
    write_lora(lora_dir / "style.safetensors", "kohya", transformer, modules="attention", seed=1)
    os.utime(lora_dir / "style.safetensors", ns=(style.mtime_ns + 10**9, style.mtime_ns + 10**9))
    with pytest.raises(LoraError, match="changed on disk since it was resolved"):
        library.load(style, targets)
    fresh = library.resolve("style")
    assert fresh.sha256 != style.sha256
    reread = library.load(fresh, targets)
    assert reread is not first and not torch.equal(reread.patches[0].delta(), first.patches[0].delta())


def test_load_is_safe_from_threads_and_names_the_file_in_parse_errors(lora_dir, targets, transformer):
    library = LoraLibrary(lora_dir)
    style = library.resolve("style")
    results: list[ParsedLora] = []
    threads = [threading.Thread(target=lambda: results.append(library.load(style, targets))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and library.hits + library.misses == 8
    assert library.cached_bytes == results[0].nbytes
    write_flux_lora(lora_dir / "flux_style.safetensors")
    with pytest.raises(LoraError, match=r"^flux_style\.safetensors looks like a LoRA for FLUX\.1"):
        library.load(library.resolve("flux_style"), targets)


def test_kohya_names_helper_round_trips_through_the_parser(targets):
    """The helper other tests use: kohya spelling of every target maps back onto it."""
    for module, (out, inp) in targets.items():
        base = kohya_name(module)
        state = {f"{base}.lora_down.weight": torch.zeros(1, inp), f"{base}.lora_up.weight": torch.zeros(out, 1)}
        assert [p.target for p in parse(state, {}, targets).patches] == [module]


def test_a_name_too_long_for_the_file_system_is_a_lora_error(lora_dir):
    for library in (LoraLibrary(lora_dir), LoraLibrary(lora_dir, allow_paths=True)):
        with pytest.raises(LoraError, match="cannot be read") as err:
            library.resolve("a" * 250)  # 262 characters with the suffix: over NAME_MAX
        assert err.value.http_status == 400


@pytest.fixture
def tensor_reads(monkeypatch) -> list[str]:
    """The keys whose tensors safetensors reads (header reads are not counted)."""
    import safetensors

    reads: list[str] = []
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, key):
            reads.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    return reads


def test_files_refused_by_their_header_are_never_read(lora_dir, targets, transformer, tensor_reads):
    library = LoraLibrary(lora_dir)
    save(lora_dir / "checkpoint.safetensors", {f"{m}.weight": torch.zeros(s) for m, s in targets.items()})
    with pytest.raises(LoraError, match=r"^checkpoint\.safetensors: \d+ of \d+ keys do not map"):
        library.load(library.resolve("checkpoint"), targets)
    write_lora(lora_dir / "wide.safetensors", "kohya", _transformer(dim=48, n_heads=3, n_kv_heads=3))
    with pytest.raises(LoraError, match=r"fit a model 48 wide, Z-Image-Turbo is 32"):
        library.load(library.resolve("wide"), targets)
    write_flux_lora(lora_dir / "flux.safetensors")
    with pytest.raises(LoraError, match="FLUX"):
        library.load(library.resolve("flux"), targets)
    assert tensor_reads == []
    parsed = library.load(library.resolve("style"), targets)  # a fitting file is read whole
    assert len(tensor_reads) == parsed.n_keys > 0


def test_a_file_changed_while_it_is_read_is_refused_not_cached(lora_dir, targets, transformer, monkeypatch):
    library = LoraLibrary(lora_dir)
    style = library.resolve("style")
    real = library_module.read_file

    def read_then_replace(path, check=None):
        out = real(path, check)
        write_lora(path, "kohya", transformer, modules="attention", seed=5)  # another LoRA, another sha256
        os.utime(path, ns=(style.mtime_ns + 10**9, style.mtime_ns + 10**9))
        return out

    monkeypatch.setattr(library_module, "read_file", read_then_replace)
    with pytest.raises(LoraError, match="changed on disk"):
        library.load(style, targets)
    assert library.cached_bytes == 0
