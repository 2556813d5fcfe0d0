"""Frozen, validated configurations of the two methods, and the one registry of named methods
(``METHODS``: the names the CLI, the benchmarks and the demo share)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._validation import check_int, check_precision
from .mask import check_block_size

Permutation = Literal["window3d", "tile2d", "none"]
Selection = Literal["topk", "topp", "adaptive"]
Precision = Literal["native", "fp8"]
# v1's head patterns: the values of ``AttentionStats.patterns`` and of the ARM's verdicts
SPATIAL, TEMPORAL, TEXTURAL = 0, 1, 2
PATTERN_NAMES = ("spatial", "temporal", "textural")


def _check_fraction(name: str, value: object, *, low: float, high: float, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok or math.isnan(value):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_common(config: "RainFusionConfig | RainFusion2Config") -> None:
    _check_fraction("sparsity", config.sparsity, low=0.0, high=1.0, high_open=True)
    check_block_size(config.block_size)
    _check_fraction("warmup_fraction", config.warmup_fraction, low=0.0, high=1.0, high_open=False)
    check_int("refresh_interval", config.refresh_interval, 1)
    if not isinstance(config.sink_first_frame, bool):
        raise TypeError(f"sink_first_frame must be a bool, got {type(config.sink_first_frame).__name__}")
    if not isinstance(config.compensate, bool):
        raise TypeError(f"compensate must be a bool, got {type(config.compensate).__name__}")
    check_precision(config.precision)


@dataclass(frozen=True)
class RainFusionConfig:
    """RainFusion (v1): per-head spatial / temporal / textural patterns chosen online by the ARM.

    sparsity: fraction of video-video attention skipped by spatial and temporal heads (their
        bands keep ``1 - sparsity`` of the frames / spatial positions).
    alpha: recall a band must reach on the ARM's samples for its pattern to be chosen.
    tau: textural heads keep the 1/tau checkerboard subset of video keys.
    adaptive_bandwidth: RainFusion+: per head, the smallest of ``bandwidths`` (fractions kept)
        whose sampled recall reaches ``adaptive_recall``; ``1 - sparsity`` if none does.
    arm_queries: queries sampled per ARM sample (local and global).
    warmup_fraction: leading fraction of denoising steps computed densely.
    sink_first_frame: first-frame rows and columns are always computed densely.
    refresh_interval: re-run the ARM every this many sparse steps (patterns cached in between).
    textural: heads that are neither spatially nor temporally local keep the 1/tau checkerboard
        subset of keys; with False (an ablation) they take whichever band has the higher recall.
    compensate: add the skipped key blocks back as an estimate from their block means, merged
        exactly through the log-sum-exp (``compensation``; costs 1 / block_size of dense attention).
    precision: "native" (products in the inputs' dtype) or "fp8" (the sparse steps' block-sparse
        attention in 8 bits: int8 q, k with per-block scales and e4m3 P, v, v scaled per channel,
        on Hopper; elsewhere native, logged once; the dense warm-up stays native).
    """

    sparsity: float = 0.5
    alpha: float = 0.9
    tau: int = 2
    adaptive_bandwidth: bool = False
    bandwidths: tuple[float, ...] = (0.5, 0.25, 0.125)
    adaptive_recall: float = 0.9
    arm_queries: int = 256
    block_size: int = 128
    warmup_fraction: float = 0.1
    sink_first_frame: bool = True
    refresh_interval: int = 1
    textural: bool = True
    compensate: bool = False
    precision: Precision = "native"

    def __post_init__(self) -> None:
        _check_common(self)
        if not isinstance(self.textural, bool):
            raise TypeError(f"textural must be a bool, got {type(self.textural).__name__}")
        _check_fraction("alpha", self.alpha, low=0.0, high=1.0, high_open=False)
        _check_fraction("adaptive_recall", self.adaptive_recall, low=0.0, high=1.0, high_open=False)
        check_int("tau", self.tau, 1)
        check_int("arm_queries", self.arm_queries, 1)
        if not isinstance(self.bandwidths, tuple) or not self.bandwidths:
            raise TypeError(f"bandwidths must be a non-empty tuple of floats, got {self.bandwidths!r}")
        for b in self.bandwidths:
            _check_fraction("bandwidths[i]", b, low=0.0, high=1.0, high_open=False)
            if b == 0:
                raise ValueError("bandwidths must be > 0, got 0")

    @classmethod
    def video(cls, **overrides: object) -> "RainFusionConfig":
        """Video preset: the paper's defaults (sparsity 0.5, first 10% of steps dense)."""
        return cls(**overrides)

    @classmethod
    def image(cls, **overrides: object) -> "RainFusionConfig":
        """Image preset: one frame, so no first-frame sink."""
        return cls(**{"sink_first_frame": False, **overrides})

    @classmethod
    def rainfusion_plus(cls, **overrides: object) -> "RainFusionConfig":
        """RainFusion+: adaptive per-head bandwidth."""
        return cls(**{"adaptive_bandwidth": True, **overrides})


@dataclass(frozen=True)
class RainFusion2Config:
    """RainFusion2.0: block-mean top-N (or top-p) block selection on permuted tokens.

    sparsity: nominal fraction of key blocks skipped per query block; each query block keeps
        ceil(kv_blocks * (1 - sparsity)) blocks on top of its forced ones (text, first-frame
        sink, diagonal), or, with ``forced_in_budget``, that many including them.
    permutation: "window3d" (2x8x8 spatiotemporal windows), "tile2d" (8x8 tiles per frame) or
        "none" (raster order) applied to the video tokens so that a block is a compact region.
    selection: "topk" keeps the top-N blocks; "topp" keeps the fewest blocks whose pooled
        probability reaches ``top_p``, never more than top-N; "adaptive" spends the same budget
        unevenly across heads: the blocks kept are those of the highest pooled probability over
        all heads and query blocks of a batch item, as many as top-N keeps on average, each
        (head, query block) keeping between ``adaptive_range`` times N (a concentrated head
        keeps its few likely blocks, a diffuse head more).
    force_diagonal: each query block always visits its own key block.
    forced_in_budget: the forced blocks count inside the top-N budget, so the realized density
        of the sparse rows follows 1 - sparsity (at 720p the sink alone is ~5% of the key
        blocks); by default they come on top, which keeps N blocks for the video content even
        where the forced blocks are many (small sizes).
    compensate: add the skipped key blocks back as an estimate from their block means, merged
        exactly through the log-sum-exp (``compensation``; costs 1 / block_size of dense attention).
    precision: "native" (products in the inputs' dtype) or "fp8" (the sparse steps' block-sparse
        attention in 8 bits: int8 q, k with per-block scales and e4m3 P, v, v scaled per channel,
        on Hopper; elsewhere native, logged once; the dense warm-up stays native).
    """

    sparsity: float = 0.8
    block_size: int = 128
    permutation: Permutation = "window3d"
    selection: Selection = "topk"
    top_p: float = 0.9
    force_diagonal: bool = True
    forced_in_budget: bool = False
    warmup_fraction: float = 0.3
    sink_first_frame: bool = True
    refresh_interval: int = 1
    compensate: bool = False
    adaptive_range: tuple[float, float] = (0.5, 2.0)
    precision: Precision = "native"

    def __post_init__(self) -> None:
        _check_common(self)
        if (not isinstance(self.adaptive_range, tuple) or len(self.adaptive_range) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.adaptive_range)
                or not 0 <= self.adaptive_range[0] <= 1 <= self.adaptive_range[1]):
            raise ValueError(f"adaptive_range must be (floor, ceiling) with 0 <= floor <= 1 <= ceiling, got "
                             f"{self.adaptive_range!r}")
        if self.permutation not in ("window3d", "tile2d", "none"):
            raise ValueError(
                f"permutation must be 'window3d', 'tile2d' or 'none', got {self.permutation!r}"
            )
        if not isinstance(self.forced_in_budget, bool):
            raise TypeError(f"forced_in_budget must be a bool, got {type(self.forced_in_budget).__name__}")
        if self.selection not in ("topk", "topp", "adaptive"):
            raise ValueError(f"selection must be 'topk', 'topp' or 'adaptive', got {self.selection!r}")
        _check_fraction("top_p", self.top_p, low=0.0, high=1.0, high_open=False)

    @classmethod
    def video(cls, **overrides: object) -> "RainFusion2Config":
        """Video preset: sparsity 0.8, 2x8x8 spatiotemporal windows."""
        return cls(**overrides)

    @classmethod
    def image(cls, **overrides: object) -> "RainFusion2Config":
        """Image preset: sparsity 0.6, 8x8 tiles, no first-frame sink (one frame)."""
        return cls(**{"sparsity": 0.6, "permutation": "tile2d", "sink_first_frame": False, **overrides})


AnyConfig = RainFusionConfig | RainFusion2Config


# name -> (config class, the fields that make the variant); ``method_config`` builds one
METHODS: dict[str, tuple[type, dict]] = {
    "rainfusion": (RainFusionConfig, {}),
    "rainfusion+": (RainFusionConfig, {"adaptive_bandwidth": True}),
    "rainfusion-no-textural": (RainFusionConfig, {"textural": False}),
    "rainfusion2": (RainFusion2Config, {}),
    "rainfusion2-tile2d": (RainFusion2Config, {"permutation": "tile2d"}),
    "rainfusion2-none": (RainFusion2Config, {"permutation": "none"}),
    "rainfusion2-topp": (RainFusion2Config, {"selection": "topp"}),
    "rainfusion2-no-sink": (RainFusion2Config, {"sink_first_frame": False}),
    "rainfusion2-in-budget": (RainFusion2Config, {"forced_in_budget": True}),
    "rainfusion2-compensated": (RainFusion2Config, {"compensate": True}),
    "rainfusion2-adaptive": (RainFusion2Config, {"selection": "adaptive"}),
    "rainfusion2-adaptive-compensated": (RainFusion2Config, {"selection": "adaptive", "compensate": True}),
    "rainfusion2-fp8": (RainFusion2Config, {"precision": "fp8"}),
}


def method_config(name: str, **overrides: object) -> AnyConfig:
    """The config of a named method (``METHODS``), with ``overrides`` on top (None keeps a field's
    default): ``method_config("rainfusion2", sparsity=0.9)``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    cls, fields = METHODS[name]
    return cls(**fields, **{k: v for k, v in overrides.items() if v is not None})
