"""The loaded ControlNet: diffusers' ZImageControlNetModel sharing the transformer's embedders and
refiners, with what identifies it in an image's metadata."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHUNK = 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The ControlNet's own modules. Everything else it holds after `from_transformer` (timestep and
# caption embedders, patch embedder, noise and context refiners, pad tokens) is the transformer's.
OWN_MODULES = ("control_layers", "control_noise_refiner", "control_all_x_embedder")


@dataclass
class ControlNet:
    """A ZImageControlNetModel loaded for one transformer (`model` is `from_transformer`-ed)."""

    model: torch.nn.Module
    name: str  # as asked: a file, a directory or a hub repo id (REPO:FILE)
    version: str  # union-1.0, union-2.0, union-2.1, union-2.1-lite, tile-2.1, ... (control.structure.version)
    sha256: str  # of the weights file; of the files' names and hashes where there are several
    files: tuple[Path, ...] = ()

    @property
    def control_in_dim(self) -> int:
        return int(self.model.config.control_in_dim)

    @property
    def control_layers(self) -> list[int]:
        """The transformer layers the control layers' outputs are added to."""
        return list(self.model.config.control_layers_places)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "control_in_dim": self.control_in_dim,
            "control_layers": self.control_layers,
        }


def own_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of what the ControlNet owns; moving, counting or streaming a ControlNet
    touches these only, never the transformer's modules it shares."""
    for name in OWN_MODULES:
        module = getattr(model, name, None)
        if module is not None:
            yield name, module


def own_parameters(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for _, module in own_modules(model):
        yield from module.parameters()


def weights_sha256(files: Sequence[Path]) -> str:
    """The weights' sha256: one file's own, or for shards the sha256 of their names and hashes."""
    digests = [(path.name, file_sha256(path)) for path in files]
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in digests).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's sha256: a hub blob's name where the file links to one (the hub names blobs by
    their sha256), else hashed, once per (path, size, modification time)."""
    real = path.resolve()
    if path.is_symlink() and _SHA256.match(real.name):
        return real.name
    stat = real.stat()
    return _hashed(str(real), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    """The whole file's sha256; the size and time in the key make a changed file hash again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
