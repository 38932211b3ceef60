"""zturbo: a fast, safe runtime for the Z-Image-Turbo text-to-image model.

import zturbo
engine = zturbo.load()                      # or zturbo.load(model="tiny-random")
result = engine.generate("a red fox in the snow", seed=42)
result.save("fox.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .engine import Engine
    from .request import GenerateRequest
    from .result import GenerateResult

__all__ = ["Engine", "GenerateRequest", "GenerateResult", "__version__", "load"]


def load(model: str | None = None, *, device: str | None = None, dtype: str | None = None, **config: Any) -> Engine:
    """Load a model once (default Tongyi-MAI/Z-Image-Turbo or $ZTURBO_MODEL) for many generations.

    The caller's environment variables are left as they are; `vram_budget` (GiB) caps this
    process's share of the CUDA device, as asked.
    """
    from .config import RuntimeConfig
    from .engine import Engine

    return Engine.load(RuntimeConfig.from_env(model=model, device=device, dtype=dtype, **config))


def __getattr__(name: str) -> Any:
    # Heavy modules (torch, diffusers) load on first use, not on `import zturbo`.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "GenerateResult":
        from .result import GenerateResult

        return GenerateResult
    if name == "GenerateRequest":
        from .request import GenerateRequest

        return GenerateRequest
    raise AttributeError(f"module 'zturbo' has no attribute {name!r}")
