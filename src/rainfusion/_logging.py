"""The library's logger and its log-once helper (fallbacks are logged once, never silent)."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("rainfusion")


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is seen."""
    logger.warning(message)


def log_fp8_fallback(refusal: str) -> None:
    """Log, once per reason, that ``precision="fp8"`` cannot run a call (``refusal``: why) and
    the native precision runs instead."""
    log_once(f"rainfusion: precision='fp8' cannot run here ({refusal}); the native precision runs")
