"""Loading: strict keys, dtype conversion while streaming, hub cache resolution, fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zturbo.errors import CheckpointError
from zturbo.loader import _empty, fingerprint, load_weights, resolve_model, text_encoder_key
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


def test_tiny_checkpoint_is_made_once(tiny_dir):
    assert ensure_tiny_checkpoint() == tiny_dir
    assert (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (tiny_dir / "text_encoder" / "model.safetensors.index.json").is_file()
