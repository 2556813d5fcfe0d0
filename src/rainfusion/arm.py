"""The Adaptive Recognition Module (RainFusion v1): classify each head online.

Two small token samples per step, for every batch item and head at once:

- local sample: the tokens of one (middle) frame. Recall of the temporal head's spatial band
  restricted to it says whether attention is spatially local;
- global sample: frame_tokens tokens spread evenly over the frames (stride = frames). Recall of
  the spatial head's frame band restricted to it says whether attention is temporally local.

Recall is the softmax mass (over the sampled keys) inside the band, averaged over the sampled
queries. Rule: temporal if local recall >= alpha, else spatial if global recall >= alpha (and
there is more than one frame to band over), else textural (or, with ``textural=False``, the band
with the higher recall). RainFusion+ then takes, for the chosen band, the smallest candidate
bandwidth whose recall reaches ``adaptive_recall``. A non-finite sampled element counts as 0, so
one NaN or inf token cannot flip a head's pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import SPATIAL, TEMPORAL, TEXTURAL, RainFusionConfig
from .head_patterns import band_keep, band_window
from .layout import VideoLayout


@dataclass(frozen=True)
class HeadRecognition:
    """The ARM's verdict for every (batch item, head).

    pattern: int64 [B, H] (SPATIAL / TEMPORAL / TEXTURAL).
    fraction_index: int64 [B, H], index into ``arm_fractions(config)`` of the band kept.
    local_recall, global_recall: float32 [B, H, F], recall of each candidate fraction.
    """

    pattern: torch.Tensor
    fraction_index: torch.Tensor
    local_recall: torch.Tensor
    global_recall: torch.Tensor

    @property
    def candidate(self) -> torch.Tensor:
        """int64 [B, H]: candidate id in ``HeadPatternTable`` numbering."""
        return self.pattern * self.local_recall.shape[-1] + self.fraction_index


def arm_fractions(config: RainFusionConfig) -> tuple[float, ...]:
    """Band fractions the ARM scores: ``1 - sparsity`` first, then the RainFusion+ candidates."""
    base = 1.0 - config.sparsity
    return (base, *config.bandwidths) if config.adaptive_bandwidth else (base,)


@dataclass(frozen=True)
class _Sample:
    queries: torch.Tensor  # int64 [Qs] token indices
    keys: torch.Tensor  # int64 [Ks] token indices
    inside: torch.Tensor  # float32 [F, Qs, Ks]: 1 where the key is inside the query's band


def _band_membership(query_unit: torch.Tensor, key_unit: torch.Tensor, units: int,
                     fractions: tuple[float, ...]) -> torch.Tensor:
    bands = []
    for fraction in fractions:
        lo, hi = band_window(query_unit, units, band_keep(fraction, units))
        bands.append((key_unit >= lo[:, None]) & (key_unit < hi[:, None]))
    return torch.stack(bands).float()


@lru_cache(maxsize=64)
def _samples(layout: VideoLayout, fractions: tuple[float, ...], max_queries: int, sink_first_frame: bool,
             device: torch.device) -> tuple[_Sample, _Sample]:
    """(local, global) samples of a layout, cached per device."""
    hw = layout.frame_tokens
    first = int(sink_first_frame and layout.frames > 1)
    frames = layout.frames - first
    video0 = layout.video_start + first * hw
    positions = torch.arange(hw)
    picked = (torch.arange(min(max_queries, hw)) * hw) // min(max_queries, hw)

    local_keys = video0 + (frames // 2) * hw + positions
    local = _Sample(local_keys[picked], local_keys,
                    _band_membership(positions[picked], positions, hw, fractions))

    spread = positions * frames  # stride `frames` over the non-sink video
    global_keys = video0 + spread
    frame_of = spread // hw
    global_ = _Sample(global_keys[picked], global_keys,
                      _band_membership(frame_of[picked], frame_of, frames, fractions))
    return tuple(
        _Sample(s.queries.to(device), s.keys.to(device), s.inside.to(device)) for s in (local, global_)
    )


def _recall(query: torch.Tensor, key: torch.Tensor, sample: _Sample, scale: float) -> torch.Tensor:
    """float32 [B, H, F]: mean over sampled queries of the softmax mass inside each band
    (non-finite sampled elements count as 0)."""
    q, k = (x.index_select(2, tokens).float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
            for x, tokens in ((query, sample.queries), (key, sample.keys)))
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return torch.einsum("bhqk,fqk->bhf", probs, sample.inside) / sample.queries.numel()


def recognise_heads(query: torch.Tensor, key: torch.Tensor, layout: VideoLayout, config: RainFusionConfig,
                    *, scale: float) -> HeadRecognition:
    """Classify every head of query/key [B, H, N, D] (original token order)."""
    fractions = arm_fractions(config)
    local, global_ = _samples(layout, fractions, config.arm_queries, config.sink_first_frame,
                              query.device)
    local_recall = _recall(query, key, local, scale)
    global_recall = _recall(query, key, global_, scale)

    temporal = local_recall[..., 0] >= config.alpha
    # with one frame to band over (an image), the spatial band is the whole sequence: not a choice
    several_frames = layout.frames - int(config.sink_first_frame) > 1
    spatial = ~temporal & (global_recall[..., 0] >= config.alpha) & several_frames
    pattern = torch.full_like(temporal, TEXTURAL, dtype=torch.long)
    if not config.textural:  # the better band for the heads that pass neither test
        better_spatial = several_frames & (global_recall[..., 0] > local_recall[..., 0])
        pattern = torch.where(better_spatial, SPATIAL, TEMPORAL)
    pattern = torch.where(spatial, SPATIAL, pattern)
    pattern = torch.where(temporal, TEMPORAL, pattern)

    fraction_index = torch.zeros_like(pattern)
    if config.adaptive_bandwidth:
        recall = torch.where((pattern == TEMPORAL).unsqueeze(-1), local_recall, global_recall)[..., 1:]
        candidates = torch.tensor(fractions[1:], device=query.device)
        enough = recall >= config.adaptive_recall
        smallest = torch.where(enough, candidates, float("inf")).argmin(-1)
        chosen = torch.where(enough.any(-1), smallest + 1, 0)
        fraction_index = torch.where(pattern == TEXTURAL, 0, chosen)
    return HeadRecognition(pattern, fraction_index, local_recall, global_recall)
