"""Compiled artifacts kept across processes, so that a restarted engine skips Inductor's work.

torch's portable cache ("mega cache": `torch.compiler.save_cache_artifacts` /
`load_cache_artifacts`) serialises what the compiled graphs of a process produced: Inductor's
FX graphs (with their Triton kernels on CUDA), AOTAutograd's entries, the automatic-dynamic
profiles and autotuning results. Loading it fills Inductor's local caches, so the same graphs
traced again (Dynamo still traces: the regional blocks with their dynamic token counts take a
few seconds) are looked up instead of compiled. It suits regional compilation with dynamic
shapes, where an AOTInductor package (one static export per graph) does not.

One file per key in the compile-cache directory. The key holds everything a stale artifact
could come from (package versions, the GPU, dtypes, quantization, the compile options), so a
change never loads an old file; torch checks its own keys again on lookup. The file carries its
key and a checksum and is written atomically; one that is unreadable, damaged or for another key
is logged and ignored, and the engine compiles as if there were none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..version import __version__

log = logging.getLogger("zturbo")

MAGIC = b"zturbo compile cache 1\n"
HIT, MISS, OFF = "hit", "miss", "off"
# Counters (torch._dynamo.utils.counters) that say a graph was compiled rather than looked up.
_MISSES = (("inductor", "fxgraph_cache_miss"), ("aot_autograd", "autograd_cache_miss"))
_COUNTED = (
    *_MISSES,
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_bypass"),
)
_PACKAGES = ("diffusers", "transformers", "triton", "torchao")


def cache_key(device: torch.device, dtypes: dict[str, torch.dtype], options: Any) -> dict[str, str]:
    """What compiled code depends on beyond the graphs themselves."""
    key = {
        "zturbo": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device.type,
        "dtypes": ",".join(f"{name}={dtype}" for name, dtype in sorted(dtypes.items())),
        "options": repr(options),  # AccelOptions: quantization, fusion, kernels, backend
    }
    for package in _PACKAGES:
        try:
            key[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            key[package] = "-"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        key |= {"gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}", "cuda": torch.version.cuda}
    return {k: str(v) for k, v in key.items()}


def compile_counts() -> dict[str, int]:
    """This process's cache lookups so far: hits, misses (graphs compiled) and bypasses."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": int(counters[group][name]) for group, name in _COUNTED}


@dataclass
class CompileCache:
    """The artifact file of one key; `status` says whether this process reused it."""

    path: Path
    key: dict[str, str]
    status: str = MISS  # hit: loaded and nothing compiled anew; miss: otherwise
    loaded: int = 0  # artifacts loaded from the file
    saved_misses: int = 0  # misses already written to the file
    written: bool = False  # this process wrote the file
    kept: bytes = b""  # the artifacts restored from the file, written again with this process's own
    counts: dict[str, int] = field(default_factory=dict)  # compile_counts() when restored

    @classmethod
    def open(cls, root: Path, key: dict[str, str]) -> CompileCache:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cls(Path(root).expanduser() / f"{key['device']}-{digest}.bin", key)

    def restore(self) -> None:
        """Load the file into torch's caches, before anything compiles; a missing file is a miss,
        a bad one a warning and a miss."""
        self.counts = compile_counts()
        self.saved_misses = _misses(self.counts)
        try:
            payload = self._read()
        except FileNotFoundError:
            log.info("compile cache: nothing saved yet for this setup (%s); compiling", self.path.name)
            return
        except (OSError, ValueError) as e:
            log.warning("compile cache: ignoring %s (%s); compiling", self.path, e)
            return
        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as e:  # e.g. Inductor's directory not writable: compile instead
            log.warning("compile cache: could not load %s (%s: %s); compiling", self.path, type(e).__name__, e)
            return
        if info is None:  # torch logs why it could not read its own format
            log.warning("compile cache: torch could not read %s; compiling", self.path)
            return
        self.loaded = sum(len(keys) for keys in info.artifacts.values())
        self.kept = payload
        self.status = HIT
        log.info("compile cache: %d artifacts loaded from %s", self.loaded, self.path)

    def persist(self) -> bool:
        """After compiling: write what this process's graphs produced, when any was compiled anew
        (a file written by an earlier process and only looked up stays as it is)."""
        misses = _misses(compile_counts())
        fresh = misses > self.saved_misses
        if fresh:
            self.status = MISS
        if not fresh and (self.status == HIT or self.written):
            return False
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        payload = merged(self.kept, saved[0])
        header = {"key": self.key, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        try:
            _write_atomic(self.path, MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
        except OSError as e:
            log.warning("compile cache: could not write %s (%s); the next start compiles again", self.path, e)
            return False
        self.saved_misses, self.written = misses, True
        log.info("compile cache: %d bytes of compiled artifacts saved to %s", len(payload), self.path)
        return True

    def describe(self) -> dict[str, Any]:
        now = compile_counts()
        counts = {name: now[name] - self.counts.get(name, 0) for name in now}
        return {"status": self.status, "path": str(self.path), "loaded": self.loaded, "lookups": counts}

    def _read(self) -> bytes:
        data = self.path.read_bytes()
        if not data.startswith(MAGIC):
            raise ValueError("not a zturbo compile-cache file")
        line, _, payload = data[len(MAGIC) :].partition(b"\n")
        try:
            header = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("damaged header") from None
        if not isinstance(header, dict) or header.get("key") != self.key:
            raise ValueError("written for another setup")
        if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError("truncated or damaged: its checksum does not match")
        return payload


def merged(*payloads: bytes) -> bytes:
    """The artifacts of `payloads` (torch's portable format) as one, each artifact once and each
    kind of artifact in one group. torch's format is a list of (kind, artifacts) groups, and a
    process that saves twice appends a second group of each kind, while `load_cache_artifacts`
    keeps only the last group of each kind (it makes a dict of them): a file saved again after
    more compiling would load only what the last save added. And a process saves only what it
    compiled itself, not what it loaded, so the file's earlier artifacts go in again here. Where
    this torch's format is not the one known here, the last payload is kept as it is."""
    try:
        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache, _serialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        CacheArtifactManager._ensure_cache_artifacts_registered()
        groups: dict[str, dict[str, Any]] = {}
        for payload in filter(None, payloads):
            for kind, artifacts in AppendingByteSerializer.to_list(payload, deserialize_fn=_deserialize_single_cache):
                groups.setdefault(kind, {}).update((artifact.key, artifact) for artifact in artifacts)
        out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        out.extend((kind, list(by_key.values())) for kind, by_key in groups.items())
        return out.to_bytes()
    except Exception as e:  # private torch internals: any change there keeps torch's own bytes
        log.warning("compile cache: kept torch's payload as saved (%s: %s)", type(e).__name__, e)
        return payloads[-1]


def open_cache(
    root: Path | None, device: torch.device, dtypes: dict[str, torch.dtype], options: Any
) -> CompileCache | None:
    """The cache for an engine about to compile with `options`; None when there is nothing to keep
    (no directory, nothing compiled, or a backend other than Inductor)."""
    if root is None or not options.compile or options.backend != "inductor":
        return None
    return CompileCache.open(root, cache_key(device, dtypes, options))


def _misses(counts: dict[str, int]) -> int:
    return sum(counts[f"{group}.{name}"] for group, name in _MISSES)


def _write_atomic(path: Path, data: bytes) -> None:
    """A whole file or none: written beside, synced, renamed over, the directory synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
