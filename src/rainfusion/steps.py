"""What persists across denoising steps for one attention call site (the step, the cached plan),
and what the last call did (its statistics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import PATTERN_NAMES
from .methods import Plan


@dataclass(frozen=True)
class AttentionStats:
    """Statistics of one ``sparse_attention`` call.

    density: float32 [B, H], fraction of (query block, key block) pairs computed (1 when dense).
    patterns: int64 [B, H] v1 head patterns (indices into ``PATTERN_NAMES``), None for v2 / dense.
    predict_seconds: host time spent predicting the mask (ARM or v2 predictor), 0 when reused;
        exact on GPUs only with ``AttentionState(profile=True)`` (which synchronises).
    overhead: compute beyond the kept blocks as a fraction of dense attention (skipped-block
        compensation: kv_blocks / N).
    """

    method: str
    backend: str
    step: int
    dense: bool
    density: torch.Tensor
    patterns: torch.Tensor | None = None
    predict_seconds: float = 0.0
    mask_reused: bool = False
    overhead: float = 0.0

    @property
    def pattern_counts(self) -> dict[str, int]:
        """Heads of each v1 pattern over the batch (reads the device)."""
        if self.patterns is None:
            return {}
        counts = torch.bincount(self.patterns.flatten(), minlength=len(PATTERN_NAMES)).tolist()
        return dict(zip(PATTERN_NAMES, counts))

    @property
    def mean_density(self) -> float:
        return float(self.density.float().mean())


@dataclass
class MaskCache:
    """A step's plan and what it was made for (kept between refreshes)."""

    key: tuple
    sparse_step: int
    plan: Plan


@dataclass
class AttentionState:
    """Per call site (one attention layer) state across the denoising steps of one generation.

    num_steps: total denoising steps, needed for the dense warm-up (None: no warm-up).
    step: index of the current step; the caller advances it (``next_step``).
    profile: synchronise the device around the prediction so ``predict_seconds`` is exact.
    """

    num_steps: int | None = None
    step: int = 0
    profile: bool = False
    stats: AttentionStats | None = field(default=None, init=False)
    cache: MaskCache | None = field(default=None, init=False, repr=False)

    def next_step(self) -> None:
        self.step += 1

    def reset(self) -> None:
        """Start a new generation: step 0, no cached mask, no statistics."""
        self.step, self.stats, self.cache = 0, None, None

    def warmup_steps(self, warmup_fraction: float) -> int:
        """Dense steps at the start: ceil(warmup_fraction * num_steps), 0 without num_steps."""
        if self.num_steps is None:
            return 0
        return math.ceil(warmup_fraction * self.num_steps - 1e-9)
