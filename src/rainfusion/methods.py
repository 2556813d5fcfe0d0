"""The per-method part of sparse attention: from q, k and the layout to a plan.

A ``Plan`` is what one sparse step needs: the block mask (on permuted tokens), the token order it
was built on and its inverse, and v1's head patterns. Everything after the plan (gathering,
the block-sparse kernel, un-permuting, the dense warm-up, the mask cache) is the same for both
methods, in ``attention``.

- RainFusion (v1): the ARM classifies every head on the original tokens; each head's mask is
  its pattern's band, in that pattern's token order (one order per head).
- RainFusion2.0: one spatiotemporal order for all heads; block means of the permuted q and k
  (read through the order, without a permuted copy), pooled softmax, top-N / top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arm import arm_fractions, recognise_heads
from .backends import block_means, predict_from_means
from .config import AnyConfig, RainFusion2Config, RainFusionConfig
from .head_patterns import head_pattern_table
from .layout import VideoLayout
from .mask import BlockSparseMask
from .permutation import mark_permutation, token_order
from .predictor import token_mean


@dataclass(frozen=True)
class Plan:
    """mask: BlockSparseMask [B, H] on permuted tokens; order / inverse: int64 [N] (one order for
    all heads) or [B, H, N]; patterns: int64 [B, H] v1 head patterns, None for v2; key_mean:
    float32 [B, H, D], the keys' mean from v2's key block means with ``precision="fp8"`` (the
    pre-pass centres the keys on it instead of reading them once more for it), else None."""

    mask: BlockSparseMask
    order: torch.Tensor
    inverse: torch.Tensor
    patterns: torch.Tensor | None = None
    key_mean: torch.Tensor | None = None

    def __post_init__(self) -> None:  # a plan's order holds each token once, by construction
        mark_permutation(self.order)


def plan_attention(query: torch.Tensor, key: torch.Tensor, layout: VideoLayout, config: AnyConfig,
                   scale: float) -> Plan:
    """The plan of one sparse step for query/key [B, H, N, D] in the original token order (no
    host synchronisation; no autograd graph, the plan being a constant of the attention)."""
    with torch.no_grad():
        if isinstance(config, RainFusionConfig):
            return _plan_v1(query, key, layout, config, scale)
        return _plan_v2(query, key, layout, config, scale)


def _plan_v1(query: torch.Tensor, key: torch.Tensor, layout: VideoLayout, config: RainFusionConfig,
             scale: float) -> Plan:
    table = head_pattern_table(layout, arm_fractions(config), config.tau, config.sink_first_frame,
                               config.block_size, query.device)
    heads = recognise_heads(query, key, layout, config, scale=scale)
    return Plan(table.block_mask(heads.candidate), table.orders[heads.pattern], table.inverses[heads.pattern],
                heads.pattern)


def _plan_v2(query: torch.Tensor, key: torch.Tensor, layout: VideoLayout, config: RainFusion2Config,
             scale: float) -> Plan:
    name = "raster" if config.permutation == "none" else config.permutation
    order = token_order(layout, name, sink_first_frame=config.sink_first_frame, device=query.device)
    q_mean, k_mean = (block_means(t, config.block_size, order.index) for t in (query, key))
    mask = predict_from_means(q_mean, k_mean, seq_len=query.shape[2], num_dense=order.num_dense,
                              num_dense_tail=order.num_dense_tail, config=config, scale=scale)
    key_mean = token_mean(k_mean, key.shape[2], config.block_size).float() if config.precision == "fp8" else None
    return Plan(mask, order.index, order.inverse, key_mean=key_mean)
