"""Deterministic synthetic q, k, v with the structure of video DiT attention.

The video content is a feature field over (t, h, w): smooth multi-scale noise plus Gaussian blobs
that move at constant velocity, so features vary smoothly in space and time like real latents.
Every head projects that content (weights shared by the batch, as in a model) and adds a
positional direction before a 3D rotary embedding: the head dim is split into time, height and
width pairs, and the pairs of q and k are rotated by ``position * frequency`` on their axis. The
positional direction of q and k is the same vector, so its share of the logit between two tokens
is a kernel of their (dt, dh, dw) distance, and its amplitude per axis makes a head lean:

- spatial:  a strong, narrow time kernel: mass within a few frames, spread over each frame;
- temporal: strong, narrow height and width kernels: mass near the query's (h, w) in every frame;
- textural: weak, wide kernels on every axis under stronger content logits: broad attention.

Text tokens are Gaussian noise at the video tokens' scale. Values carry content and a little
noise, no position. Head dims from 32 up give every axis enough rotary pairs for sharp kernels;
at 16 (two pairs on height and width) the temporal heads' kernel is coarse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_int
from ..layout import VideoLayout

HEAD_KINDS = ("spatial", "temporal", "textural")

_CONTENT_CHANNELS = 32
_NUM_BLOBS = 6
# (cells per lattice step along t, h, w; amplitude) of each smooth-noise octave
_NOISE_OCTAVES = (((4, 6, 6), 1.0), ((2, 2, 2), 0.5))
_VALUE_NOISE = 0.1


@dataclass(frozen=True)
class _HeadStyle:
    """How one head kind mixes content and position into its logits q.k / sqrt(D).

    content_logit_std: standard deviation of the content part of the logits.
    contrast: (t, h, w) peak of each axis' positional kernel, in logits.
    width: (t, h, w) kernel width (Gaussian sigma) as a fraction of the axis length, floored at
        ``min_width`` positions.
    """

    content_logit_std: float
    contrast: tuple[float, float, float]
    width: tuple[float, float, float]
    min_width: float = 0.5


_HEAD_STYLES = {
    "spatial": _HeadStyle(content_logit_std=0.3, contrast=(6.0, 0.0, 0.0), width=(1 / 12, 0.0, 0.0)),
    "temporal": _HeadStyle(content_logit_std=0.3, contrast=(0.0, 6.0, 6.0), width=(0.0, 1 / 16, 1 / 16)),
    "textural": _HeadStyle(content_logit_std=1.0, contrast=(0.25, 0.25, 0.25), width=(1 / 6, 1 / 6, 1 / 6)),
}


@dataclass(frozen=True)
class SyntheticAttention:
    """Synthetic attention inputs of one layer.

    query, key, value: [B, H, N, D], tokens ordered as the layout says.
    head_kinds: the kind (one of ``HEAD_KINDS``) each of the H heads was built as.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    head_kinds: tuple[str, ...]


def _rotary_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs of the (time, height, width) axes: a third of the D/2 pairs to each of height
    and width, the rest to time."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def _rotary_frequencies(pairs: int, length: int) -> Tensor:
    """float64 [pairs]: angular frequencies of one axis of ``length`` positions.

    Evenly spaced midpoints of (0, pi * min(1, pairs / length)], so a kernel built from them is
    free of aliasing across the whole axis (its first mirror image lies beyond 2 * length).
    """
    top = math.pi * min(1.0, pairs / length)
    return (torch.arange(pairs, dtype=torch.float64) + 0.5) * (top / pairs)


def _positional_amplitudes(frequencies: Tensor, length: int, contrast: float, width: float,
                           min_width: float, head_dim: int) -> Tensor:
    """float64 [pairs]: per-pair amplitude of the positional direction on one axis.

    The squared amplitudes follow a Gaussian spectrum, so the kernel
    sum_j a_j^2 cos(w_j * d) / sqrt(D) is a bump of sigma ~ ``width * length`` positions and
    height ``contrast`` at d = 0.
    """
    if contrast == 0.0 or length == 1:
        return torch.zeros_like(frequencies)
    sigma = max(min_width, width * length)
    spectrum = torch.exp(-0.5 * (frequencies * sigma) ** 2)
    return torch.sqrt(contrast * math.sqrt(head_dim) * spectrum / spectrum.sum())


def _rotary_angles(layout: VideoLayout, head_dim: int) -> Tensor:
    """float64 [Nv, D/2]: rotation angle of every video token's pairs (time, height, width)."""
    t, h, w = torch.meshgrid(
        torch.arange(layout.frames), torch.arange(layout.height), torch.arange(layout.width), indexing="ij"
    )
    angles = []
    for position, pairs, length in zip((t, h, w), _rotary_pairs(head_dim),
                                       (layout.frames, layout.height, layout.width)):
        angles.append(position.reshape(-1, 1).double() * _rotary_frequencies(pairs, length))
    return torch.cat(angles, dim=1)


def _positional_direction(kind: str, layout: VideoLayout, head_dim: int) -> Tensor:
    """float64 [D]: a head's positional direction before rotation (first element of each pair)."""
    style = _HEAD_STYLES[kind]
    amplitudes = [
        _positional_amplitudes(_rotary_frequencies(pairs, length), length, contrast, width,
                               style.min_width, head_dim)
        for pairs, length, contrast, width in zip(
            _rotary_pairs(head_dim), (layout.frames, layout.height, layout.width), style.contrast, style.width)
    ]
    direction = torch.zeros(head_dim, dtype=torch.float64)
    direction[0::2] = torch.cat(amplitudes)
    return direction


def _rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate the pairs (x[..., 2j], x[..., 2j+1]) of a contiguous float32 x [..., Nv, D] by the
    unit complex numbers rotation [Nv, D/2]."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2)


def _smooth_noise(layout: VideoLayout, generator: torch.Generator) -> Tensor:
    """float64 [C, T, H, W]: octaves of lattice noise, trilinearly interpolated."""
    size = (layout.frames, layout.height, layout.width)
    field = torch.zeros(_CONTENT_CHANNELS, *size, dtype=torch.float64)
    for cells, amplitude in _NOISE_OCTAVES:
        lattice = [math.ceil(n / cell) + 1 for n, cell in zip(size, cells)]
        coarse = torch.randn(1, _CONTENT_CHANNELS, *lattice, generator=generator, dtype=torch.float64)
        field += amplitude * F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)[0]
    return field


def _moving_blobs(layout: VideoLayout, generator: torch.Generator) -> Tensor:
    """float64 [C, T, H, W]: Gaussian blobs, each with a feature vector, moving at constant velocity
    (up to half the frame over the clip)."""
    extent = torch.tensor([layout.height, layout.width], dtype=torch.float64)
    start = torch.rand(_NUM_BLOBS, 2, generator=generator, dtype=torch.float64) * extent
    velocity = ((torch.rand(_NUM_BLOBS, 2, generator=generator, dtype=torch.float64) * 2 - 1)
                * 0.5 * extent / max(1, layout.frames - 1))
    radius = (0.1 + 0.15 * torch.rand(_NUM_BLOBS, generator=generator, dtype=torch.float64)) * extent.min()
    radius = radius.clamp_min(0.75)
    features = 2.0 * torch.randn(_NUM_BLOBS, _CONTENT_CHANNELS, generator=generator, dtype=torch.float64)

    t = torch.arange(layout.frames, dtype=torch.float64)
    centre = start[:, None, :] + velocity[:, None, :] * t[None, :, None]  # [blobs, T, 2]
    dh = torch.arange(layout.height, dtype=torch.float64)[None, None, :] - centre[..., 0:1]  # [blobs, T, H]
    dw = torch.arange(layout.width, dtype=torch.float64)[None, None, :] - centre[..., 1:2]  # [blobs, T, W]
    distance2 = dh[..., :, None] ** 2 + dw[..., None, :] ** 2  # [blobs, T, H, W]
    profile = torch.exp(-0.5 * distance2 / radius[:, None, None, None] ** 2)
    return torch.einsum("bthw,bc->cthw", profile, features)


def _video_content(layout: VideoLayout, generator: torch.Generator) -> Tensor:
    """float64 [Nv, C]: content features of the video tokens in raster order, centred per channel
    and RMS-normalized per token (as a DiT normalizes before attention)."""
    field = _smooth_noise(layout, generator) + _moving_blobs(layout, generator)
    tokens = field.reshape(_CONTENT_CHANNELS, -1).T
    tokens = tokens - tokens.mean(0)
    return tokens / tokens.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)


def _check_head_kinds(head_kinds: Sequence[str] | None, heads: int) -> tuple[str, ...]:
    if head_kinds is None:
        return tuple(HEAD_KINDS[i % len(HEAD_KINDS)] for i in range(heads))
    if isinstance(head_kinds, str) or not isinstance(head_kinds, Sequence):
        raise TypeError(f"head_kinds must be a sequence of str, got {type(head_kinds).__name__}")
    if len(head_kinds) != heads:
        raise ValueError(f"head_kinds must have one kind per head ({heads}), got {len(head_kinds)}")
    for i, kind in enumerate(head_kinds):
        if kind not in HEAD_KINDS:
            raise ValueError(f"head_kinds[{i}] must be one of {HEAD_KINDS}, got {kind!r}")
    return tuple(head_kinds)


def _check_arguments(layout: VideoLayout, batch: int, heads: int, head_dim: int, seed: int,
                     dtype: torch.dtype) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    check_int("batch", batch, 1)
    check_int("heads", heads, 1)
    check_int("head_dim", head_dim, 16)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
    check_int("seed", seed, 0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def synthetic_attention(layout: VideoLayout, *, batch: int = 1, heads: int = 6, head_dim: int = 64,
                        head_kinds: Sequence[str] | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> SyntheticAttention:
    """Synthetic q, k, v [B, H, N, D] for ``layout``.

    head_kinds: one of ``HEAD_KINDS`` per head; by default spatial, temporal, textural, repeated.
    Everything is computed on the CPU from ``seed`` and then cast, so the same arguments give
    bitwise the same tensors on every call and device. Heads share their projection weights
    across the batch; each batch item has its own video and text. The video tokens do not depend
    on ``layout.text_len``. Elements are O(1) (RMS about 1), safe in bfloat16.
    """
    _check_arguments(layout, batch, heads, head_dim, seed, dtype)
    kinds = _check_head_kinds(head_kinds, heads)
    generator = torch.Generator().manual_seed(seed)

    projections = torch.randn(heads, 3, _CONTENT_CHANNELS, head_dim, generator=generator)
    projections /= math.sqrt(_CONTENT_CHANNELS)  # [H, 3 (query, key, value), C, D]
    angles = _rotary_angles(layout, head_dim)
    rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [Nv, D/2]
    content = torch.stack([_video_content(layout, generator) for _ in range(batch)]).float()  # [B, Nv, C]

    shape = (batch, heads, layout.num_tokens, head_dim)
    outputs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(3)]  # query, key, value
    video_rms = torch.empty(3, batch, heads, 1, 1)
    video = slice(layout.video_start, layout.video_start + layout.video_tokens)
    for head, kind in enumerate(kinds):
        w_query, w_key, w_value = projections[head]
        content_scale = math.sqrt(_HEAD_STYLES[kind].content_logit_std)
        positional = _positional_direction(kind, layout, head_dim).float()
        noise = torch.randn(batch, layout.video_tokens, head_dim, generator=generator)
        parts = (
            _rotate(content @ (content_scale * w_query) + positional, rotation),  # [B, Nv, D]
            _rotate(content @ (content_scale * w_key) + positional, rotation),
            content @ w_value + _VALUE_NOISE * noise,
        )
        for out, rms, part in zip(outputs, video_rms, parts):
            out[:, head, video] = part.to(out)
            rms[:, head] = part.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()

    if layout.text_len:  # drawn last, so the video tokens do not depend on the text
        text = slice(layout.text_start, layout.text_start + layout.text_len)
        for out, rms in zip(outputs, video_rms):
            noise = torch.randn(batch, heads, layout.text_len, head_dim, generator=generator)
            out[:, :, text] = (rms * noise).to(out)
    return SyntheticAttention(*outputs, kinds)
