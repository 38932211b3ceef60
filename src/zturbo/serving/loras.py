"""The server's LoRA directory as the API process sees it: the names a job gives, checked at submit,
and the listing of GET /v1/loras.

The workers merge LoRAs with their engines' own libraries of the same directory. This process only
resolves names (never paths: the library is made with `allow_paths=False`) and parses each file once
against the served model's linears, so that a bad name or a LoRA made for another model is a 400 at
submit rather than a failed job. It keeps no parsed tensors: only each file's summary, or why it was
refused, by sha256 (a file changed in place has a new hash and is read again).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..adapters.library import LoraFile, LoraLibrary
from ..adapters.recorded import LoraFinder
from ..errors import LoraError
from ..request import LoraRef

Targets = Mapping[str, tuple[int, int]]
CHECKED_KEPT = 1024  # files whose check outcome is remembered; the least recently used goes first


class LoraFieldError(LoraError):
    """A LoRA of the request that cannot be used; `field` is its place in the body (`loras.0`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def model_targets(transformer_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The served transformer's linears and their weight shapes, built on the meta device from its
    config (no weights, well under a second once diffusers is imported)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from ..adapters.formats import linear_targets

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(dict(transformer_config))
    return linear_targets(transformer)


class ServerLoras:
    """Names -> files of one directory, and whether each file fits the served model."""

    def __init__(self, directory: Path, targets: Callable[[], Targets]) -> None:
        self.directory = directory
        self.library = LoraLibrary(directory, allow_paths=False, cache_bytes=0)
        self._make_targets = targets
        self._targets: Targets | None = None
        self._checked: collections.OrderedDict[str, dict[str, Any] | str] = collections.OrderedDict()
        self._lock = threading.Lock()  # guards `_checked` and `_targets`; the library has its own
        # One file parsed at a time, and one listing at a time: a parse holds the whole file in
        # memory, and concurrent listings (every page load of the web UI lists) would otherwise each
        # hash and parse every new file side by side; a listing that waited finds them known.
        self._parsing = threading.Lock()
        self._listing = threading.Lock()

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Raise LoraFieldError (400, naming `loras.<i>`) for the first LoRA that cannot be used:
        a name outside the directory, a missing file, a file another name of the list already
        gives (`a`, `a.safetensors` and `./a` are one file: merged twice, its weights would pass
        the weight limit), a file that does not fit the model."""
        seen: dict[Path, int] = {}
        for i, ref in enumerate(refs):
            where = f"loras.{i}"
            try:
                file = self._resolve(ref.name)
            except LoraError as e:
                raise LoraFieldError(where, f"{where}: {e}") from None
            if file.path in seen:
                first = seen[file.path]
                raise LoraFieldError(
                    where,
                    f"{where}: LoRA {ref.name!r} is the file loras.{first} ({refs[first].name!r}) names; "
                    "give each file once with its weight",
                )
            seen[file.path] = i
            outcome = self._outcome(file)
            if isinstance(outcome, str):
                raise LoraFieldError(where, f"{where}: {outcome}")

    def listing(self) -> list[dict[str, Any]]:
        """Every LoRA file of the directory: name, size, hashes, and its summary (format, ranks,
        targets) or why the server refuses it."""
        with self._listing:
            return [self._item(file) for file in self.library.list()]

    def files(self) -> list[LoraFile]:
        """Every LoRA file of the directory with its hash, listed under the same lock as `listing`:
        concurrent requests never hash the directory side by side, and one that waited finds the
        hashes known (the library keeps them while a file's size and time stay the same)."""
        with self._listing:
            return self.library.list()

    def finder(self) -> LoraFinder:
        """A finder of recorded LoRAs (by name, by hash) for one request, hashing through `files`."""
        return LoraFinder(self.library, self.files)

    def _item(self, file: LoraFile) -> dict[str, Any]:
        outcome = self._outcome(file)
        usable = not isinstance(outcome, str)
        return {
            "name": file.name,
            "size": file.size,
            "modified": file.mtime_ns / 1e9,
            "sha256": file.sha256,
            "short_hash": file.short_hash,
            "usable": usable,
            "summary": outcome if usable else None,
            "error": None if usable else outcome,
        }

    def _resolve(self, name: str) -> LoraFile:
        try:
            return self.library.resolve(name)
        except OSError as e:  # e.g. a name too long for the file system
            raise LoraError(f"LoRA {name!r} cannot be read: {e.strerror or e}") from None

    def _outcome(self, file: LoraFile) -> dict[str, Any] | str:
        """The file's summary, or the message refusing it; parsed once per content."""
        known = self._known(file.sha256)
        if known is not None:
            return known
        with self._parsing:
            known = self._known(file.sha256)  # parsed by another thread while this one waited
            if known is not None:
                return known
            outcome: dict[str, Any] | str
            try:
                outcome = self.library.load(file, self._model_targets()).summary()
            except LoraError as e:
                outcome = str(e)
            except OSError as e:
                outcome = f"LoRA {file.name!r} cannot be read: {e.strerror or e}"
            with self._lock:
                self._checked[file.sha256] = outcome
                while len(self._checked) > CHECKED_KEPT:
                    self._checked.popitem(last=False)
        return outcome

    def _known(self, sha256: str) -> dict[str, Any] | str | None:
        with self._lock:
            if sha256 in self._checked:
                self._checked.move_to_end(sha256)
                return self._checked[sha256]
        return None

    def _model_targets(self) -> Targets:
        with self._lock:
            if self._targets is None:
                self._targets = self._make_targets()
            return self._targets
