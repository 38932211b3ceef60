"""Writers of tiny LoRA files in the layouts trainers publish for Z-Image-Turbo (test helpers).

`write_lora` writes one file for a (tiny) transformer and returns the weight change it should make
to each targeted Linear at weight 1, computed here from the stored tensors with the format's own
scale rule, independently of zturbo's parser. Values are large enough (a delta of ~0.1 against
tiny weights of ~0.1) that an image made with the LoRA visibly differs.

Formats (`FORMATS`):
- "peft": diffusers/PEFT names `transformer.<module>.lora_A.weight` / `lora_B.weight`; with an
  alpha, the `lora_adapter_metadata` header entry diffusers' pipelines save (scale lora_alpha / r).
- "kohya": `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- "comfyui": `diffusion_model.<module>.lora_A.weight` / `lora_B.weight` / `.alpha`.
- "dot-names": the layout of diffusers issue 13203 (Anime-Z): `layers.0.attention.to.q.lora.down.weight`
  with its alpha at `layers.0.attention.to_q.alpha`, `to_out.0`, and redundant copies of the same
  change under Z-Image's original names: a fused `attention.qkv` (rank 3r, block-diagonal up) and
  `attention.out` (sharing `to_out.0.alpha`).
- "fused-qkv": the original fused `attention.qkv` in dot names (one product split onto q, k, v).
- "kohya-qkv": the original `attention_qkv` / `attention_out` names in kohya spelling.
- "lokr": ai-toolkit LoKr, `diffusion_model.<module>.lokr_w1`, `lokr_w2_a`, `lokr_w2_b`, `alpha`.
- "lokr-full": LoKr with both factors full matrices (LyCORIS applies no alpha then).
- "lokr-kohya": LyCORIS LoKr with both factors decomposed, `lycoris_<module with _>.lokr_w1_a` ...
- "loha": LyCORIS LoHa, `lora_unet_<module with _>.hada_w1_a` ... `.alpha`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = (
    "peft",
    "kohya",
    "comfyui",
    "dot-names",
    "fused-qkv",
    "kohya-qkv",
    "lokr",
    "lokr-full",
    "lokr-kohya",
    "loha",
)
# Formats whose default alpha differs from the rank (so a scale bug shows); None: no alpha in the file.
DEFAULT_ALPHA = {
    "kohya": 0.5,
    "dot-names": 0.5,
    "fused-qkv": 0.5,
    "comfyui": 2.0,
    "kohya-qkv": 0.5,
    "lokr": 0.5,
    "lokr-full": 0.5,
    "lokr-kohya": 0.5,
    "loha": 0.5,
}
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
DELTA_STD = 0.1  # about the tiny transformer's weights' std


def linears(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def select_modules(transformer: torch.nn.Module, modules: str = "attention+ffn") -> dict[str, tuple[int, int]]:
    """The linears `modules` names: "+"-joined groups of attention, ffn, adaln, other (embedders and
    the final layer); "all" is every linear."""
    groups = set(modules.split("+"))
    unknown = groups - {"attention", "ffn", "adaln", "other", "all"}
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}")
    chosen = {}
    for name, shape in linears(transformer).items():
        group = (
            "attention"
            if ".attention." in name
            else "ffn"
            if ".feed_forward." in name
            else "adaln"
            if name.endswith("adaLN_modulation.0")
            else "other"
        )
        if "all" in groups or group in groups:
            chosen[name] = shape
    return chosen


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def kohya_name(module: str, prefix: str = "lora_unet_") -> str:
    return prefix + module.replace(".", "_")


def factor(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close to sqrt(n) as possible (LyCORIS' and peft's factorization
    with factor -1)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _randn(gen: torch.Generator, *shape: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def _lora_pair(
    gen: torch.Generator, out: int, inp: int, rank: int, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, ...]:
    std = math.sqrt(DELTA_STD / (math.sqrt(rank) * scale))  # scale * up @ down has std scale * std² * sqrt(rank)
    return _randn(gen, rank, inp, std=std, dtype=dtype), _randn(gen, out, rank, std=std, dtype=dtype)


def write_lora(
    path: Path,
    fmt: str,
    transformer: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules: str = "attention+ffn",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Write a LoRA in `fmt` for `transformer`'s `modules`; return {module: expected (out, in) fp32 delta}.

    `alpha` None takes the format's default (DEFAULT_ALPHA times the rank, or no alpha at all).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    if alpha is None and fmt in DEFAULT_ALPHA:
        alpha = DEFAULT_ALPHA[fmt] * rank
    targets = select_modules(transformer, modules)
    gen = torch.Generator().manual_seed(seed)
    writer = {
        "peft": _write_peft,
        "kohya": _write_kohya,
        "comfyui": _write_comfyui,
        "dot-names": _write_dot_names,
        "fused-qkv": _write_fused_qkv,
        "kohya-qkv": _write_kohya_qkv,
        "lokr": _write_lokr,
        "lokr-full": _write_lokr,
        "lokr-kohya": _write_lokr,
        "loha": _write_loha,
    }[fmt]
    tensors, metadata, expected = writer(fmt, targets, gen, rank, alpha, dtype)
    save(path, tensors, metadata)
    return expected


def _product(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    return (up.float() @ down.float()) * scale


def _plain_lora(
    targets: Mapping[str, tuple[int, int]],
    gen: torch.Generator,
    rank: int,
    alpha: float | None,
    dtype: torch.dtype,
    names: tuple[str, str, str],
    rename: Callable[[str], str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per target: `rename(module) + names[0|1|2]` for down, up and alpha (alpha only when given)."""
    tensors, expected = {}, {}
    scale = 1.0 if alpha is None else alpha / rank
    for module, (out, inp) in targets.items():
        down, up = _lora_pair(gen, out, inp, rank, dtype, scale)
        base = rename(module)
        tensors[base + names[0]], tensors[base + names[1]] = down, up
        if alpha is not None:
            tensors[base + names[2]] = torch.tensor(float(alpha))
        expected[module] = _product(down, up, scale)
    return tensors, expected


def _write_peft(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora_A.weight", ".lora_B.weight", "")
    tensors, expected = _plain_lora(targets, gen, rank, None, dtype, names, lambda m: "transformer." + m)
    metadata = {"format": "pt"}
    if alpha is not None:
        # What ZImagePipeline.save_lora_weights writes: the peft config, its keys under "transformer.".
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "use_dora": False}
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
        expected = {k: v * (alpha / rank) for k, v in expected.items()}
    return tensors, metadata, expected


def _write_kohya(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora_down.weight", ".lora_up.weight", ".alpha")
    tensors, expected = _plain_lora(targets, gen, rank, alpha, dtype, names, kohya_name)
    return tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}, expected


def _write_comfyui(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora_A.weight", ".lora_B.weight", ".alpha")
    tensors, expected = _plain_lora(targets, gen, rank, alpha, dtype, names, lambda m: "diffusion_model." + m)
    return tensors, {}, expected


def _dot_name(module: str) -> str:
    for proj in "qkv":
        module = module.replace(f"attention.to_{proj}", f"attention.to.{proj}")
    return module.replace("attention.to_out.0", "attention.out")


def _write_dot_names(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora.down.weight", ".lora.up.weight", ".alpha")
    tensors, expected = _plain_lora(targets, gen, rank, alpha, dtype, names, _dot_name)
    for module in targets:
        base = _dot_name(module)
        if alpha is not None and base != module:  # the alpha under the diffusers name, the weights dotted
            tensors[module + ".alpha"] = tensors.pop(base + ".alpha")
        if module.endswith(".attention.to_out.0"):  # `attention.out` is the same change again
            for suffix in names[:2]:
                tensors[module + suffix] = tensors[base + suffix].clone()
    blocks = {m.rsplit(".to_", 1)[0] for m in targets if m.endswith(".to_q")}
    for block in sorted(b for b in blocks if all(f"{b}.to_{p}" in targets for p in "kv")):
        parts = [_dot_name(f"{block}.to_{p}") for p in "qkv"]
        tensors[block + ".qkv" + names[0]] = torch.cat([tensors[p + names[0]] for p in parts])
        tensors[block + ".qkv" + names[1]] = torch.block_diag(*[tensors[p + names[1]] for p in parts])
        if alpha is not None:  # rank 3r: three times the alpha keeps the scale
            tensors[block + ".qkv.alpha"] = torch.tensor(3.0 * alpha)
    return tensors, {}, expected


def _fused(
    targets: Mapping[str, tuple[int, int]],
    gen: torch.Generator,
    rank: int,
    alpha: float | None,
    dtype: torch.dtype,
    names: tuple[str, str, str],
    rename: Callable[[str], str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Blocks' q, k and v as one fused `attention.qkv` product; the other targets as plain LoRAs."""
    fused = {m.rsplit(".to_", 1)[0] for m in targets if m.endswith((".to_q", ".to_k", ".to_v"))}
    rest = {m: s for m, s in targets.items() if m.rsplit(".to_", 1)[0] not in fused or m.endswith("to_out.0")}
    tensors, expected = _plain_lora(rest, gen, rank, alpha, dtype, names, rename)
    scale = 1.0 if alpha is None else alpha / rank
    for block in sorted(fused):
        outs = [targets[f"{block}.to_{p}"][0] for p in "qkv"]
        down, up = _lora_pair(gen, sum(outs), targets[f"{block}.to_q"][1], rank, dtype, scale)
        base = rename(f"{block}.qkv")
        tensors[base + names[0]], tensors[base + names[1]] = down, up
        if alpha is not None:
            tensors[base + names[2]] = torch.tensor(float(alpha))
        for proj, rows in zip("qkv", up.split(outs), strict=True):
            expected[f"{block}.to_{proj}"] = _product(down, rows, scale)
    return tensors, expected


def _write_fused_qkv(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora.down.weight", ".lora.up.weight", ".alpha")
    tensors, expected = _fused(targets, gen, rank, alpha, dtype, names, _dot_name)
    return tensors, {}, expected


def _write_kohya_qkv(fmt, targets, gen, rank, alpha, dtype):
    names = (".lora_down.weight", ".lora_up.weight", ".alpha")
    tensors, expected = _fused(targets, gen, rank, alpha, dtype, names, lambda m: kohya_name(_dot_name(m)))
    return tensors, {"ss_network_module": "networks.lora"}, expected


def _write_lokr(fmt, targets, gen, rank, alpha, dtype):
    """w1 (a, c) ⊗ w2 (b, d) for a target (a*b, c*d); "lokr" decomposes w2 where LyCORIS would,
    "lokr-kohya" both factors, "lokr-full" neither (and LyCORIS then applies no alpha)."""
    tensors, expected = {}, {}
    rename = (lambda m: kohya_name(m, "lycoris_")) if fmt == "lokr-kohya" else (lambda m: "diffusion_model." + m)
    for module, (out, inp) in targets.items():
        (a, b), (c, d) = factor(out), factor(inp)
        base = rename(module)
        # LyCORIS (and peft) store w2 decomposed only where the rank is below half its larger side.
        split_w2 = fmt == "lokr-kohya" or (fmt == "lokr" and rank < max(b, d) / 2)
        scale = alpha / rank if split_w2 and alpha is not None else 1.0  # full factors: no alpha
        std = math.sqrt(DELTA_STD / scale)  # kron's entries are products of one entry of each factor
        w1 = _factor(gen, tensors, base + ".lokr_w1", (a, c), rank, fmt == "lokr-kohya", std, dtype)
        w2 = _factor(gen, tensors, base + ".lokr_w2", (b, d), rank, split_w2, std, dtype)
        if alpha is not None:
            tensors[base + ".alpha"] = torch.tensor(float(alpha))
        expected[module] = torch.kron(w1, w2) * scale
    return tensors, {}, expected


def _factor(gen, tensors, key: str, shape: tuple[int, int], rank: int, decompose: bool, std: float, dtype):
    """Store one Kronecker factor (full, or `_a @ _b` of rank `rank`) of entries ~ N(0, std²);
    return it multiplied out in fp32."""
    rows, cols = shape
    if not decompose:
        tensors[key] = _randn(gen, rows, cols, std=std, dtype=dtype)
        return tensors[key].float()
    part = math.sqrt(std / math.sqrt(rank))
    tensors[key + "_a"] = _randn(gen, rows, rank, std=part, dtype=dtype)
    tensors[key + "_b"] = _randn(gen, rank, cols, std=part, dtype=dtype)
    return tensors[key + "_a"].float() @ tensors[key + "_b"].float()


def _write_loha(fmt, targets, gen, rank, alpha, dtype):
    tensors, expected = {}, {}
    scale = 1.0 if alpha is None else alpha / rank
    std = (DELTA_STD / (rank * scale)) ** 0.25  # (w1_a @ w1_b) * (w2_a @ w2_b) has std std⁴ * rank
    for module, (out, inp) in targets.items():
        base = kohya_name(module)
        w = {
            name: _randn(gen, *shape, std=std, dtype=dtype)
            for name, shape in (
                ("w1_a", (out, rank)),
                ("w1_b", (rank, inp)),
                ("w2_a", (out, rank)),
                ("w2_b", (rank, inp)),
            )
        }
        tensors.update({f"{base}.hada_{k}": v for k, v in w.items()})
        if alpha is not None:
            tensors[base + ".alpha"] = torch.tensor(float(alpha))
        f = {k: v.float() for k, v in w.items()}
        expected[module] = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * scale
    return tensors, {"ss_network_module": "lycoris.kohya"}, expected


def _kohya_pairs(names: Iterable[str], out: int, inp: int, rank: int = 4) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in names:
        tensors[name + ".lora_down.weight"] = torch.randn(rank, inp) * 0.1
        tensors[name + ".lora_up.weight"] = torch.randn(out, rank) * 0.1
        tensors[name + ".alpha"] = torch.tensor(float(rank))
    return tensors


def write_flux_lora(path: Path) -> Path:
    """A few FLUX.1 keys in kohya spelling (dim 3072 shrunk to 8)."""
    names = [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_mlp_0",
        "lora_unet_single_blocks_0_linear1",
    ]
    return save(
        path, _kohya_pairs(names, 24, 8), {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
    )


def write_sdxl_lora(path: Path) -> Path:
    """A few SDXL keys: UNet input blocks and both text encoders (kohya spelling)."""
    names = [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ]
    return save(path, _kohya_pairs(names, 8, 8), {"ss_base_model_version": "sdxl_base_v1-0"})


def write_partial_lora(path: Path, transformer: torch.nn.Module) -> list[str]:
    """A kohya file for `transformer` plus three modules that map nowhere; returns those keys."""
    tensors = {}
    for module, (out, inp) in select_modules(transformer, "attention").items():
        tensors.update(_kohya_pairs([kohya_name(module)], out, inp))
    stray = ["lora_unet_layers_0_attention_to_z", "lora_unet_layers_99_feed_forward_w1", "lora_unet_pos_embed"]
    tensors.update(_kohya_pairs(stray, 32, 32))
    save(path, tensors)
    return sorted(k for k in tensors if any(k.startswith(s + ".") for s in stray))


def write_text_encoder_lora(path: Path, transformer: torch.nn.Module) -> list[str]:
    """A kohya file for `transformer` plus Qwen3 text-encoder keys (`lora_te_`); returns those keys."""
    tensors = {}
    for module, (out, inp) in select_modules(transformer, "attention").items():
        tensors.update(_kohya_pairs([kohya_name(module)], out, inp))
    te = [f"lora_te_model_layers_{i}_self_attn_q_proj" for i in range(2)]
    tensors.update(_kohya_pairs(te, 16, 16))
    save(path, tensors)
    return sorted(k for k in tensors if k.startswith("lora_te_"))
