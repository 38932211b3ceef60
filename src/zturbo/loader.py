"""Model resolution (local directory, hub or ModelScope repo id, tiny-random) and streaming weight loading.

Weights are read tensor by tensor from safetensors, moved to the target device (on CUDA through
pinned staging buffers: `StagedCopy`), cast to the target dtype there and assigned into modules
built on the meta device, so no full-precision copy of a component is ever materialised on the
host. Keys are checked strictly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ORIGIN_NAMES, TINY_MODEL, model_source
from .control.model import ControlNet
from .errors import CheckpointError, ModelNotFoundError
from .profiles import AUTO, Chosen, choose_profile, file_name_profile, transformer_file_profile
from .request import ModelLimits

if TYPE_CHECKING:
    import torch

    from .singlefile import FileSet

log = logging.getLogger("zturbo")

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASS = "ZImagePipeline"
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/*.index.json", "scheduler/*", "tokenizer/*"]
WEIGHT_PATTERNS = ["transformer/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]
WEIGHT_STEMS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
# Bytes per pinned staging buffer of a host-to-device load (`StagedCopy`); two are allocated.
STAGE_BYTES = 128 * 2**20
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local directory in the diffusers layout."""

    name: str  # as the user gave it; a local directory as its absolute path, found from anywhere
    path: Path
    revision: str | None  # hub commit, when it came from the hub
    repo_id: str | None
    # Single files (ComfyUI's) the weights come from; `path` then holds only configs and tokenizer.
    files: FileSet | None = None
    origin: str = "local"  # where it came from: hf, modelscope, local, tiny-random or single-files
    # A transformer file used in place of the directory's transformer weights (its config still
    # comes from the directory, which then needs no transformer weights): a GGUF file (zturbo.gguf).
    transformer_file: Path | None = None

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return _read_json(self.path / component / name)

    def profile(self, preset: str = AUTO) -> Chosen:
        """The model's profile: `preset` when one is named, else what the files tell; a transformer
        file whose name names another model than the directory's configs do runs as the file's,
        with a warning naming both."""
        chosen, checkpoint = self._profiles(preset)
        if checkpoint.how != "assumed" and checkpoint.profile is not chosen.profile:
            _warn_once(
                f"transformer file {self.transformer_file} is named as the {chosen.profile.name} model's, but "
                f"{self.name} is the {checkpoint.profile.name} model's (by its {checkpoint.how}); running the "
                f"{chosen.profile.name} profile (--preset {checkpoint.profile.name} runs the directory's)"
            )
        return chosen

    def limits(self, max_pixels: int, preset: str = AUTO) -> ModelLimits:
        # No warning from here: Engine.load asks for limits with 'auto' whatever the preset.
        profile = self._profiles(preset)[0].profile
        return ModelLimits(spatial_unit=spatial_unit(self), max_pixels=max_pixels, profile=profile)

    def _profiles(self, preset: str) -> tuple[Chosen, Chosen]:
        """The profile to run, and the one the checkpoint's own files tell (the same, but where a
        transformer file given beside a directory names a model by its file name)."""
        if self.files is not None:  # the scheduler config is the package's, not the model's
            chosen = file_name_profile(preset, self.files.transformer.name)
            return chosen, chosen
        checkpoint = choose_profile(preset, self.config("scheduler"), self.repo_id)
        if self.transformer_file is None:
            return checkpoint, checkpoint
        return transformer_file_profile(checkpoint, self.transformer_file.name), checkpoint


@functools.cache
def _warn_once(message: str) -> None:
    """Log `message` once a process: a load asks for the profile from several places."""
    log.warning(message)


def spatial_unit(source: ModelSource) -> int:
    """Pixels per latent patch: VAE downsampling (2^(blocks-1)) times the transformer's patch size."""
    vae_factor = 2 ** (len(source.config("vae")["block_out_channels"]) - 1)
    patch = source.config("transformer").get("all_patch_size", [2])[0]
    return vae_factor * int(patch)


def resolve_model(name: str, *, weights: bool = True, files: Mapping[str, str] | None = None) -> ModelSource:
    """Find `name`: an existing directory, 'tiny-random', or a repo id downloaded into its hub's
    cache: 'modelscope:owner/name' from ModelScope, 'hf:owner/name' from the Hugging Face hub, and
    a plain 'owner/name' from the hub ZTURBO_MODEL_SOURCE names (the Hugging Face hub unless set).

    A directory without model_index.json that holds ComfyUI's single files (or a ComfyUI models/
    tree) is read through zturbo.singlefile, as are `files` (component -> file), which replace `name`.
    With weights=False only configs and tokenizer files are fetched (cheap), so a request can be
    validated before a multi-GB download starts.
    """
    from . import singlefile

    path = Path(name).expanduser()
    if files is not None and set(files) == {"transformer"}:  # a GGUF transformer with `name`'s other parts
        transformer = Path(files["transformer"])
        if path.is_dir() and singlefile.is_file_set_dir(path):
            return _single_file_source(str(path.resolve()), singlefile.find_file_set(path, transformer))
        return _with_transformer_file(_resolve(name, weights, skip=("transformer",)), transformer)
    if files is not None:
        return _single_file_source(None, singlefile.explicit_file_set(files))
    if path.is_dir() and singlefile.is_file_set_dir(path):
        return _single_file_source(str(path.resolve()), singlefile.find_file_set(path))
    return _resolve(name, weights)


def _resolve(name: str, weights: bool, skip: tuple[str, ...] = ()) -> ModelSource:
    """A diffusers-layout checkpoint: a directory, tiny-random, or a hub repo id; with `weights`,
    every component's weights but `skip`'s are there (downloaded if need be)."""
    from .modelscope_source import split_hub

    path = Path(name).expanduser()
    if path.is_dir():
        source = ModelSource(str(path.resolve()), path.resolve(), _cache_revision(path.resolve()), None)
    elif name == TINY_MODEL:
        from .tiny import ensure_tiny_checkpoint

        source = ModelSource(name, ensure_tiny_checkpoint(), None, None, origin=TINY_MODEL)
    else:
        hub, repo_id = split_hub(name)
        if not _REPO_ID.match(repo_id):
            raise ModelNotFoundError(
                f"model {name!r} is neither an existing directory nor a hub repo id (owner/name, or "
                f"modelscope:owner/name) nor {TINY_MODEL!r}"
            )
        if (hub or model_source()) == "modelscope":
            source = _download_modelscope(repo_id, weights, skip)
        else:
            source = _download(repo_id, _patterns(weights, skip))
    check_layout(source.path, weights=weights, skip=skip)
    return source


def _single_file_source(name: str | None, files: FileSet) -> ModelSource:
    """Single files with the configs and tokenizer the package ships for their size; a GGUF
    transformer among them loads as `transformer_file`."""
    from . import gguf, singlefile

    root = singlefile.config_dir(singlefile.variant_of(files))
    check_layout(root, weights=False)
    transformer = files.transformer if gguf.is_gguf(files.transformer) else None
    return ModelSource(
        name or files.describe(), root, None, None, files=files, origin="single-files", transformer_file=transformer
    )


def _with_transformer_file(source: ModelSource, path: Path) -> ModelSource:
    """`source` with its transformer's weights read from `path` (a GGUF file); its config stays the
    directory's, whose own transformer weights are neither needed nor downloaded."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"transformer file {path} does not exist or is not a file")
    return dataclasses.replace(source, transformer_file=path)


def describe_origin(name: str) -> str:
    """Where `name` would be loaded from, without resolving it (`zturbo info`)."""
    from .modelscope_source import cache_dir, split_hub
    from .singlefile import is_file_set_dir

    path = Path(name).expanduser()
    if path.is_dir():
        return ORIGIN_NAMES["single-files" if is_file_set_dir(path) else "local"]
    if name == TINY_MODEL:
        return ORIGIN_NAMES[TINY_MODEL]
    hub, _ = split_hub(name)
    if (hub or model_source()) == "modelscope":
        return f"{ORIGIN_NAMES['modelscope']}, cache {cache_dir()}"
    return ORIGIN_NAMES["hf"]


def _patterns(weights: bool, skip: tuple[str, ...]) -> list[str]:
    """The files to download: configs and tokenizer, and with `weights` those of every component but `skip`'s."""
    wanted = [p for p in WEIGHT_PATTERNS if p.split("/")[0] not in skip] if weights else []
    return CONFIG_PATTERNS + wanted


def _download_modelscope(repo_id: str, weights: bool, skip: tuple[str, ...]) -> ModelSource:
    from . import modelscope_source

    def complete(root: Path) -> bool:
        try:
            check_layout(root, weights=weights, skip=skip)
        except CheckpointError:
            return False
        return True

    path = modelscope_source.download(repo_id, _patterns(weights, skip), complete)
    # The recorded name carries the prefix, so reading an image back finds the same hub.
    return ModelSource(f"modelscope:{repo_id}", path, _cache_revision(path), repo_id, origin="modelscope")


def _download(repo_id: str, patterns: list[str]) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1); download it on a connected machine or pass --model a local "
            f"directory in the diffusers layout"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is gated; log in with `hf auth login` and accept its terms"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} does not exist on the hub (or is private)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(
            f"downloading {repo_id!r} failed: {e}; pass --model a local directory to skip the hub"
        ) from None
    return ModelSource(repo_id, path, _cache_revision(path), repo_id, origin="hf")


def _cache_revision(path: Path) -> str | None:
    """The commit hash when `path` is a snapshot inside a Hugging Face cache."""
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def check_layout(root: Path, *, weights: bool = True, skip: tuple[str, ...] = ()) -> None:
    """Every component directory and config is present, and (with weights) every weight file but
    those of the components in `skip`."""
    index = root / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{index} is missing: {root} is not a diffusers-format model directory")
    pipeline = _read_json(index).get("_class_name")
    if pipeline != PIPELINE_CLASS:
        raise CheckpointError(f"{index} describes a {pipeline!r}, not a Z-Image checkpoint ({PIPELINE_CLASS})")
    for component in COMPONENTS:
        if not (root / component).is_dir():
            raise CheckpointError(f"component directory {root / component} is missing")
    for component in ("transformer", "vae", "text_encoder"):
        _require(root / component / "config.json")
    _require(root / "scheduler" / "scheduler_config.json")
    if weights:
        for component, stem in WEIGHT_STEMS.items():
            if component not in skip:
                weight_files(root / component, stem)


def _require(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def weight_files(directory: Path, stem: str) -> list[Path]:
    """The safetensors files of one component: a single file, or the shards its index names."""
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index} has an empty weight_map")
        files = [directory / s for s in shards]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"weight shard {f} named in {index.name} is missing")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"no weights in {directory}: expected {single.name} or {index.name}")


# ---------------------------------------------------------------------------------------------
# Streaming load


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, CPU tensor) for every tensor, one at a time; corrupt files are named."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, path, f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is corrupt or truncated ({e}); delete it and download again") from None


def load_weights(
    module: torch.nn.Module,
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    rename: Callable[[str], str | None] = lambda k: k,
    keep_float32: Callable[[str], bool] = lambda k: False,
) -> None:
    """Stream `files` into `module` (built on the meta device), casting floats to `dtype` on `device`.

    `rename` maps a checkpoint key to a module key, or to None for keys that are known to be unused;
    keys for which `keep_float32` is true are cast to float32 instead of `dtype`.
    Missing, unexpected and mis-shaped keys are errors.
    """
    entries = ((raw, path, rename(raw), tensor) for raw, path, tensor in iter_tensors(files))
    load_tensors(module, entries, files[0].parent, device, dtype, keep_float32)


def load_tensors(
    module: torch.nn.Module,
    entries: Iterable[tuple[str, Path, str | None, torch.Tensor]],
    where: Path,
    device: torch.device,
    dtype: torch.dtype,
    keep_float32: Callable[[str], bool] = lambda k: False,
) -> None:
    """`load_weights` for (stored key, file, module key or None to skip, tensor) entries."""
    import torch

    expected = module.state_dict(keep_vars=True)
    seen: set[str] = set()
    with StagedCopy.to(device) as copy:
        for raw_key, path, key, tensor in entries:
            if key is None:
                continue
            _check_entry(module, expected, raw_key, path, key, tensor)
            # Move first, then cast: the copy is half the bytes of an fp32 cast on the CPU and the
            # cast runs on the accelerator.
            tensor = copy(tensor)
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32 if keep_float32(key) else dtype)
            _assign(module, key, tensor)
            seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing from the weights: {shown}")
    # Non-persistent buffers (e.g. rotary frequencies) were built for real on the CPU.
    module.to(device)
    module.eval().requires_grad_(False)


def _check_entry(
    module: torch.nn.Module, expected: dict[str, torch.Tensor], raw_key: str, path: Path, key: str, tensor: torch.Tensor
) -> None:
    """A stored tensor the module has, of the shape it expects; else a CheckpointError naming it."""
    if key not in expected:
        raise CheckpointError(f"{path}: unexpected tensor {raw_key!r} (not part of {type(module).__name__})")
    if tuple(tensor.shape) != tuple(expected[key].shape):
        raise CheckpointError(
            f"{path}: tensor {raw_key!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(expected[key].shape)} (config and weights disagree)"
        )


class StagedCopy:
    """Copies CPU tensors to a CUDA device through two pinned staging buffers: torch's threads copy
    one chunk out of the (memory-mapped) file into one buffer while the other buffer's chunk is on
    its way to the GPU. A pageable `.to(device)` does the two in turn, one thread reading through
    the driver's small staging buffers, at a fraction of the link's speed.
    Off CUDA, `to` gives a plain `.to(device)`; made directly for the CPU, it stages through
    unpinned buffers, one chunk at a time."""

    def __init__(self, device: torch.device, stage_bytes: int = STAGE_BYTES) -> None:
        import torch

        self.device = device
        cuda = device.type == "cuda"
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # no context on another GPU
            self.buffers = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.sent: list[Any] = [None, None]  # the CUDA event of each buffer's last transfer
        self.turn = 0

    @classmethod
    @contextlib.contextmanager
    def to(cls, device: torch.device) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """A function moving a tensor to `device`; on CUDA, staged, every transfer done on exit. Where
        pinned memory cannot be had (a host that limits it), the plain pageable copy."""
        try:
            staged = cls(device) if device.type == "cuda" else None
        except RuntimeError as e:
            log.info("weights copied without pinned staging buffers: %s", e)
            staged = None
        if staged is None:
            yield lambda tensor: tensor.to(device)
            return
        try:
            yield staged
        except BaseException:
            with contextlib.suppress(RuntimeError):  # a sticky CUDA error: the first one is the one to tell
                staged.finish()
            raise
        staged.finish()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        if type(tensor) is not torch.Tensor or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return tensor.to(self.device)  # a subclass keeps what its own `.to` does
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        source, target = _bytes(tensor), _bytes(out)
        size = self.buffers[0].numel()
        for start in range(0, source.numel(), size):
            n = min(size, source.numel() - start)
            buffer = self._free_buffer()[:n]
            buffer.copy_(source[start : start + n])
            target[start : start + n].copy_(buffer, non_blocking=True)  # on `device`'s current stream
            self._sent()
        return out

    def _free_buffer(self) -> torch.Tensor:
        """The next buffer, once its last transfer has ended."""
        if self.sent[self.turn] is not None:
            self.sent[self.turn].synchronize()
        return self.buffers[self.turn]

    def _sent(self) -> None:
        import torch

        if self.device.type == "cuda":
            # The stream the copy went on: `device`'s, which need not be the process's current device.
            self.sent[self.turn] = torch.cuda.current_stream(self.device).record_event()
        self.turn ^= 1

    def finish(self) -> None:
        """Wait for the transfers in flight, then give the pinned buffers back to the system (torch's
        host allocator would keep them for the process's life)."""
        import torch

        for event in self.sent:
            if event is not None:
                event.synchronize()
        self.sent, self.buffers = [None, None], []
        release = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds; torch's graph capture calls it too
        if self.device.type == "cuda" and release is not None:
            release()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage bytes, as a flat uint8 view."""
    import torch

    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def tensor_reader(files: list[Path], dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """Read one tensor of a component's weights by key, cast to `dtype` as `load_weights` casts it
    (what merging a LoRA into a quantized weight starts from). The key index is built on first use."""
    index: dict[str, Path] = {}

    def read(key: str) -> torch.Tensor:
        from safetensors import safe_open

        if not index:
            for path in files:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    index.update(dict.fromkeys(f.keys(), path))
        if key not in index:
            raise CheckpointError(f"{files[0].parent}: no tensor {key!r} in the weights")
        with safe_open(str(index[key]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    return read


def _assign(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    import torch

    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _empty(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def text_encoder_key(expected: set[str]) -> Callable[[str], str | None]:
    """Qwen3 checkpoints saved from the causal-LM class prefix keys with 'model.' and carry lm_head."""

    def rename(key: str) -> str | None:
        if key.startswith("lm_head."):
            return None
        if key not in expected and key.startswith("model.") and key[6:] in expected:
            return key[6:]
        return key

    return rename


@dataclass
class Components:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    controlnet: ControlNet | None = None  # loaded with the model when asked (RuntimeConfig.controlnet)
    # Where the transformer's weights came from when not the checkpoint's (a GGUF file's
    # description, for the metadata); None for the checkpoint's own.
    transformer_weights: dict[str, Any] | None = None


def load_components(
    source: ModelSource,
    device: torch.device,
    dtypes: dict[str, torch.dtype],
    homes: dict[str, torch.device] | None = None,
    controlnet: str | None = None,
) -> Components:
    """Build every component on the meta device and stream its weights in, logging each one.

    `homes` overrides `device` per component (the memory plan keeps offloaded ones on the CPU);
    the ControlNet (`controlnet`: a file, directory or hub repo id) goes where the transformer
    goes unless `homes` names it, in the transformer's dtype.
    """
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoConfig, AutoTokenizer

    from .guard import is_float32_key

    homes = {name: (homes or {}).get(name, device) for name in ("transformer", "text_encoder", "vae")} | {
        "controlnet": (homes or {}).get("controlnet", (homes or {}).get("transformer", device))
    }

    # A ControlNet that does not fit this model is refused before any weights load.
    control = None if controlnet is None else _controlnet_files(controlnet, source.config("transformer"))
    root = source.path
    t_dtype = dtypes["transformer"]
    t_weights = None
    if source.transformer_file is not None:
        transformer, t_weights = _load_transformer_file(source, homes["transformer"], t_dtype)
    else:
        transformer = _empty(lambda: ZImageTransformer2DModel.from_config(source.config("transformer")))
        # Under float16 the precision-sensitive modules stay float32 straight from the checkpoint.
        keep = is_float32_key if t_dtype is torch.float16 else (lambda k: False)
        _load_component(source, "transformer", transformer, homes["transformer"], t_dtype, keep=keep)

    vae = _empty(lambda: AutoencoderKL.from_config(source.config("vae")))
    _load_component(source, "vae", vae, homes["vae"], dtypes["vae"])

    te_cls = _text_encoder_class(root)
    te_config = AutoConfig.from_pretrained(root / "text_encoder")
    text_encoder = _empty(lambda: te_cls._from_config(te_config))
    rename = text_encoder_key(set(text_encoder.state_dict().keys()))
    _load_component(source, "text_encoder", text_encoder, homes["text_encoder"], dtypes["text_encoder"], rename)

    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer in {root / 'tokenizer'} cannot be loaded: {e}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"tokenizer in {root / 'tokenizer'} has no chat template; Z-Image needs Qwen's")
    components = Components(transformer, vae, text_encoder, tokenizer, source.config("scheduler"))
    components.transformer_weights = t_weights
    if controlnet is not None:
        components.controlnet = load_controlnet(controlnet, transformer, homes["controlnet"], t_dtype, control)
    _log_components(components, homes)
    return components


def _log_components(components: Components, homes: Mapping[str, torch.device]) -> None:
    from .gguf import logical_numel

    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(components, name)
        n = sum(logical_numel(p) for p in module.parameters())
        log.info("%s: %s on %s, %s parameters", name, _dtype_of(module), homes[name], _count(n))


def _load_component(
    source: ModelSource,
    name: str,
    module: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    rename: Callable[[str], str | None] = lambda k: k,
    keep: Callable[[str], bool] = lambda k: False,
) -> None:
    """Stream one component's weights from the diffusers layout or from its single file."""
    if source.files is None:
        load_weights(module, weight_files(source.path / name, WEIGHT_STEMS[name]), device, dtype, rename, keep)
        return
    from . import singlefile

    plan = singlefile.plan(name, source.files.path(name), source.config(name), module, rename)
    if plan.fp8:
        log.info("%s: %d fp8 weights (%d scaled) dequantized to %s", name, plan.fp8, len(plan.scales), dtype)
    load_tensors(module, singlefile.stored_tensors(plan, device), plan.path, device, dtype, keep)


def base_reader(source: ModelSource, transformer: torch.nn.Module, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """`tensor_reader` for the transformer's weights wherever they come from."""
    if source.files is None:
        return tensor_reader(weight_files(source.path / "transformer", WEIGHT_STEMS["transformer"]), dtype)
    from . import singlefile

    config = source.config("transformer")
    return singlefile.tensor_reader(
        singlefile.plan("transformer", source.files.transformer, config, transformer), dtype
    )


def _load_transformer_file(
    source: ModelSource, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The transformer from `source.transformer_file`, built from the directory's config."""
    from . import gguf

    path = source.transformer_file
    assert path is not None
    if not gguf.is_gguf(path):
        raise CheckpointError(f"transformer file {path} is not a {gguf.SUFFIX} file")
    transformer, info = gguf.load_transformer(path, source.config("transformer"), device, dtype)
    # The model's fingerprint covers the directory only: the file needs its own.
    return transformer, info.describe() | {"fingerprint": _file_digest(path)}


def load_controlnet(
    spec: str,
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    resolved: tuple[Any, dict[str, Any], set[str]] | None = None,
) -> ControlNet:
    """The ControlNet `spec` names, built for `transformer` (whose embedders and refiners it then
    shares, diffusers' `from_transformer`): its config from the file (control.structure), built
    on the meta device, its weights streamed in strictly, in `dtype` on `device`. `resolved`:
    what `_controlnet_files` already found for it."""
    from diffusers import ZImageControlNetModel

    from .control.model import own_parameters, weights_sha256
    from .control.structure import version

    files, config, kept = resolved or _controlnet_files(spec, transformer.config)
    model = _empty(lambda: ZImageControlNetModel.from_config(config))
    load_weights(model, list(files.weights), device, dtype, rename=lambda k: k if k in kept else None)
    model = ZImageControlNetModel.from_transformer(model, transformer)
    named = " ".join([spec, *(path.name for path in files.weights)])  # Tile and 8-step files say so in their names
    found = ControlNet(
        model, spec, version(config, transformer.config, named), weights_sha256(files.weights), files.weights
    )
    n = sum(p.numel() for p in own_parameters(model))
    log.info("controlnet %s (%s): %s on %s, %s parameters", spec, found.version, dtype, device, _count(n))
    return found


def _controlnet_files(spec: str, transformer_config: Any) -> tuple[Any, dict[str, Any], set[str]]:
    """(the files `spec` names, the config they need, the keys it loads), checked against the
    transformer's config: headers only, no weights (control.structure.resolve_config)."""
    from .control import resolve_controlnet
    from .control.structure import resolve_config

    files = resolve_controlnet(spec)
    return (files, *resolve_config(files, transformer_config))


def _text_encoder_class(root: Path) -> type:
    import transformers

    library, name = _read_json(root / "model_index.json").get("text_encoder", ["transformers", "Qwen3Model"])
    cls = getattr(transformers, name, None) if library == "transformers" else None
    if cls is None:
        raise CheckpointError(f"{root / 'model_index.json'}: text encoder class {library}.{name} is not available")
    return cls


def _dtype_of(module: torch.nn.Module) -> str:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
    return "/".join(dtypes)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else str(n)


# ---------------------------------------------------------------------------------------------
# Identity of a checkpoint for image metadata

_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20


def fingerprint(source: ModelSource) -> str:
    """A sha256 identifying the checkpoint's content, cheap enough to compute at every load.

    Hub snapshots store weights as blobs named by their sha256, which are used as they are. Other
    files up to 64 MiB are hashed whole; larger local files contribute their size, their
    safetensors header (names, shapes, dtypes, offsets) and three 1 MiB samples.
    """
    h = hashlib.sha256()
    if source.files is not None:
        for name in ("transformer", "text_encoder", "vae"):
            h.update(f"{name}\0{_file_digest(source.files.path(name))}\n".encode())
        return h.hexdigest()
    for path in sorted(p for p in source.path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(source.path).as_posix()
        if rel.split("/")[0] not in COMPONENTS and rel != "model_index.json":
            continue
        if source.transformer_file is not None and rel.startswith("transformer/") and rel != "transformer/config.json":
            continue  # weights the transformer file replaces: never read (the file has its own fingerprint)
        h.update(rel.encode() + b"\0")
        h.update(_file_digest(path).encode() + b"\n")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    blob = path.resolve()
    if path.is_symlink() and _SHA256.match(blob.name):
        return blob.name
    size = blob.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(blob, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return h.hexdigest()
        header_len = int.from_bytes(f.read(8), "little") if path.suffix == ".safetensors" else 0
        h.update(f.read(min(header_len, size - 8)))
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()
