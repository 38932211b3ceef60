"""Finding a recorded LoRA again: the file a name and a hash from an image's text mean now.

One finder serves `generate --from` (zturbo's metadata, or an A1111 text) and the A1111 routes'
prompt tags (with a pasted infotext's `Lora hashes`). Looking a name up reads the directory's file
names only; files are hashed only to check a recorded hash zturbo can check, and the whole directory
at most once per finder (one request), through the listing it is given: the server passes the one
that hashes a directory a single listing at a time (`ServerLoras.files`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoraError
from .library import SHORT_HASH, LoraFile, LoraLibrary
from .tags import lora_tag_name

# The hashes zturbo records: a file's whole sha256, or its first 10 hex digits (A1111 text and
# Civitai's AutoV2). A1111's own `Lora hashes` are 12 hex digits of a hash of the tensor data alone
# (not of the file), which no file's sha256 starts with.
RECORDED_HASH_LENGTHS = (SHORT_HASH, 64)
_HEX = re.compile("[0-9a-f]+")
SHOWN_HASH = 64  # characters of an unusable recorded hash a note repeats (the text may hold anything)


def usable_hash(digest: str | None) -> str | None:
    """A recorded hash as the sha256 prefix to look for, or None where it is no hash zturbo writes."""
    digest = (digest or "").strip().lower()
    if len(digest) in RECORDED_HASH_LENGTHS and _HEX.fullmatch(digest):
        return digest
    return None


@dataclass(frozen=True)
class Located:
    """Where a recorded LoRA is now."""

    name: str | None  # the name that finds its file; None: nothing does
    note: str | None = None  # what could not be checked, or (with `differs`) why the image will differ
    differs: bool = False  # the file found has another hash than the recorded one


class LoraFinder:
    """Recorded LoRAs -> files of one library, for one request (its listings are built once)."""

    def __init__(self, library: LoraLibrary, listing: Callable[[], list[LoraFile]] | None = None) -> None:
        self.library = library
        self._listing = listing or library.list  # every file with its hash
        self._names: list[str] | None = None
        self._hashed: list[LoraFile] | None = None

    def locate(self, name: str, digest: str | None = None) -> Located:
        """The file by its recorded hash where the named one is missing or has another; else by
        its name (a file name or, where the library allows, a path); else the one file of the
        directory with that A1111 name (no folder, no `.safetensors`)."""
        named = name if self._exists(name) else None
        usable = usable_hash(digest)
        if usable is not None:
            return self._by_hash(name, named, usable)
        found = named or self._alike(name)
        if digest and found is not None:
            shown = digest if len(digest) <= SHOWN_HASH else digest[:SHOWN_HASH] + "..."
            note = (f"the recorded hash {shown!r} is not {SHORT_HASH} or 64 hex digits of a sha256 (A1111's own "
                    f"are 12 digits of its hash of the tensor data alone), so {found} is used unchecked")  # fmt: skip
            return Located(found, note)
        return Located(found)

    def _by_hash(self, name: str, named: str | None, digest: str) -> Located:
        file = self._file(named)
        if file is not None and file.sha256.startswith(digest):
            return Located(named)  # the named file is the recorded one: one file hashed, not the directory
        same = self.library.find_hash(digest, self._hashed_files())
        if same is not None:
            return Located(same.name)
        found = named or self._alike(name)
        file = file or self._file(found)
        if file is None:
            return Located(found)
        note = f"{file.name} has sha256 {file.short_hash}, not the recorded {digest}, and no file has that hash"
        return Located(found, note, differs=True)

    def _exists(self, name: str) -> bool:
        try:
            return self.library.exists(name)
        except ValueError:  # a text no path can hold; `exists` refuses the ones it knows as LoraError
            return False

    def _file(self, name: str | None) -> LoraFile | None:
        if name is None:
            return None
        try:
            return self.library.resolve(name)
        except (LoraError, OSError, ValueError):  # gone since it was listed, or unreadable: submit's check says which
            return None

    def _alike(self, name: str) -> str | None:
        """The one file of the directory A1111 would call `name`; None for none, or for two (in two folders)."""
        if self._names is None:
            self._names = self.library.names()
        wanted = lora_tag_name(name)
        alike = [n for n in self._names if lora_tag_name(n) == wanted]
        return alike[0] if len(alike) == 1 else None

    def _hashed_files(self) -> list[LoraFile]:
        if self._hashed is None:
            try:
                self._hashed = self._listing()
            except LoraError:  # a file that cannot be read: no hash is found; the names still are
                self._hashed = []
        return self._hashed
