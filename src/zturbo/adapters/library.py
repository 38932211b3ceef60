"""The LoRA directory: names -> files (never outside it), hashes, and a bounded cache of parsed files."""

from __future__ import annotations

import hashlib
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..config import DEFAULT_LORA_CACHE_BYTES
from ..errors import LoraError
from .formats import ParsedLora, check_header, parse, read_file

SHORT_HASH = 10  # hex digits of the sha256 model sites and A1111's "Lora hashes" show (Civitai AutoV2)
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
SHOWN_NAMES = 10  # available names a "not found" error lists
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LoraFile:
    name: str  # as the request names it: relative to the directory, with its suffix
    path: Path
    size: int
    mtime_ns: int
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH]


def sha256_file(path: Path) -> str:
    """The whole file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LoraLibrary:
    """LoRA files of one directory; with `allow_paths` (the CLI and the Python API), a name may
    also be a path to a file anywhere."""

    def __init__(
        self, directory: Path, *, allow_paths: bool = False, cache_bytes: int = DEFAULT_LORA_CACHE_BYTES
    ) -> None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be 0 or more, not {cache_bytes}")
        self.directory = Path(directory)
        self.allow_paths = allow_paths
        self.cache_bytes = cache_bytes
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._digests: dict[str, tuple[int, int, str]] = {}  # real path -> (size, mtime_ns, sha256)
        self._hashing: dict[str, threading.Lock] = {}  # real path -> the lock one hashing of it holds
        self._parsed: OrderedDict[tuple[object, ...], ParsedLora] = OrderedDict()  # least recently used first
        self._cached_bytes = 0

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached_bytes

    # --- names and files ----------------------------------------------------------------------

    def list(self) -> list[LoraFile]:
        """Every .safetensors file under the directory (subdirectories too), sorted by name, each
        hashed (once per content: `_digest`)."""
        return [self._file(name, path) for name, path in self._paths()]

    def names(self) -> list[str]:
        """The names `list` would give, from the directory listing alone: no file is read or hashed."""
        return [name for name, _ in self._paths()]

    def _paths(self) -> list[tuple[str, Path]]:
        """(name, real path) of the directory's LoRA files; links that lead outside it are left out."""
        if not self.directory.is_dir():
            return []
        root = self.directory.resolve()
        found = []
        for dirpath, _, filenames in os.walk(root, followlinks=False):
            for filename in filenames:
                path = Path(dirpath, filename)
                if not filename.lower().endswith(SUFFIX) or not path.is_file():
                    continue
                real = path.resolve()
                if real.is_relative_to(root):
                    found.append((path.relative_to(root).as_posix(), real))
        return sorted(found)

    def _file(self, name: str, path: Path) -> LoraFile:
        try:
            stat = path.stat()
        except OSError as err:
            raise LoraError(f"LoRA file {name} cannot be read: {err.strerror or err}") from err
        return LoraFile(name, path, stat.st_size, stat.st_mtime_ns, self._digest(path, stat.st_size, stat.st_mtime_ns))

    def _digest(self, path: Path, size: int, mtime_ns: int) -> str:
        """sha256 of `path`, hashed again only when its size or modification time changed. Threads
        asking for the same path wait for one hashing of it; different paths are hashed in parallel."""
        key = str(path)
        with self._lock:
            gate = self._hashing.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                known = self._digests.get(key)
            if known is not None and known[:2] == (size, mtime_ns):
                return known[2]
            try:
                digest = sha256_file(path)
            except OSError as err:
                raise LoraError(f"LoRA file {path.name} cannot be read: {err.strerror or err}") from err
            with self._lock:
                self._digests[key] = (size, mtime_ns, digest)
        return digest

    def resolve(self, name: str) -> LoraFile:
        """The file `name` means: a name in the directory (".safetensors" optional), or with
        `allow_paths` an existing file anywhere. Never a file outside the directory otherwise."""
        found = self._lookup(name)
        return self._file(*found) if found is not None else self._not_found(name)

    def exists(self, name: str) -> bool:
        """Whether `resolve` would find a file for `name`, found by its name alone (nothing is hashed)."""
        try:
            return self._lookup(name) is not None
        except LoraError:  # a name the directory does not allow
            return False

    def _lookup(self, name: str) -> tuple[str, Path] | None:
        """(name, real path) of the file `name` means, None where there is none; raises LoraError
        for a name that may not name a file. Reads no file."""
        _check_characters(name)
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise LoraError(
                f"LoRA {name!r}: only .safetensors files are loaded (pickled .pt, .ckpt and .bin files can run "
                "code when read; convert it to .safetensors)"
            )
        reason = _directory_name_problem(name)
        try:
            found = self._in_directory(name) if reason is None else None
            if found is None and self.allow_paths and Path(name).is_file():
                found = (name, Path(name).resolve())
        except OSError as err:  # e.g. a name longer than the file system allows
            raise LoraError(f"LoRA {name!r} cannot be read: {err.strerror or err}") from None
        if found is None and reason is not None and not self.allow_paths:
            raise LoraError(f"LoRA name {name!r} is not allowed: {reason}; name a file in the LoRA directory")
        return found

    def _in_directory(self, name: str) -> tuple[str, Path] | None:
        """(name, real path) of the file `name` names in the directory, None if there is none;
        refuses a name whose real path (links followed) leaves the directory."""
        if not self.directory.is_dir():
            return None
        relative = name if name.lower().endswith(SUFFIX) else name + SUFFIX
        root = self.directory.resolve()
        real = (root / relative).resolve()
        if not real.is_relative_to(root):
            if self.allow_paths:
                return None  # the caller may still accept it as a path
            raise LoraError(f"LoRA name {name!r} is not allowed: it leads outside the LoRA directory")
        if not real.is_file():
            return None
        return PurePosixPath(relative).as_posix(), real

    def _not_found(self, name: str) -> LoraFile:
        names = self.names()
        if not names:
            available = "the LoRA directory has no .safetensors files"
        else:
            more = f" (and {len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
            available = "available: " + ", ".join(names[:SHOWN_NAMES]) + more
        elsewhere = " and no file at that path" if self.allow_paths else ""
        raise LoraError(f"no LoRA named {name!r} in the LoRA directory{elsewhere}; {available}")

    def find_hash(self, digest: str, files: Iterable[LoraFile] | None = None) -> LoraFile | None:
        """The file whose sha256 starts with `digest` (64 hex digits, or at least the short 10), among
        `files` (a listing already made) or the directory's."""
        digest = digest.strip().lower()
        if not SHORT_HASH <= len(digest) <= 64 or any(c not in "0123456789abcdef" for c in digest):
            raise LoraError(f"LoRA hash {digest!r} is not {SHORT_HASH} to 64 hexadecimal digits of a sha256")
        return next((f for f in (self.list() if files is None else files) if f.sha256.startswith(digest)), None)

    # --- parsed files -------------------------------------------------------------------------

    def load(self, file: LoraFile, targets: Mapping[str, tuple[int, int]]) -> ParsedLora:
        """`file` parsed onto `targets`, from the cache when the file is unchanged since it was parsed."""
        _check_unchanged(file)
        key = (str(file.path), file.size, file.mtime_ns, frozenset(targets.items()))
        with self._lock:
            if key in self._parsed:
                self.hits += 1
                self._parsed.move_to_end(key)
                return self._parsed[key]
            self.misses += 1
        # Read and parse outside the lock: other threads' cached LoRAs need not wait for this one.
        tensors, metadata = read_file(file.path, lambda heads, meta: check_header(heads, meta, targets, name=file.name))
        # Changed while it was read: what was read may not be what file.sha256 (the metadata's) hashed.
        _check_unchanged(file)
        parsed = parse(tensors, metadata, targets, name=file.name)
        self._remember(key, parsed)
        return parsed

    def _remember(self, key: tuple[object, ...], parsed: ParsedLora) -> None:
        size = parsed.nbytes
        with self._lock:
            if size > self.cache_bytes or key in self._parsed:
                return
            self._parsed[key] = parsed
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, evicted = self._parsed.popitem(last=False)
                self._cached_bytes -= evicted.nbytes


def _check_unchanged(file: LoraFile) -> None:
    """Refuse `file` if its size or modification time differ from when it was resolved (and hashed)."""
    try:
        stat = file.path.stat()
    except OSError as err:
        raise LoraError(f"LoRA file {file.name} cannot be read: {err.strerror or err}") from err
    if (stat.st_size, stat.st_mtime_ns) != (file.size, file.mtime_ns):
        raise LoraError(f"LoRA file {file.name} changed on disk since it was resolved; resolve it again")


def _check_characters(name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise LoraError(f"a LoRA name must be a non-empty string, not {name!r}")
    # Cc: C0 and C1 controls (U+0085 ends a line for str.splitlines); Zl, Zp: U+2028, U+2029.
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise LoraError(f"LoRA name {name!r} holds the control character {bad!r}; names are printable text")
    # A lone surrogate (a JSON "\ud800"): no file system encodes it, so a path made of it raises
    # UnicodeEncodeError where an OSError is expected.
    if any("\ud800" <= c <= "\udfff" for c in name):
        raise LoraError(f"LoRA name {name!r} holds an unpaired surrogate; names are valid Unicode text")


def _directory_name_problem(name: str) -> str | None:
    """Why `name` cannot name a file inside the directory, or None when it can."""
    if "\\" in name:
        return "it holds a backslash (separate folders with '/')"
    if name.startswith("/"):
        return "it is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "it holds a '..' component"
    return None
