"""`tiny-random`: a randomly initialised Z-Image checkpoint in the exact diffusers layout.

It exercises every code path (download-free loading, sharded weights, the Qwen chat template,
float32 transformer shards and bf16 text encoder shards as published) in seconds on a CPU.
Its images are noise: the weights are random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_VERSION = "v2"
# Qwen2/3 pre-tokenizer split (byte-level BPE on top of it).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's chat template, reduced to what text-to-image prompting uses: messages, the generation
# prompt and the enable_thinking switch (False inserts an empty think block, as Qwen3's does).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = [
    "A photograph of a red fox sitting in fresh snow at sunrise, soft light, shallow depth of field.",
    "A watercolor painting of a lighthouse on a rocky coast, waves crashing, seagulls in the sky.",
    "Portrait of an old fisherman with a weathered face, dramatic lighting, 85mm lens, highly detailed.",
    "A futuristic city at night with neon signs, rain on the streets and flying cars.",
    "Minimalist poster design with bold typography that reads 'Z-IMAGE TURBO', pastel colors.",
    "一只橘猫在窗台上晒太阳，窗外是樱花盛开的春天，温暖的午后光线。",
    "一幅中国山水画，远处是云雾缭绕的群山，近处有小桥流水和竹林。",
    "繁华的上海外滩夜景，灯火辉煌，黄浦江上游船穿梭，高清摄影。",
    "blurry, low quality, watermark, text, deformed hands, extra fingers, jpeg artifacts",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 , . ! ? ; : ' \" ( ) [ ] - _ / \\ @ # % & * + = < > |",
]


def cache_root() -> Path:
    """ZTURBO_CACHE, else $XDG_CACHE_HOME/zturbo, else ~/.cache/zturbo."""
    if os.environ.get("ZTURBO_CACHE"):
        return Path(os.environ["ZTURBO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zturbo"


def ensure_tiny_checkpoint() -> Path:
    """The cached tiny checkpoint, made on first use (atomically, so concurrent first uses are safe)."""
    target = cache_root() / f"tiny-random-{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_checkpoint(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """Write a random tiny Z-Image checkpoint into `root` (created if needed)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
        randomize_pad_tokens(transformer)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_config = Qwen3Config(**text_encoder_config(len(tokenizer), tokenizer.pad_token_id))
        text_encoder = Qwen3Model(text_config)
    finally:
        torch.random.set_rng_state(gen_state)

    return save_checkpoint(root, transformer, vae, text_encoder, tokenizer, shard_sizes=("100KB", "20KB"))


def save_checkpoint(
    root: Path,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    shard_sizes: tuple[str, str] = ("10GB", "5GB"),
) -> Path:
    """The published layout: transformer float32 and text encoder bf16, both sharded with an index.

    `shard_sizes` are the transformer's and the text encoder's largest shard.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    root.mkdir(parents=True, exist_ok=True)
    transformer.to(torch.float32).save_pretrained(root / "transformer", max_shard_size=shard_sizes[0])
    vae.save_pretrained(root / "vae")
    text_encoder.to(torch.bfloat16).save_pretrained(root / "text_encoder", max_shard_size=shard_sizes[1])
    tokenizer.save_pretrained(root / "tokenizer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).save_pretrained(
        root / "scheduler"
    )
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return root


TRANSFORMER_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 16,
    "axes_dims": [8, 4, 4],
    "axes_lens": [1024, 512, 512],
}
# FLUX.1 VAE as published with Z-Image-Turbo (what `zturbo bench` builds at real size).
FLUX_VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# The same shape (4 blocks: spatial factor 8, 16 latent channels) with tiny widths.
VAE_CONFIG = {
    **FLUX_VAE_CONFIG,
    "block_out_channels": [16, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


def text_encoder_config(vocab_size: int, pad_token_id: int | None = None) -> dict[str, object]:
    """Qwen3 with hidden size 16 (= the tiny transformer's cap_feat_dim)."""
    return {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 3,  # one streams, one stays, and the last never runs (hidden_states[-2])
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 1_000_000.0,
        "pad_token_id": pad_token_id,
    }


MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def randomize_pad_tokens(module: torch.nn.Module) -> None:
    """Pad tokens are zero-initialised; trained ones are not. Random values make a random model
    exercise them (and keep all-zero rows, which no trained checkpoint has, out of its activations)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pad_token" in name:
                p.normal_(0.0, 0.5)


def build_tokenizer():  # -> transformers.Qwen2Tokenizer
    """A byte-level BPE tokenizer trained in-process on a fixed corpus, saved as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        padding_side="right",
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
