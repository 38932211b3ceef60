"""LoRA files: read, recognise the format, map every key onto the transformer's linears.

The result is a `ParsedLora`: one `Patch` per target linear, whose `delta()` is the full weight
change (out, in) at weight 1. Nothing here touches a model; `adapters.merge` applies patches.

Module names are translated by diffusers' own Z-Image converter, so a file zturbo reads maps
where diffusers maps it; the scale rules are diffusers' and peft's (LoRA `alpha / rank`, or the
peft config in the `lora_adapter_metadata` header; LoKr's alpha only where a factor is
decomposed; LoHa `alpha / rank`). Unlike diffusers, nothing is dropped: a key is used, or the
file is refused with the key named.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import LoraError

if TYPE_CHECKING:
    import torch

KINDS = ("lora", "lokr", "loha")
FORMATS = ("diffusers", "kohya", "comfyui", "dot-names", "lokr", "loha", "lycoris")
SHOWN_KEYS = 5  # keys an error message lists before "..."

# Key suffix -> role in its module's group. Patch.tensors uses the role names (minus "hada_").
_ROLES = MappingProxyType(
    {
        "lora_A.weight": "down",
        "lora_down.weight": "down",
        "lora.down.weight": "down",
        "lora_A.default.weight": "down",
        "lora_B.weight": "up",
        "lora_up.weight": "up",
        "lora.up.weight": "up",
        "lora_B.default.weight": "up",
        "alpha": "alpha",
        **{f"lokr_{w}": w for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
        **{f"hada_{w}": f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
    }
)
_LORA_ROLES = frozenset({"down", "up"})
_LOKR_ROLES = frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"})
_LOHA_ROLES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
# Adapter parts zturbo does not apply, refused by name rather than dropped (diffusers drops DoRA).
_UNSUPPORTED = (
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA magnitudes"),
    (re.compile(r"(\.diff_b|\.bias)$"), "bias changes"),
    (re.compile(r"\.diff$"), "full weight differences (LyCORIS 'full')"),
    (re.compile(r"\.(lokr_t[12]|hada_t[12]|lora_mid\.weight)$"), "Tucker factors of convolution layers"),
    (re.compile(r"oft_|\.oft\b|boft_"), "OFT rotations"),
    (re.compile(r"\.scalar$"), "LyCORIS trained scalars"),
)
_TEXT_ENCODER = re.compile(r"^(base_model\.model\.)?(lora_te\d*_|text_encoders?(_\d+)?\.|te\d?\.|cond_stage_model\.)")
# Other models' LoRAs: (model, a key pattern only its LoRAs have, a metadata pattern naming it).
# Order matters: Chroma and HunyuanVideo share FLUX's block names, SDXL shares SD 1.x's.
_LOOKALIKES = (
    ("Chroma", r"distilled_guidance_layer", r"chroma"),
    ("HunyuanVideo", r"token_refiner|\.img_attn_qkv\b|\.txt_attn_qkv\b", r"hunyuan"),
    ("FLUX.1", r"double_blocks|single_blocks|single_transformer_blocks", r"flux"),
    ("SD3", r"joint_blocks|context_block", r"sd3|stable-diffusion-3"),
    ("Qwen-Image", r"img_mlp|txt_mlp|img_mod|txt_mod", r"qwen[-_ ]?image"),
    ("Wan", r"blocks[._]\d+[._](self_attn|cross_attn)", r"(^|[^a-z])wan"),
    ("SDXL", r"^lora_te[12]_|text_encoder_2\.|label_emb|add_embedding", r"sdxl|stable-diffusion-xl"),
    (
        "Stable Diffusion 1.x/2.x",
        r"input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block",
        r"sd_?v?[12]\b|stable-diffusion-v[12]",
    ),
    ("Lumina 2", r"layers[._]\d+[._]attn[._]|feed_forward[._]linear_\d|norm1[._]linear", r"lumina"),
)
_HINT_FIELDS = ("modelspec.architecture", "ss_base_model_version", "ss_network_module")
_BASE_MODEL_FIELDS = ("modelspec.architecture", "ss_base_model_version", "base_model")
# Spellings diffusers' converter does not take, rewritten to ones it does.
_PREFIXES = (
    ("base_model.model.", ""),
    ("transformer.", ""),
    ("model.diffusion_model.", "diffusion_model."),
    ("lycoris_", "lora_unet_"),
    ("lora_transformer_", "lora_unet_"),
)
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the peft config as JSON


@dataclass(frozen=True)
class Patch:
    """One target linear's change: `scale * product(tensors)`, optionally only a row range of it
    (a fused q/k/v product split onto to_q, to_k and to_v).

    `tensors` by kind: lora {"down" (r, in), "up" (out, r)}; lokr {"w1" or "w1_a", "w1_b"} and
    {"w2" or "w2_a", "w2_b"}, product kron(w1, w2); loha {"w1_a", "w1_b", "w2_a", "w2_b"},
    product (w1_a @ w1_b) * (w2_a @ w2_b)."""

    target: str  # the transformer's Linear module name, e.g. "layers.0.attention.to_q"
    kind: str  # one of KINDS
    tensors: Mapping[str, torch.Tensor]  # CPU tensors as stored in the file
    scale: float = 1.0  # alpha / rank where the file has an alpha
    rows: tuple[int, int] | None = None  # [start, stop) of the product's rows that belong to `target`
    alpha: float | None = None  # the file's (or its peft config's) alpha, for `summary`

    def delta(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight change at weight 1, computed in `dtype` (default float32) on `device`."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        if self.kind == "lora":
            up = t["up"] if self.rows is None else t["up"][self.rows[0] : self.rows[1]]
            out = up @ t["down"]
        else:
            out = _lycoris_product(self.kind, t)
            if self.rows is not None:
                out = out[self.rows[0] : self.rows[1]]
        return out * self.scale if self.scale != 1.0 else out

    @property
    def rank(self) -> int | None:
        """The low-rank dimension; None for a LoKr whose factors are both full matrices."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1_b"].shape[0])
        split = t.get("w2_b", t.get("w1_b"))
        return None if split is None else int(split.shape[0])


def _lycoris_product(kind: str, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    import torch

    if kind == "loha":
        return (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
    return torch.kron(w1, w2)


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file mapped onto the transformer: every key used, or `parse` refused it."""

    format: str  # "diffusers", "kohya", "comfyui", "dot-names", "lokr", "loha" (see FORMATS)
    patches: tuple[Patch, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    base_model: str | None = None  # what the file's metadata says it was trained on, when it says
    n_keys: int = 0  # tensors in the file (each one used by some patch)

    @property
    def nbytes(self) -> int:
        """Host bytes of the tensors (what the library's cache counts)."""
        unique = {id(t): t for p in self.patches for t in p.tensors.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def summary(self) -> dict[str, Any]:
        """For `zturbo lora inspect`: format, ranks, alphas, targeted module kinds and counts."""
        alphas = sorted({p.alpha for p in self.patches if p.alpha is not None})
        return {
            "format": self.format,
            "patches": len(self.patches),
            "keys": self.n_keys,
            "ranks": sorted({p.rank for p in self.patches if p.rank is not None}),
            "alphas": alphas or None,
            "modules": dict(Counter(module_group(p.target) for p in self.patches)),
            "base_model": self.base_model,
            "nbytes": self.nbytes,
        }


def module_group(target: str) -> str:
    """The kind of linear a target is, for summaries: attention, feed_forward, adaLN, or its embedder."""
    for marker, group in ((".attention.", "attention"), (".feed_forward.", "feed_forward"), ("adaLN", "adaLN")):
        if marker in target:
            return group
    return target.split(".")[0].removeprefix("all_")


# ---------------------------------------------------------------------------------------------
# Reading


HeaderCheck = Callable[[dict[str, "torch.Tensor"], dict[str, str]], None]


# safetensors dtype names -> torch dtypes, for the header's stand-in tensors; a name missing here
# stands in as float32, so the full parse (on the real tensors) gives its verdict.
@functools.cache
def _dtypes() -> MappingProxyType[str, torch.dtype]:
    import torch

    return MappingProxyType(
        {
            "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        }
    )  # fmt: skip


def read_file(path: Path, check: HeaderCheck | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a .safetensors LoRA file (no pickles). `check` (e.g.
    `check_header`) sees the header first, as meta-device stand-ins: what it refuses is never read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(
            f"{path.name}: only .safetensors LoRA files are loaded, not {path.suffix or 'a file without a suffix'} "
            "(pickled .pt, .ckpt and .bin files can run code when read; convert the file to .safetensors)"
        )
    if not path.is_file():
        raise LoraError(f"LoRA file {path.name} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            if check is not None:
                check({key: _stand_in(f.get_slice(key)) for key in f.keys()}, metadata)  # noqa: SIM118
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except LoraError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise LoraError(f"LoRA file {path.name} is not a readable .safetensors file: {err}") from err
    return tensors, metadata


def _stand_in(header: Any) -> torch.Tensor:
    """A tensor's shape and dtype from the file's header, holding no memory."""
    import torch

    return torch.empty(header.get_shape(), dtype=_dtypes().get(header.get_dtype(), torch.float32), device="meta")


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class _Group:
    """The keys of one module as the file names it: role -> (key, tensor)."""

    base: str
    roles: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    module: str | None = None  # the transformer's name for it; "<block>.attention.qkv" for a fused q/k/v

    @property
    def kind(self) -> str | None:
        roles = set(self.roles) - {"alpha"}
        for kind, allowed in (("lora", _LORA_ROLES), ("lokr", _LOKR_ROLES), ("loha", _LOHA_ROLES)):
            if roles and roles <= allowed:
                return kind
        return None

    def keys(self) -> list[str]:
        return sorted(key for key, _ in self.roles.values() if key)  # a shared alpha has no key here

    def tensor(self, role: str) -> torch.Tensor:
        return self.roles[role][1]


def parse(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    targets: Mapping[str, tuple[int, int]],
    *,
    name: str = "this LoRA",
) -> ParsedLora:
    """Map every key onto `targets` (Linear name -> weight shape), or raise LoraError naming the
    first keys that do not map, the model the file looks made for, or the shapes that disagree.
    `name` (the file's) starts the error messages."""
    keys = list(state_dict)
    groups = _mapped_groups(state_dict, metadata, targets, name)
    weights = _share_alphas(groups, name)
    _check_shapes(weights, targets, metadata, name)
    peft = _peft_config(metadata, name)
    built = [p for g in weights for p in _patches(g, targets, peft, name)]
    patches = _drop_verified_duplicates(built, name)
    return ParsedLora(
        format=_format_of(keys, patches),
        patches=tuple(sorted(patches, key=lambda p: p.target)),
        metadata=dict(metadata),
        base_model=next((metadata[f] for f in _BASE_MODEL_FIELDS if metadata.get(f)), None),
        n_keys=len(keys),
    )


def check_header(
    stand_ins: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    targets: Mapping[str, tuple[int, int]],
    *,
    name: str = "this LoRA",
) -> None:
    """`parse`'s refusals that need only key names, shapes and dtypes (other models, unmapped
    keys, shapes that do not fit), for `read_file` to run before it reads any tensor: a large
    file that is no LoRA for this transformer costs no memory."""
    groups = _mapped_groups(stand_ins, metadata, targets, name)
    _check_shapes([g for g in groups.values() if g.kind is not None], targets, metadata, name)


def _mapped_groups(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    targets: Mapping[str, tuple[int, int]],
    name: str,
) -> dict[str, _Group]:
    """The file's keys grouped by module, each group's module set; refuses what does not map."""
    keys = list(state_dict)
    if not keys:
        raise LoraError(f"{name} holds no tensors")
    _refuse_lookalike(keys, metadata, name)
    _refuse_text_encoder(keys, name)
    _refuse_unsupported(keys, name)
    groups, unknown = _group(state_dict)
    unmapped = unknown + _map_groups(groups, targets)
    if unmapped:
        raise LoraError(_unmapped_message(name, unmapped, len(keys), metadata))
    return groups


def _examples(keys: Iterable[str]) -> str:
    keys = list(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


def _metadata_hint(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """(model, "field=value") where the metadata names another model than Z-Image."""
    for field_name in _HINT_FIELDS:
        value = str(metadata.get(field_name, ""))
        if not value or re.search(r"z[-_ ]?image", value, re.I):
            continue
        for model, _, pattern in _LOOKALIKES:
            if re.search(pattern, value, re.I):
                return model, f"{field_name}={value}"
    return None


def _refuse_lookalike(keys: list[str], metadata: Mapping[str, str], name: str) -> None:
    """Refuse keys only another model has. Models that share key names (FLUX.1 and HunyuanVideo in
    kohya spelling) are told apart by the metadata where it names one."""
    for model, pattern, _ in _LOOKALIKES:
        hits = [k for k in keys if re.search(pattern, k)]
        if hits:
            hint = _metadata_hint(metadata)
            said = f"; its metadata says {hint[1]}" if hint else ""
            raise LoraError(
                f"{name} looks like a LoRA for {hint[0] if hint else model} (keys like {_examples(hits)}{said}), "
                "not Z-Image; zturbo applies Z-Image-Turbo LoRAs only"
            )


def _refuse_text_encoder(keys: list[str], name: str) -> None:
    hits = [k for k in keys if _TEXT_ENCODER.match(k)]
    if hits:
        raise LoraError(
            f"{name} has {len(hits)} text-encoder keys ({_examples(hits)}); "
            "zturbo applies LoRAs to the transformer only"
        )


def _refuse_unsupported(keys: list[str], name: str) -> None:
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise LoraError(
                f"{name} holds {what} ({len(hits)} keys like {_examples(hits)}), which zturbo does not apply; "
                "it applies LoRA, LoKr and LoHa weight changes without them, and will not drop keys silently"
            )


def _group(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, _Group], list[str]]:
    """Keys grouped by the module name the file uses; keys without a known suffix are returned apart."""
    groups: dict[str, _Group] = {}
    unknown = []
    for key, tensor in state_dict.items():
        suffix = next((s for s in _ROLES if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        base = key[: -len(suffix) - 1]
        groups.setdefault(base, _Group(base)).roles[_ROLES[suffix]] = (key, tensor)
    return groups, unknown


def _map_groups(groups: Mapping[str, _Group], targets: Mapping[str, tuple[int, int]]) -> list[str]:
    """Set each group's module; return the keys of groups that name no linear of `targets`."""
    unmapped = []
    for group in groups.values():
        module = _module_name(group.base)
        fused = module is not None and module.endswith(".attention.qkv")
        block = module.removesuffix(".qkv") if fused else ""
        if module is not None and (module in targets or (fused and all(f"{block}.to_{p}" in targets for p in "qkv"))):
            group.module = module
        else:
            unmapped.extend(group.keys())
    return sorted(unmapped)


@functools.lru_cache(maxsize=4096)
def _module_name(base: str) -> str | None:
    """The transformer's module name for a file's module name, by diffusers' Z-Image converter run
    on a stand-in pair of tensors under that name (a fused qkv comes back as to_q, to_k and to_v)."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    for old, new in _PREFIXES:
        if base.startswith(old):
            base = new + base[len(old) :]
    stand_in = {f"{base}.lora.down.weight": torch.zeros(1, 1), f"{base}.lora.up.weight": torch.zeros(3, 1)}
    try:
        converted = _convert_non_diffusers_z_image_lora_to_diffusers(stand_in)
    except (ValueError, KeyError, IndexError, RuntimeError):
        return None
    names = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted})
    if len(names) == 3 and names[0].endswith(".attention.to_k"):
        return names[0].removesuffix(".to_k") + ".qkv"
    return names[0] if len(names) == 1 and names[0] else None


def _unmapped_message(name: str, unmapped: list[str], total: int, metadata: Mapping[str, str]) -> str:
    message = f"{name}: {len(unmapped)} of {total} keys do not map onto Z-Image's transformer: {_examples(unmapped)}"
    hint = _metadata_hint(metadata)
    if hint:
        message += f"; its metadata says it was made for {hint[0]} ({hint[1]})"
    return message


def _share_alphas(groups: Mapping[str, _Group], name: str) -> list[_Group]:
    """The groups with weights. An alpha stored under another spelling of the same module (diffusers
    issue 13203's files: `to.q` weights, `to_q.alpha`) belongs to that module's weights."""
    import torch

    alphas: dict[str, set[float]] = {}
    for group in groups.values():
        if "alpha" in group.roles:
            alphas.setdefault(group.module or "", set()).add(_alpha_value(group, name))
    weights = []
    for group in groups.values():
        if group.kind is None and set(group.roles) != {"alpha"}:
            raise LoraError(f"{name} mixes adapter kinds under one module: {_examples(group.keys())}")
        if group.kind is None:
            if not any(g.kind and g.module == group.module for g in groups.values()):
                raise LoraError(f"{name}: {group.roles['alpha'][0]} has no weights for its module")
            continue
        shared = alphas.get(group.module or "", set())
        if "alpha" not in group.roles and len(shared) > 1:
            raise LoraError(f"{name}: {group.module} has different alphas {sorted(shared)} for one module")
        if "alpha" not in group.roles and shared:
            group.roles["alpha"] = ("", torch.tensor(next(iter(shared))))
        weights.append(group)
    return weights


def _alpha_value(group: _Group, name: str) -> float:
    key, tensor = group.roles["alpha"]
    value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan
    if not math.isfinite(value) or value <= 0:
        raise LoraError(
            f"{name}: {key} is {tensor.tolist() if tensor.numel() < 5 else tuple(tensor.shape)}; "
            "an alpha is one positive number (kohya and LyCORIS read 0 as the rank, diffusers as 0)"
        )
    return value


def _factor_shape(group: _Group, prefix: str, name: str) -> tuple[int, int]:
    """A (LoKr or LoHa) factor's shape: stored whole, or as `_a @ _b`."""
    if prefix in group.roles:
        return tuple(group.tensor(prefix).shape)  # type: ignore[return-value]
    a, b = group.tensor(prefix + "_a"), group.tensor(prefix + "_b")
    if a.shape[1] != b.shape[0]:
        raise LoraError(
            f"{name}: {group.roles[prefix + '_a'][0]} {tuple(a.shape)} and {tuple(b.shape)} do not multiply"
        )
    return a.shape[0], b.shape[1]


def _product_shape(group: _Group, name: str) -> tuple[int, int]:
    """The (out, in) shape of a group's product; refuses parts that do not fit each other."""
    for key, tensor in group.roles.values():
        if key and not key.endswith(".alpha") and (tensor.ndim != 2 or not tensor.is_floating_point()):
            raise LoraError(
                f"{name}: {key} is a {tensor.ndim}-d {tensor.dtype} tensor {tuple(tensor.shape)}; "
                "zturbo applies floating-point matrices to the transformer's linear layers only"
            )
    present = set(group.roles) - {"alpha"}
    if group.kind == "lora" and present == _LORA_ROLES:
        down, up = group.tensor("down"), group.tensor("up")
        if up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{name}: {_examples(group.keys())} disagree on the rank ({down.shape[0]} vs {up.shape[1]})"
            )
        return up.shape[0], down.shape[1]
    if group.kind == "lokr" and _complete_lokr(present):
        (a, c), (b, d) = _factor_shape(group, "w1", name), _factor_shape(group, "w2", name)
        return a * b, c * d
    if group.kind == "loha" and present == _LOHA_ROLES:
        w1, w2 = _factor_shape(group, "hada_w1", name), _factor_shape(group, "hada_w2", name)
        if w1 != w2:
            raise LoraError(f"{name}: the LoHa halves of {group.base} differ in shape ({w1} vs {w2})")
        return w1
    raise LoraError(f"{name}: {group.base} has only {_examples(group.keys())}; a {group.kind} needs its other parts")


def _complete_lokr(present: set[str]) -> bool:
    """Each LoKr factor stored exactly one way: whole (`w1`), or as both halves (`w1_a`, `w1_b`)."""
    for w in ("w1", "w2"):
        halves = {f"{w}_a", f"{w}_b"} & present
        if (w in present) == bool(halves) or len(halves) == 1:
            return False
    return True


def _wanted_shape(module: str, targets: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    if module.endswith(".attention.qkv"):
        block = module.removesuffix(".qkv")
        return sum(targets[f"{block}.to_{p}"][0] for p in "qkv"), targets[f"{block}.to_q"][1]
    return targets[module]


def _check_shapes(
    groups: list[_Group], targets: Mapping[str, tuple[int, int]], metadata: Mapping[str, str], name: str
) -> None:
    """Refuse products that do not fit their target; name the width a LoRA for another model fits."""
    wrong = []
    for group in groups:
        shape, want = _product_shape(group, name), _wanted_shape(group.module or "", targets)
        if tuple(shape) != tuple(want):
            wrong.append((group, tuple(shape), tuple(want)))
    if not wrong:
        return
    dim = next((shape[1] for module, shape in targets.items() if module.endswith(".attention.to_q")), None)
    widths = [shape[1] for group, shape, _ in wrong if ".attention." in (group.module or "")]
    shown = "; ".join(f"{_shapes(g)} give {s[0]}x{s[1]}, {g.module} is {w[0]}x{w[1]}" for g, s, w in wrong[:3])
    if widths and dim is not None and widths[0] != dim:
        message = f"{name}: its shapes fit a model {widths[0]} wide, Z-Image-Turbo is {dim} ({shown})"
    else:
        message = f"{name}: {len(wrong)} modules' shapes do not fit Z-Image's transformer: {shown}"
    hint = _metadata_hint(metadata)
    raise LoraError(message + (f"; its metadata says it was made for {hint[0]} ({hint[1]})" if hint else ""))


def _shapes(group: _Group) -> str:
    return " and ".join(f"{key} {tuple(t.shape)}" for key, t in sorted(group.roles.values()) if key and t.ndim)


@dataclass(frozen=True)
class _PeftConfig:
    """The scale rule of a peft config saved in the file's header (diffusers' `lora_adapter_metadata`)."""

    r: int
    alpha: float
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    rslora: bool

    def resolve(self, module: str) -> tuple[float, float, int]:
        """(scale, alpha, rank) for `module`, matching patterns as peft's `get_pattern_key` does."""
        r = self.rank_pattern[k] if (k := _pattern_key(self.rank_pattern, module)) else self.r
        alpha = self.alpha_pattern[k] if (k := _pattern_key(self.alpha_pattern, module)) else self.alpha
        return alpha / (math.sqrt(r) if self.rslora else r), alpha, r


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern naming `module`, as peft's `get_pattern_key` matches it (the name itself
    or a dotted suffix of it; a leading "^" anchors it), for the plain module names configs hold."""
    for key in patterns:
        if key.startswith("^") and module == key[1:]:
            return key
        if not key.startswith("^") and (module == key or module.endswith("." + key)):
            return key
    return None


def _plain_patterns(patterns: Mapping[str, Any], name: str) -> None:
    """Refuse regular expressions in rank and alpha patterns: zturbo will not run a file's regex."""
    for key in patterns:
        if re.search(r"[*+?()\[\]{}|\\$]", key.removeprefix("^")):
            raise LoraError(
                f"{name}: its {_METADATA_KEY} pattern {key!r} is a regular expression; "
                "zturbo reads rank and alpha patterns that are module names"
            )


def _peft_config(metadata: Mapping[str, str], name: str) -> _PeftConfig | None:
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
        if any(k.startswith("transformer.") for k in config):  # a pipeline's save: one config per component
            config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
        dora = bool(config.get("use_dora"))
        result = _PeftConfig(
            r=int(config.get("r", 8)),  # peft's defaults where the config leaves a field out
            alpha=float(config.get("lora_alpha", config.get("alpha", 8))),
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
            rslora=bool(config.get("use_rslora", False)),
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise LoraError(f"{name}: its {_METADATA_KEY} header entry is not a peft config ({err})") from err
    if dora:
        raise LoraError(f"{name} is a DoRA (its {_METADATA_KEY} says use_dora); zturbo applies LoRA without DoRA")
    _plain_patterns({**result.rank_pattern, **result.alpha_pattern}, name)
    values = [result.r, result.alpha, *result.rank_pattern.values(), *result.alpha_pattern.values()]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise LoraError(f"{name}: its {_METADATA_KEY} has a rank or alpha that is not positive ({raw[:200]})")
    return result


def _patches(
    group: _Group, targets: Mapping[str, tuple[int, int]], peft: _PeftConfig | None, name: str
) -> list[tuple[Patch, str]]:
    """The group's patch, or for a fused qkv one per projection with its rows; each with its first key."""
    kind = group.kind or ""
    tensors = {role.removeprefix("hada_"): t for role, (_, t) in group.roles.items() if role != "alpha"}
    alpha = _alpha_value(group, name) if "alpha" in group.roles else None
    rank = Patch("", kind, tensors).rank
    # LoKr with both factors whole applies no alpha (LyCORIS; diffusers' _bake_lokr_alpha_).
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    module = group.module or ""
    if module.endswith(".attention.qkv"):
        block, start, spans = module.removesuffix(".qkv"), 0, []
        for p in "qkv":
            out = targets[f"{block}.to_{p}"][0]
            spans.append((f"{block}.to_{p}", (start, start + out)))
            start += out
    else:
        spans = [(module, None)]
    built = []
    for target, rows in spans:
        patch_scale, patch_alpha = scale, alpha
        if peft is not None:
            peft_scale, peft_alpha, peft_rank = peft.resolve(target)
            if kind == "lora" and peft_rank != rank:
                raise LoraError(f"{name}: its {_METADATA_KEY} gives {target} rank {peft_rank}, its tensors {rank}")
            patch_scale, patch_alpha = scale * peft_scale, alpha if alpha is not None else peft_alpha
        built.append((Patch(target, kind, tensors, patch_scale, rows, patch_alpha), group.keys()[0]))
    return built


def _drop_verified_duplicates(built: list[tuple[Patch, str]], name: str) -> list[Patch]:
    """One patch per target. Files that hold the same change twice (a fused qkv beside to_q, to_k,
    to_v; `attention.out` beside `to_out.0`) keep one copy, after checking the copies agree."""
    by_target: dict[str, list[tuple[Patch, str]]] = {}
    for patch, key in built:
        by_target.setdefault(patch.target, []).append((patch, key))
    kept = []
    for target, entries in by_target.items():
        entries.sort(key=lambda e: (e[0].rows is not None, e[1]))
        first, first_key = entries[0]
        for other, key in entries[1:]:
            if not _same_change(first, other):
                raise LoraError(
                    f"{name} changes {target} twice, differently ({first_key} and {key}); "
                    "zturbo will not guess which one applies"
                )
        kept.append(first)
    return kept


def _same_change(a: Patch, b: Patch) -> bool:
    """Whether two patches change a weight alike: their products applied to one random vector agree."""
    import torch

    width = a.tensors["down"].shape[1] if a.kind == "lora" else a.delta().shape[1]
    x = torch.randn(width, generator=torch.Generator().manual_seed(0))
    ya, yb = _apply(a, x), _apply(b, x)
    if ya.shape != yb.shape:
        return False
    return bool((ya - yb).abs().max() <= 1e-3 * max(ya.abs().max(), yb.abs().max()) + 1e-12)


def _apply(patch: Patch, x: torch.Tensor) -> torch.Tensor:
    if patch.kind != "lora":
        return patch.delta() @ x
    up = patch.tensors["up"].float()
    up = up if patch.rows is None else up[patch.rows[0] : patch.rows[1]]
    return (up @ (patch.tensors["down"].float() @ x)) * patch.scale


def _format_of(keys: list[str], patches: list[Patch]) -> str:
    kinds = {p.kind for p in patches}
    if kinds != {"lora"}:
        return kinds.pop() if len(kinds) == 1 else "lycoris"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if any(k.startswith(("lora_unet_", "lora_transformer_")) or ".lora_down." in k for k in keys):
        return "kohya"
    if any(".lora.down." in k for k in keys):
        return "dot-names"
    return "diffusers"


# ---------------------------------------------------------------------------------------------
# Targets


def linear_targets(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of `transformer` with its weight's (out, in) shape."""
    import torch

    return {
        name: (int(module.weight.shape[0]), int(module.weight.shape[1]))
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def published_targets() -> dict[str, tuple[int, int]]:
    """Z-Image-Turbo's linears at real size, from its published config (no weights: meta device)."""
    return dict(_published_linears())


@functools.cache
def _published_linears() -> tuple[tuple[str, tuple[int, int]], ...]:
    import torch
    from diffusers import ZImageTransformer2DModel

    # diffusers' defaults are the published config (as bench.common builds the real size); the
    # RoPE lengths, the one field that differs, shape no linear.
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()
    return tuple(linear_targets(transformer).items())


__all__ = [
    "FORMATS",
    "KINDS",
    "LoraError",
    "ParsedLora",
    "Patch",
    "check_header",
    "linear_targets",
    "module_group",
    "parse",
    "published_targets",
    "read_file",
]
