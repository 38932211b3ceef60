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
    from .engine import Engine, GenerateResult
    from .request import GenerateRequest

__all__ = ["Engine", "GenerateRequest", "GenerateResult", "__version__", "load"]


def load(model: str | None = None, *, device: str | None = None, dtype: str | None = None, **config: Any) -> Engine:
    """Load a model once (default Tongyi-MAI/Z-Image-Turbo or $ZTURBO_MODEL) for many generations."""
    from .config import RuntimeConfig
    from .engine import Engine

    return Engine.load(RuntimeConfig.from_env(model=model, device=device, dtype=dtype, **config))


def __getattr__(name: str) -> Any:
    # Heavy modules (torch, diffusers) load on first use, not on `import zturbo`.
    if name in ("Engine", "GenerateResult"):
        from . import engine

        return getattr(engine, name)
    if name == "GenerateRequest":
        from .request import GenerateRequest

        return GenerateRequest
    raise AttributeError(f"module 'zturbo' has no attribute {name!r}")
