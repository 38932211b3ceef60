"""Test hooks, in one place: faults that tests inject into an engine's modules, and the one
environment seam the server's worker reads (a sleep after each denoising step, so that tests can
kill or cancel a job mid-run on a model that takes milliseconds per step).

No production code path calls the injectors; the step sleep is 0 unless a test sets
ZTURBO_TEST_STEP_SLEEP in a worker's environment.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

STEP_SLEEP_ENV = "ZTURBO_TEST_STEP_SLEEP"


def step_sleep(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a worker sleeps after each denoising step (ZTURBO_TEST_STEP_SLEEP; 0 when unset)."""
    from .config import env

    raw = env(STEP_SLEEP_ENV, environ)
    try:
        return float(raw or 0)
    except ValueError:
        raise ValueError(f"{STEP_SLEEP_ENV}={raw!r} is not a number of seconds") from None


def inject_oom(module: torch.nn.Module, times: int = 1) -> None:
    """The next `times` forward calls of `module` raise a CUDA out-of-memory error."""
    remaining = [times]

    def hook(_module: torch.nn.Module, _args: object) -> None:
        remaining[0] -= 1
        if remaining[0] <= 0:
            handle.remove()
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by zturbo.testing.inject_oom)")

    handle = module.register_forward_pre_hook(hook)


def inject_nonfinite(module: torch.nn.Module, times: int = 1) -> None:
    """The next `times` forward calls of `module` return NaN-filled outputs."""
    remaining = [times]

    def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
        remaining[0] -= 1
        if remaining[0] <= 0:
            handle.remove()
        return _poison(output)

    handle = module.register_forward_hook(hook)


def _poison(obj: object) -> object:
    """`obj` with every floating-point tensor in it replaced by NaNs."""
    if isinstance(obj, torch.Tensor):
        return torch.full_like(obj, float("nan")) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_poison(o) for o in obj)
    if hasattr(obj, "hidden_states") and hasattr(obj, "__setitem__"):  # transformers ModelOutput
        for key in list(obj.keys()):  # type: ignore[attr-defined]
            obj[key] = _poison(obj[key])  # type: ignore[index]
        return obj
    if hasattr(obj, "sample"):  # diffusers DecoderOutput
        obj.sample = _poison(obj.sample)  # type: ignore[attr-defined]
        return obj
    return obj
