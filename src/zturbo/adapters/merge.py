"""LoRA sets merged into the transformer's weights in place, and the base weights restored exactly.

Merging writes into the tensors the forward already reads (the fused q/k/v and w1/w3 tensors
through their views, a streamed block's host copy, a quantized weight's inner tensors), so compiled
blocks and captured CUDA graphs keep running on the same memory: a new LoRA set costs no
recompilation and no re-capture. Each touched weight's value before any LoRA is saved the first
time a LoRA touches it; every later set is computed from that saved base (base + sum of weighted
deltas, in float32, cast once), and a request without LoRAs writes the base back bit for bit.

Quantized weights are merged before quantizing: the plain base comes from `base_reader` (the
checkpoint), the merged weight is quantized again with the same settings, and restoring copies the
saved quantized tensors back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import LoraError
from .formats import ParsedLora, Patch

log = logging.getLogger("zturbo")

BaseReader = Callable[[str], torch.Tensor]  # "layers.0.attention.to_q.weight" -> its plain weight


class WeightHomes(Protocol):
    """Where a weight's value lives (memory.placement.Placement): the tensors to write, and a
    call after writing so streamed copies are refreshed."""

    def weight_homes(self, module: torch.nn.Module, name: str) -> list[torch.Tensor]: ...

    def weights_changed(self) -> None: ...


@dataclass
class _Saved:
    """One weight before any LoRA: `value` (plain) or `inner` (a quantized tensor's parts), and
    the plain base merging starts from."""

    value: torch.Tensor | None = None
    inner: dict[str, torch.Tensor] = field(default_factory=dict)
    plain: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.value, self.plain, *self.inner.values()]
        unique = {t.data_ptr(): t for t in tensors if t is not None}
        return sum(t.numel() * t.element_size() for t in unique.values())


@dataclass
class SwitchStats:
    """What changing LoRA sets has cost so far (for /metrics and the bench)."""

    switches: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0


class LoraMerger:
    """The transformer's current LoRA set. `apply` makes a set current; `restore` the base."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        device: torch.device,
        homes: WeightHomes | None = None,
        *,
        quantize: str = "none",
        base_reader: BaseReader | None = None,
        scales: dict[int, float] | None = None,
        backup_device: torch.device | None = None,
    ) -> None:
        self.transformer = transformer
        self.device = device
        self.homes = homes
        self.quantize = quantize
        self.base_reader = base_reader
        # id(linear) -> factor its weight was divided by (the float16 guard's scaling)
        self.scales = scales or {}
        self.backup_device = backup_device or torch.device("cpu")
        self.saved: dict[str, _Saved] = {}
        self.merged: set[str] = set()  # targets whose weights differ from the base now
        self.active: Hashable = ()
        self.stats = SwitchStats()

    @property
    def backup_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved.values())

    def apply(self, loras: Sequence[tuple[ParsedLora, float]], key: Hashable) -> bool:
        """Make `loras` (each with its weight) the merged set; `key` identifies the set, and an
        unchanged key changes nothing. Returns whether weights were written."""
        if key == self.active:
            return False
        start = time.perf_counter()
        wanted = _by_target(loras)  # `parse` mapped every patch onto this transformer's linears
        touched = sorted(self.merged | set(wanted))
        with torch.inference_mode():
            for target in touched:  # every base saved before the first write: a refusal changes nothing
                if target not in self.saved:
                    self.saved[target] = self._save(target, self.transformer.get_submodule(target))
            try:
                for target in touched:
                    self._write(target, wanted.get(target, []))
            except BaseException:
                self._back_to_base(touched)  # never a half-applied set
                raise
            finally:
                self._written()
        self.merged = set(wanted)
        self.active = key
        seconds = time.perf_counter() - start
        self.stats.switches += 1
        self.stats.seconds += seconds
        self.stats.last_seconds = seconds
        log.info("LoRA set changed in %.3f s (%d weights written)", seconds, len(touched))
        return True

    def restore(self) -> None:
        """Every weight back to its base, bit for bit."""
        self.apply([], ())

    def forget(self) -> None:
        """Restore, then drop the saved bases: before the weights are cast or moved elsewhere."""
        self.restore()
        self.saved.clear()

    def _back_to_base(self, targets: Sequence[str]) -> None:
        for target in targets:
            self._put_base(self.transformer.get_submodule(target), self.saved[target])
        self.merged = set()
        self.active = ()

    def _written(self) -> None:
        if self.homes is not None:
            self.homes.weights_changed()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one weight --------------------------------------------------------------------------

    def _write(self, target: str, patches: list[tuple[Patch, float]]) -> None:
        linear = self.transformer.get_submodule(target)
        weight = linear.weight
        saved = self.saved[target]
        if not patches:
            self._put_base(linear, saved)
            return
        merged = self._merged(linear, saved, patches)
        if _is_quantized(weight):
            from ..accel.quantize import requantize_

            for home in self._homes(linear):  # a streamed weight's host copy, which refills its slot
                requantize_(home, merged, self.quantize)
            return
        for home in self._homes(linear):
            home.copy_(merged)

    def _merged(self, linear: torch.nn.Module, saved: _Saved, patches: list[tuple[Patch, float]]) -> torch.Tensor:
        assert saved.plain is not None
        total = saved.plain.to(self.device, torch.float32, non_blocking=True, copy=True)
        scale = self.scales.get(id(linear), 1.0)
        for patch, weight in patches:
            total.add_(patch.delta(self.device, torch.float32), alpha=weight / scale)
        return total.to(saved.plain.dtype)

    def _put_base(self, linear: torch.nn.Module, saved: _Saved) -> None:
        if saved.inner:
            for home in self._homes(linear):
                for name, value in saved.inner.items():
                    getattr(home, name).copy_(value)
            return
        assert saved.value is not None
        for home in self._homes(linear):
            home.copy_(saved.value)

    def _save(self, target: str, linear: torch.nn.Module) -> _Saved:
        weight = linear.weight
        if not _is_quantized(weight):
            value = _pinned(self._homes(linear)[0].detach().to(self.backup_device, copy=True))
            return _Saved(value=value, plain=value)
        if self.base_reader is None:
            raise LoraError(
                f"the {self.quantize}-quantized transformer cannot take a LoRA here: merging needs the plain "
                "weights from the checkpoint, and this model was not loaded from one"
            )
        home = self._homes(linear)[0]  # a streamed weight's slot may hold another block's bytes
        names, _ = home.__tensor_flatten__()
        inner = {n: _pinned(getattr(home, n).detach().to(self.backup_device, copy=True)) for n in names}
        # The plain base stays on the host: keeping it on the device would undo what quantizing saved.
        plain = _pinned(self.base_reader(f"{target}.weight").to("cpu"))
        return _Saved(inner=inner, plain=plain)

    def _homes(self, linear: torch.nn.Module) -> list[torch.Tensor]:
        if self.homes is None:
            return [linear.weight.data]
        return self.homes.weight_homes(linear, "weight")


def _by_target(loras: Sequence[tuple[ParsedLora, float]]) -> dict[str, list[tuple[Patch, float]]]:
    out: dict[str, list[tuple[Patch, float]]] = {}
    for parsed, weight in loras:
        for patch in parsed.patches:
            out.setdefault(patch.target, []).append((patch, weight))
    return out


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """Host copies are pinned where CUDA is, so restoring and merging copy at full link speed."""
    if tensor.device.type == "cpu" and torch.cuda.is_available():
        return tensor.pin_memory()
    return tensor


__all__ = ["BaseReader", "LoraMerger", "SwitchStats", "WeightHomes"]
