"""What a Z-Image ControlNet file is: its diffusers config inferred from the tensor names and
shapes alone, its version, and the checks that it fits the loaded transformer.

alibaba-pai publishes single files with no config. diffusers' `from_single_file` would fetch one
from the hub; the same config follows from the file itself:
  - control_in_dim: the control patch embedder's inputs / patch area (16, or 33 with the inpaint
    channels of the 2.x files);
  - control layers: the `control_layers.N` blocks, spread over the transformer's layers at every
    round(n_layers / N)-th one: 15 -> 0, 2, ..., 28 (2.x); 6 -> 0, 5, ..., 25 (1.0); 3 -> 0, 10,
    20 (lite). VideoX-Fun's configs and ComfyUI's model-patch loader place them so;
  - the refiner's kind, as diffusers' `infer_diffusers_model_type` tells 2.0 from 2.1: refiner
    blocks with a nonzero `before_proj` take the control input themselves (2.1, "control_noise_refiner");
    an all-zero one, or a 15-layer file without one, is 2.0's arrangement, whose refiner tensors are
    unused ("control_layers"); plain refiner blocks are 1.0's (None).
The widths come from the transformer, which the ControlNet shares its embedders and refiners with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import CheckpointError
from .files import ControlNetFiles, TensorInfo

EMBEDDER = re.compile(r"^control_all_x_embedder\.(\d+)-(\d+)\.weight$")
EMBEDDER_KEY = "control_all_x_embedder.2-1.weight"
BEFORE_PROJ = "control_noise_refiner.0.before_proj.weight"
TWO_X_KEY = "control_layers.14.adaLN_modulation.0.weight"  # diffusers' mark of a 2.x file (15 layers)
CONFIG_CLASS = "ZImageControlNetModel"
REFINER_MODES = (None, "control_layers", "control_noise_refiner")
VERSIONS = {None: "1.0", "control_layers": "2.0", "control_noise_refiner": "2.1"}
# ZImageTransformer2DModel's defaults, for configs that leave a field out.
TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
}
# Other files people put where a ControlNet goes, told apart by a key they carry.
LOOKALIKES: tuple[tuple[str, str], ...] = (
    ("controlnet_x_embedder.", "a FLUX ControlNet (diffusers' FluxControlNetModel)"),
    ("controlnet_blocks.0.y_rms.", "a Qwen-Image block-wise ControlNet"),
    ("control_img_in.", "a Qwen-Image Fun ControlNet"),
    ("controlnet_cond_embedding.", "a Stable Diffusion ControlNet"),
    ("input_hint_block.", "a Stable Diffusion ControlNet"),
    ("lora_A.", "a LoRA"),
    ("lora_down.", "a LoRA"),
    ("layers.0.adaLN_modulation.0.weight", "a Z-Image transformer, not a ControlNet"),
    ("double_blocks.0.", "a FLUX transformer"),
    ("transformer_blocks.0.", "a diffusion transformer"),
    ("encoder.down_blocks.", "a VAE"),
    ("model.layers.0.", "a language model"),
)


def transformer_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer config fields a ControlNet depends on, with diffusers' defaults filled in."""
    return {k: config.get(k, default) for k, default in TRANSFORMER_DEFAULTS.items()}


def looks_like(keys: Iterable[str]) -> str:
    """What a file that is not a Z-Image ControlNet seems to be, by its keys."""
    keys = list(keys)
    for mark, what in LOOKALIKES:
        if any(mark in k for k in keys):
            return what
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"an unknown model (first keys: {shown})"


def require_controlnet(header: Mapping[str, TensorInfo], name: str) -> None:
    if EMBEDDER_KEY not in header:
        raise CheckpointError(
            f"controlnet {name} is not a Z-Image ControlNet: it looks like {looks_like(header)}; expected "
            "alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (keys control_layers.N.*, control_all_x_embedder.2-1.*)"
        )


def require_config(config: Mapping[str, Any], name: str) -> None:
    """A diffusers directory's config.json is a ZImageControlNetModel's."""
    cls = config.get("_class_name", CONFIG_CLASS)
    if cls != CONFIG_CLASS or "control_in_dim" not in config:
        what = f"a {cls}" if cls != CONFIG_CLASS else "a config without control_in_dim"
        raise CheckpointError(f"controlnet {name} is not a Z-Image ControlNet: its config.json describes {what}")


def in_dim(header: Mapping[str, TensorInfo], name: str) -> int:
    """control_in_dim: the control patch embedder's input width over the patch's area."""
    require_controlnet(header, name)
    shape = header[EMBEDDER_KEY][1]
    patch = 2 * 2 * 1  # the "2-1" embedder: 2x2 spatial patches, one frame
    if len(shape) != 2 or shape[1] % patch:
        raise CheckpointError(f"controlnet {name}: {EMBEDDER_KEY} has shape {shape}, not (dim, {patch} * channels)")
    return shape[1] // patch


def indices(header: Mapping[str, TensorInfo], prefix: str) -> list[int]:
    """The block numbers under `prefix` (e.g. control_layers.), sorted."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in header if (m := pattern.match(k))})


def layer_places(count: int, n_layers: int) -> list[int]:
    """Which transformer layers `count` control layers feed: every round(n_layers / count)-th."""
    step = round(n_layers / count)
    return [i * step for i in range(count)]


def refiner_mode(header: Mapping[str, TensorInfo], before_proj_is_zero: Callable[[], bool]) -> str | None:
    """diffusers' `add_control_noise_refiner` for a single file (see the module docstring)."""
    if BEFORE_PROJ in header:
        return "control_layers" if before_proj_is_zero() else "control_noise_refiner"
    if TWO_X_KEY in header:
        return "control_layers"
    return None


def infer_config(
    header: Mapping[str, TensorInfo],
    transformer: Mapping[str, Any],
    name: str,
    before_proj_is_zero: Callable[[], bool],
) -> dict[str, Any]:
    """The ZImageControlNetModel config a single file needs, for the transformer of `transformer` config."""
    t = transformer_fields(transformer)
    control_in_dim = in_dim(header, name)
    dim = header[EMBEDDER_KEY][1][0]
    if dim != t["dim"]:
        raise CheckpointError(
            f"controlnet {name} has dim {dim}, this model's transformer has {t['dim']}: it is a ControlNet for "
            "another model"
        )
    layers = indices(header, "control_layers.")
    refiners = indices(header, "control_noise_refiner.")
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"controlnet {name}: control layers {layers or 'none'} are not numbered 0..N-1")
    if len(layers) > t["n_layers"]:
        raise CheckpointError(
            f"controlnet {name} has {len(layers)} control layers, more than the transformer's {t['n_layers']} "
            "layers: it is a ControlNet for a larger model"
        )
    mode = refiner_mode(header, before_proj_is_zero)
    if mode != "control_layers" and refiners != list(range(len(refiners))):
        raise CheckpointError(f"controlnet {name}: control refiner blocks {refiners} are not numbered 0..N-1")
    if mode is None and not refiners:
        raise CheckpointError(f"controlnet {name} has no control_noise_refiner blocks, which its version needs")
    patches = sorted({(int(m.group(1)), int(m.group(2))) for k in header if (m := EMBEDDER.match(k))})
    return {
        "control_layers_places": layer_places(len(layers), t["n_layers"]),
        "control_refiner_layers_places": list(range(t["n_refiner_layers"])) if mode else None,
        "control_in_dim": control_in_dim,
        "add_control_noise_refiner": mode,
        "all_patch_size": [p for p, _ in patches],
        "all_f_patch_size": [f for _, f in patches],
        "dim": dim,
        "n_refiner_layers": len(refiners) if mode != "control_layers" else t["n_refiner_layers"],
        "n_heads": t["n_heads"],
        "n_kv_heads": t["n_kv_heads"],
        "norm_eps": t["norm_eps"],
        "qk_norm": t["qk_norm"],
    }


def check_fits(config: Mapping[str, Any], transformer: Mapping[str, Any], name: str) -> None:
    """Refuse a ControlNet config that does not fit the transformer it would share modules with."""
    t = transformer_fields(transformer)
    for field in ("dim", "n_heads", "n_kv_heads", "qk_norm"):
        if config.get(field, TRANSFORMER_DEFAULTS[field]) != t[field]:
            raise CheckpointError(
                f"controlnet {name} has {field} {config.get(field, TRANSFORMER_DEFAULTS[field])}, this model's "
                f"transformer has {t[field]}: it is a ControlNet for another model"
            )
    mode = config.get("add_control_noise_refiner")
    if mode not in REFINER_MODES:
        raise CheckpointError(f"controlnet {name}: add_control_noise_refiner {mode!r} is not one of {REFINER_MODES}")
    places = list(config.get("control_layers_places") or [])
    if not places or 0 not in places or max(places) >= t["n_layers"]:
        raise CheckpointError(
            f"controlnet {name}: control layers at {places} do not fit the transformer's {t['n_layers']} layers"
        )
    refiner_places = list(config.get("control_refiner_layers_places") or [])
    if mode and (not refiner_places or max(refiner_places) >= t["n_refiner_layers"]):
        raise CheckpointError(
            f"controlnet {name}: refiner places {refiner_places} do not fit the transformer's "
            f"{t['n_refiner_layers']} noise-refiner blocks"
        )
    if mode == "control_noise_refiner" and config.get("n_refiner_layers", 2) < len(refiner_places):
        raise CheckpointError(
            f"controlnet {name} has fewer control refiner blocks than refiner places {refiner_places}"
        )
    for patch in zip(config.get("all_patch_size", (2,)), config.get("all_f_patch_size", (1,)), strict=False):
        if patch not in set(zip(t["all_patch_size"], t["all_f_patch_size"], strict=False)):
            raise CheckpointError(f"controlnet {name}: patch size {patch} is not one of the transformer's")


def check_tensors(header: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]], name: str) -> None:
    """The file's tensors (after the converter's filtering) are exactly what the config builds."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = [k for k in sorted(set(header) & set(expected)) if tuple(header[k][1]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else []
        parts += [f"{k} is {tuple(header[k][1])}, not {tuple(expected[k])}" for k in wrong[:3]]
        raise CheckpointError(
            f"controlnet {name} does not fit its config for this transformer: {'; '.join(parts)} "
            "(a ControlNet for another model size or version)"
        )


def version(config: Mapping[str, Any], transformer: Mapping[str, Any], name: str) -> str:
    """union-1.0 | union-2.0 | union-2.1, '-lite' for fewer control layers than half the
    transformer's (2.1 lite: 3 of 30), 'tile-' for the Tile files (their names say so; the tensors
    are the Union's) and '-8steps' likewise."""
    mode = config.get("add_control_noise_refiner")
    lite = mode is not None and len(config["control_layers_places"]) < transformer_fields(transformer)["n_layers"] // 2
    lowered = name.lower()
    family = "tile" if "tile" in lowered else "union"
    return f"{family}-{VERSIONS[mode]}" + ("-lite" if lite else "") + ("-8steps" if "8step" in lowered else "")


def resolve_config(files: ControlNetFiles, transformer: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(the ZImageControlNetModel config, the file keys it loads), checked against the transformer:
    a diffusers directory's own config, or a single file's inferred one. Reads headers, and for a
    2.x single file the one tensor that tells 2.0 from 2.1."""
    if files.config is not None:
        require_config(files.config, files.name)
    header = files.header()
    require_controlnet(header, files.name)
    if files.config is not None:
        config = {k: v for k, v in files.config.items() if not k.startswith("_")}
    else:
        config = infer_config(header, transformer, files.name, lambda: _all_zero(files, BEFORE_PROJ))
    check_fits(config, transformer, files.name)
    kept = kept_keys(header, config)
    check_tensors({k: header[k] for k in kept}, expected_shapes(config), files.name)
    return config, kept


def kept_keys(keys: Iterable[str], config: Mapping[str, Any]) -> set[str]:
    """The keys diffusers' single-file converter keeps for `config` (2.0 drops its unused refiner)."""
    from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers

    return set(convert_z_image_controlnet_checkpoint_to_diffusers(dict.fromkeys(keys), dict(config)))


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the config's ZImageControlNetModel holds, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in build_meta(config).state_dict().items()}


def build_meta(config: Mapping[str, Any]) -> Any:  # -> ZImageControlNetModel on the meta device
    import torch
    from diffusers import ZImageControlNetModel

    with torch.device("meta"):
        return ZImageControlNetModel.from_config(dict(config))


def _all_zero(files: ControlNetFiles, key: str) -> bool:
    from safetensors import SafetensorError, safe_open

    for path in files.weights:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    return not bool(f.get_tensor(key).any())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is corrupt or truncated ({e}); delete it and download again") from None
    raise CheckpointError(f"controlnet {files.name}: {key} is not in its files")
