"""ControlNets for Z-Image: alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union files, run with
diffusers' ZImageControlNetModel.

  files.py      what a name means (file, directory, hub repo, REPO:FILE) and the files' headers
  structure.py  the config a file needs, its version, and the checks that it fits the transformer
  model.py      ControlNet: the loaded model with its identity for the metadata

`loader.load_controlnet` builds one; `controlnet_in_dim` tells a request validator the control
input's width without loading anything.
"""

from __future__ import annotations

from .files import ControlNetFiles, resolve_controlnet
from .model import ControlNet, own_modules, own_parameters
from .structure import in_dim, require_config


def controlnet_in_dim(spec: str) -> int:
    """The control input's channels (16, or 33 for ControlNets with the inpaint input) of the
    ControlNet `spec` names, from its config or its file's header; no weights are read (a hub
    file's header is read from the hub when the file is not cached)."""
    files = resolve_controlnet(spec, weights=False)
    if files.config is not None:
        require_config(files.config, spec)
        return int(files.config["control_in_dim"])
    return in_dim(files.header(), spec)


__all__ = [
    "ControlNet",
    "ControlNetFiles",
    "controlnet_in_dim",
    "own_modules",
    "own_parameters",
    "resolve_controlnet",
]
