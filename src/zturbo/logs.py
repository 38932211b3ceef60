"""Where zturbo's own log lines go (one owner, for the CLI and for Ray's actor processes)."""

from __future__ import annotations

import logging
from typing import TextIO


def log_to(stream: TextIO, prefix: str, level: int) -> None:
    """zturbo's lines at `level` and above to `stream`, each after `prefix`, and nowhere else
    (not to the root logger, which an embedding program or library may have configured)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    logger = logging.getLogger("zturbo")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
