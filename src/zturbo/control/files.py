"""Where a ControlNet's files are, and what their safetensors headers say.

A ControlNet is named by a local `.safetensors` file in alibaba-pai's layout, a local directory
(diffusers' layout: config.json + diffusion_pytorch_model.safetensors; or a folder holding
single files), or a hub repository id, `REPO:FILE` picking one file of a repository that
publishes several (alibaba-pai's repos hold the full, 8-step and lite files side by side).
Nothing here reads a tensor: headers are JSON at the start of each file.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, InvalidRequestError, ModelNotFoundError

SINGLE_FILE = "single-file"  # alibaba-pai's layout: one .safetensors file, no config
DIFFUSERS = "diffusers"  # config.json + diffusion_pytorch_model(.safetensors | shards and index)
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
WEIGHT_STEM = "diffusion_pytorch_model"
MAX_HEADER = 100 * 2**20  # bytes; a real header is well under 1 MiB
SHOWN = 8  # file names an error lists
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# dtype, shape of one tensor, as a safetensors header gives them.
TensorInfo = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class ControlNetFiles:
    """A ControlNet resolved to its files. `weights` is empty only for a hub file that was not
    downloaded (`resolve_controlnet(..., weights=False)`); its header then comes from the hub."""

    name: str  # as asked
    form: str  # SINGLE_FILE or DIFFUSERS
    weights: tuple[Path, ...]
    config: dict[str, Any] | None = None  # the diffusers form's config.json
    repo_id: str | None = None
    remote_file: str | None = None  # a hub file whose header is read without downloading it

    def header(self) -> dict[str, TensorInfo]:
        """Every tensor's dtype and shape, from the files' headers (or the hub's copy of one)."""
        if not self.weights and self.repo_id and self.remote_file:
            return _remote_header(self.repo_id, self.remote_file)
        out: dict[str, TensorInfo] = {}
        for path in self.weights:
            out.update(read_header(path))
        return out


def resolve_controlnet(spec: str, *, weights: bool = True) -> ControlNetFiles:
    """The files `spec` names: an existing .safetensors file, a directory, or a hub repo id
    (`owner/name`, or `owner/name:FILE`). With weights=False a hub repository's weights are not
    downloaded (a diffusers repo's config is; a single file's header is read from the hub)."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise InvalidRequestError(f"controlnet {spec!r} is empty; name a .safetensors file, a directory or a repo id")
    path = Path(text).expanduser()
    if path.is_file():
        return ControlNetFiles(spec, SINGLE_FILE, (_single_file(path, spec),))
    if path.is_dir():
        return _local_directory(path.resolve(), spec)
    if text.lower().endswith((SUFFIX, *PICKLE_SUFFIXES)) and ":" not in text:
        raise ModelNotFoundError(f"controlnet file {text} does not exist")
    repo_id, _, filename = text.partition(":")
    if _REPO_ID.match(repo_id) and not text.startswith((".", "/", "~")):
        return _hub(spec, repo_id, filename or None, weights)
    raise ModelNotFoundError(
        f"controlnet {spec!r} is neither an existing .safetensors file nor a directory nor a hub repo id "
        "(owner/name, or owner/name:FILE for one file of a repository holding several)"
    )


def _single_file(path: Path, spec: str) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidRequestError(
            f"controlnet {spec!r}: only .safetensors files are loaded (pickled .pt, .ckpt and .bin files can run "
            "code when read; convert it to .safetensors)"
        )
    if path.suffix.lower() != SUFFIX:
        raise InvalidRequestError(f"controlnet {spec!r} is not a .safetensors file")
    return path.resolve()


def _local_directory(root: Path, spec: str) -> ControlNetFiles:
    """A diffusers directory (config.json and its weights), or a folder with one single file."""
    if (root / "config.json").is_file():
        return ControlNetFiles(spec, DIFFUSERS, tuple(_diffusers_weights(root)), _read_json(root / "config.json"))
    candidates = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIX))
    if len(candidates) == 1:
        return ControlNetFiles(spec, SINGLE_FILE, (root / candidates[0],))
    if not candidates:
        raise CheckpointError(f"controlnet directory {root} holds neither config.json nor a .safetensors file")
    raise InvalidRequestError(
        f"controlnet directory {root} holds several .safetensors files ({_listed(candidates)}); "
        f"name one, e.g. {root / candidates[0]}"
    )


def _diffusers_weights(root: Path) -> list[Path]:
    """The weights of a diffusers directory: one file, or the shards its index names."""
    single, index = root / f"{WEIGHT_STEM}{SUFFIX}", root / f"{WEIGHT_STEM}{SUFFIX}.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if not shards or missing:
            raise CheckpointError(f"{index} names no shards or missing ones ({_listed(missing)})")
        return [root / s for s in shards]
    if single.is_file():
        return [single]
    raise CheckpointError(f"controlnet directory {root} has config.json but no {single.name} (or its index)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# ---------------------------------------------------------------------------------------------
# Hub repositories


def _hub(spec: str, repo_id: str, filename: str | None, weights: bool) -> ControlNetFiles:
    names = _repo_files(repo_id)
    singles = sorted(n for n in names if n.lower().endswith(SUFFIX))
    if filename is not None:
        if filename not in names:
            raise ModelNotFoundError(
                f"controlnet repo {repo_id} has no file {filename!r}; "
                f"its .safetensors files: {_listed(singles) or 'none'}"
            )
        return _hub_single(spec, repo_id, filename, weights)
    if "config.json" in names and any(PurePosixPath(n).name.startswith(WEIGHT_STEM) for n in singles):
        patterns = ["config.json"] + ([f"{WEIGHT_STEM}*"] if weights else [])
        root = _download(repo_id, patterns)
        config = _read_json(root / "config.json")
        return ControlNetFiles(spec, DIFFUSERS, tuple(_diffusers_weights(root)) if weights else (), config, repo_id)
    if len(singles) == 1:
        return _hub_single(spec, repo_id, singles[0], weights)
    if not singles:
        raise CheckpointError(f"controlnet repo {repo_id} holds no .safetensors file")
    raise InvalidRequestError(
        f"controlnet repo {repo_id} holds several ControlNet files ({_listed(singles)}); pick one as "
        f"{repo_id}:FILE, e.g. {repo_id}:{singles[0]}"
    )


def _hub_single(spec: str, repo_id: str, filename: str, weights: bool) -> ControlNetFiles:
    if not filename.lower().endswith(SUFFIX):
        raise InvalidRequestError(f"controlnet {spec!r}: {filename} is not a .safetensors file")
    if not weights:
        cached = _cached_file(repo_id, filename)
        weights_files = (cached,) if cached is not None else ()
        return ControlNetFiles(spec, SINGLE_FILE, weights_files, repo_id=repo_id, remote_file=filename)
    root = _download(repo_id, [filename])
    return ControlNetFiles(spec, SINGLE_FILE, (root / filename,), repo_id=repo_id)


def _repo_files(repo_id: str) -> list[str]:
    """The repository's file names: from the hub, or from the cached snapshot when it cannot be reached."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return list(HfApi().list_repo_files(repo_id))
    except GatedRepoError:
        raise ModelNotFoundError(f"controlnet repo {repo_id} is gated; log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"controlnet repo {repo_id} does not exist on the hub (or is private)") from None
    except Exception:  # offline, unreachable or refused: whatever the transport raised, try the cache
        pass
    try:
        root = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotFoundError(
            f"controlnet repo {repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it on a connected machine or pass a local file"
        ) from None
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"controlnet repo {repo_id}: {', '.join(patterns)} not in the local Hugging Face cache and the hub "
            "cannot be reached; download it on a connected machine or pass a local file"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"downloading controlnet repo {repo_id} failed: {e}") from None


def _cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def _remote_header(repo_id: str, filename: str) -> dict[str, TensorInfo]:
    """One hub file's header, fetched with a range request (no weights are downloaded)."""
    from huggingface_hub import HfApi

    try:
        meta = HfApi().parse_safetensors_file_metadata(repo_id, filename)
    except Exception as e:  # offline or refused; the file is not cached either
        raise ModelNotFoundError(
            f"controlnet {repo_id}:{filename} is not in the local Hugging Face cache and its header cannot be "
            f"read from the hub ({type(e).__name__})"
        ) from None
    return {key: (info.dtype, tuple(info.shape)) for key, info in meta.tensors.items()}


# ---------------------------------------------------------------------------------------------
# Headers


def read_header(path: Path) -> dict[str, TensorInfo]:
    """dtype and shape of every tensor in a .safetensors file, from its JSON header alone."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", size_bytes)
            if length > MAX_HEADER or length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    if not isinstance(header, Mapping):
        raise CheckpointError(f"{path} is not a readable .safetensors file (its header is not a JSON object)")
    try:
        return {
            k: (str(v["dtype"]), tuple(int(n) for n in v["shape"])) for k, v in header.items() if k != "__metadata__"
        }
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a readable .safetensors file (malformed tensor entries)") from None
