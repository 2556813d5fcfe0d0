"""Quality metrics of generated videos against their dense references: PSNR, SSIM, and the
realized density of a run's attention calls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _as_frames(video: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() == 3:
        video = video.unsqueeze(0)
    if video.dim() != 4:
        raise ValueError(f"{name} must be [F, H, W, C] or [H, W, C], got shape {tuple(video.shape)}")
    return video.double()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_frames(a, "a"), _as_frames(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels: 10 log10(range^2 / MSE); inf when equal."""
    a, b = _check_pair(a, b)
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window (11x11, sigma 1.5), K1 = 0.01,
    K2 = 0.03, statistics over the valid window positions; the mean over pixels, channels and
    frames. 1.0 when equal."""
    a, b = _check_pair(a, b)
    frames, height, width, channels = a.shape
    if height < window or width < window:
        raise ValueError(f"ssim needs frames of at least {window}x{window}, got {height}x{width}")
    # every (frame, channel) is one single-channel image: [F*C, 1, H, W]
    a = a.permute(0, 3, 1, 2).reshape(frames * channels, 1, height, width)
    b = b.permute(0, 3, 1, 2).reshape(frames * channels, 1, height, width)
    kernel = _gaussian_window(window, sigma, a.device)[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


@dataclass
class DensitySummary:
    calls: int = 0
    sparse_calls: int = 0
    mean_density: float = 1.0  # over all intercepted attention calls (dense warm-up counts as 1)
    sparse_density: float | None = None  # over the calls that ran sparse
    patterns: dict[str, int] = field(default_factory=dict)
    overhead: float = 0.0  # mean over all calls of AttentionStats.overhead (fraction of dense attention)


def summarize_history(history: list) -> DensitySummary:
    densities, sparse, patterns, overhead = [], [], {}, 0.0
    for _step, _cfg, _layer, stats in history:
        density = stats.mean_density
        densities.append(density)
        overhead += stats.overhead
        if not stats.dense:
            sparse.append(density)
        for name, count in stats.pattern_counts.items():
            patterns[name] = patterns.get(name, 0) + count
    if not densities:
        return DensitySummary()
    return DensitySummary(len(densities), len(sparse), sum(densities) / len(densities),
                          sum(sparse) / len(sparse) if sparse else None, patterns, overhead / len(densities))
