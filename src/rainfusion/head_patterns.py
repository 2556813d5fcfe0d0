"""RainFusion (v1) head patterns as block masks.

Each pattern lives in its own token order (see ``permutation``), where it becomes "the dense
region plus one contiguous range of key blocks":

- spatial   (raster order): a band of whole frames around the query's frame;
- temporal  (time-major order): a band of spatial positions around the query's, all frames;
- textural  (checkerboard order): the 1/tau checkerboard subset of the video keys, for all queries.

A band keeping a fraction ``p`` of an axis of ``n`` units keeps ``round(p * n)`` units (at least
one) centred on the query's unit and shifted at the edges, so every query keeps the same count
and the realized sparsity matches the request. ``band_window`` is the one definition of it,
shared by the masks and the ARM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import SPATIAL, TEMPORAL, TEXTURAL
from .layout import VideoLayout
from .mask import BlockSparseMask, num_blocks
from .permutation import checkerboard_keep, dense_block_range, token_order

PATTERN_ORDERS = ("raster", "time_major", "checkerboard")


def band_keep(fraction: float, units: int) -> int:
    """Units a band keeping ``fraction`` of ``units`` covers: round(fraction * units), >= 1."""
    return min(units, max(1, round(fraction * units)))


def band_window(center: torch.Tensor, units: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi) of the ``keep`` units centred on ``center`` (any int shape), inside [0, units)."""
    lo = (center - keep // 2).clamp(0, units - keep)
    return lo, lo + keep


def _band_units(layout: VideoLayout, pattern: int, sink_first_frame: bool) -> tuple[int, int]:
    """(tokens per unit, number of units) of a band pattern over the non-sink video."""
    frames = layout.frames - int(sink_first_frame)
    if pattern == SPATIAL:
        return layout.frame_tokens, frames
    return frames, layout.frame_tokens


@dataclass(frozen=True)
class HeadPatternTable:
    """Everything v1 needs per (layout, fractions, tau), computed once per device.

    Candidate ``c = pattern * len(fractions) + f`` is pattern ``pattern`` with band fraction
    ``fractions[f]`` (textural ignores the fraction).
    orders, inverses: int64 [3, N], the token order of each pattern.
    key_lo, key_hi: int32 [C, q_blocks], the key-block range of each candidate per query block,
        inside the sparse blocks [dense_blocks, tail_start); the blocks outside are dense.
    """

    orders: torch.Tensor
    inverses: torch.Tensor
    key_lo: torch.Tensor
    key_hi: torch.Tensor
    fractions: tuple[float, ...]
    dense_blocks: int
    tail_start: int
    width: int
    seq_len: int
    block_size: int

    def block_mask(self, candidate: torch.Tensor) -> BlockSparseMask:
        """BlockSparseMask [B, H] for candidate ids ``candidate`` (int64 [B, H]), in each head's order."""
        kv_blocks = num_blocks(self.seq_len, self.block_size)
        lo = self.key_lo[candidate].long()  # [B, H, q_blocks]
        span = (self.key_hi[candidate].long() - lo).clamp_min(0)
        q_blocks = lo.shape[-1]
        head, tail = self.dense_blocks, self.tail_start
        row = torch.arange(q_blocks, device=lo.device)
        dense_row = (row < head) | (row >= tail)
        counts = torch.where(dense_row, kv_blocks, head + span + kv_blocks - tail)
        # slots: the head blocks, then the band, then the tail blocks
        slot = torch.arange(self.width, device=lo.device)
        band_end = (head + span).unsqueeze(-1)
        indices = torch.where(slot < head, slot, lo.unsqueeze(-1) + slot - head)
        indices = torch.where(slot >= band_end, tail + slot - band_end, indices)
        return BlockSparseMask(
            counts.to(torch.int32), indices.to(torch.int32), self.seq_len, self.seq_len, self.block_size, check=False
        )


def _key_ranges(layout: VideoLayout, pattern: int, fraction: float, num_dense: int, num_dense_tail: int,
                tau: int, sink_first_frame: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [q_blocks] key-block range [lo, hi) of one candidate (dense region excluded)."""
    n = layout.num_tokens - num_dense_tail  # end of the sparse video tokens
    start = torch.arange(num_blocks(layout.num_tokens, block_size)) * block_size
    if n == num_dense:  # nothing but the dense region: every row is full
        return torch.zeros_like(start), torch.zeros_like(start)
    if pattern == TEXTURAL:
        keep = checkerboard_keep(layout.height, layout.width, tau)
        kept = int(keep.sum()) * (layout.frames - int(sink_first_frame))
        lo = torch.full_like(start, num_dense // block_size)
        return lo, torch.full_like(start, num_blocks(num_dense + kept, block_size))
    unit, units = _band_units(layout, pattern, sink_first_frame)
    first = (start - num_dense).clamp(0, n - num_dense - 1) // unit
    last = ((start + block_size).clamp(max=n) - 1 - num_dense).clamp(0, n - num_dense - 1) // unit
    keep = band_keep(fraction, units)
    lo, _ = band_window(first, units, keep)
    _, hi = band_window(last, units, keep)
    return (num_dense + lo * unit) // block_size, -(-(num_dense + hi * unit) // block_size)


@lru_cache(maxsize=64)
def head_pattern_table(layout: VideoLayout, fractions: tuple[float, ...], tau: int,
                       sink_first_frame: bool, block_size: int,
                       device: torch.device) -> HeadPatternTable:
    """The cached HeadPatternTable of a layout and v1 settings."""
    orders = [token_order(layout, name, sink_first_frame=sink_first_frame, tau=tau, device=device)
              for name in PATTERN_ORDERS]
    num_dense, num_dense_tail = orders[0].num_dense, orders[0].num_dense_tail
    ranges = [_key_ranges(layout, pattern, f, num_dense, num_dense_tail, tau, sink_first_frame, block_size)
              for pattern in (SPATIAL, TEMPORAL, TEXTURAL) for f in fractions]
    dense_blocks, tail_start = dense_block_range(layout.num_tokens, num_dense, num_dense_tail, block_size)
    key_lo = torch.stack([lo for lo, _ in ranges]).clamp(dense_blocks, tail_start)
    key_hi = torch.stack([hi for _, hi in ranges]).clamp(dense_blocks, tail_start)
    kv_blocks = num_blocks(layout.num_tokens, block_size)
    tail_blocks = kv_blocks - tail_start
    width = min(kv_blocks, dense_blocks + int((key_hi - key_lo).clamp_min(0).max()) + tail_blocks)
    return HeadPatternTable(
        orders=torch.stack([o.index for o in orders]),
        inverses=torch.stack([o.inverse for o in orders]),
        key_lo=key_lo.to(device=device, dtype=torch.int32),
        key_hi=key_hi.to(device=device, dtype=torch.int32),
        fractions=fractions,
        dense_blocks=dense_blocks,
        tail_start=tail_start,
        width=width,
        seq_len=layout.num_tokens,
        block_size=block_size,
    )
