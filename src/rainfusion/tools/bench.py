"""`rainfusion bench`: dense vs RainFusion variants on synthetic video attention.

For each method: time, realized density, relative L2 error and cosine similarity of the output
against dense attention (float32), attention recall (dense attention mass inside the mask, on a
sample of query rows) and, for v1, the head-pattern counts.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import sparse_attention
from ..config import AnyConfig, method_config
from ..layout import VideoLayout
from ..reference import attention_recall, cosine_similarity, relative_l2
from ..steps import AttentionState
from .synthetic import synthetic_attention


@dataclass(frozen=True)
class Preset:
    """An attention shape: one layer's layout, heads and head dim."""

    layout: VideoLayout
    heads: int
    head_dim: int


PRESETS = {
    # runs on a laptop CPU in well under a minute
    "small": Preset(VideoLayout(9, 16, 24, text_len=64, text_position="before"), heads=6, head_dim=64),
    # real model shapes (see docs): meant for a GPU
    "wan-1.3b-480p": Preset(VideoLayout(21, 30, 52), heads=12, head_dim=128),
    "cogvideox-5b": Preset(VideoLayout(13, 30, 45, text_len=226, text_position="before"), heads=48, head_dim=64),
    "wan-14b-720p": Preset(VideoLayout(21, 45, 80), heads=40, head_dim=128),
    "hunyuan-720p": Preset(VideoLayout(33, 45, 80, text_len=256, text_position="after"), heads=24, head_dim=128),
}

# dense SDPA, then named methods of ``config.METHODS``
METHODS: dict[str, AnyConfig | None] = {"dense": None} | {
    name: method_config(name)
    for name in ("rainfusion", "rainfusion+", "rainfusion2", "rainfusion2-tile2d", "rainfusion2-none", "rainfusion2-topp")
}


@dataclass
class MethodResult:
    method: str
    milliseconds: float
    density: float
    rel_l2: float
    cosine: float
    recall: float
    backend: str
    patterns: dict[str, int] = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: caches, kernel compilation
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_method(name: str, config: AnyConfig | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               layout: VideoLayout, dense_out: torch.Tensor, *, repeats: int, backend: str,
               recall_rows: torch.Tensor) -> tuple[MethodResult, AttentionState | None]:
    """Time one method and measure its fidelity against ``dense_out`` (float32); also returns the
    state of its last call (mask, patterns) for pictures."""
    scale = q.shape[-1] ** -0.5
    if config is None:
        ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats, q.device)
        out = F.scaled_dot_product_attention(q, k, v)
        result = MethodResult(name, ms, 1.0, relative_l2(out, dense_out), cosine_similarity(out, dense_out), 1.0,
                              "sdpa")
        return result, None
    state = AttentionState()
    ms = _median_ms(lambda: sparse_attention(q, k, v, layout=layout, config=config, state=state,
                                             backend=backend), repeats, q.device)
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state, backend=backend)
    stats, cache = state.stats, state.cache
    recall = attention_recall(q.float(), k.float(), cache.plan.mask, cache.plan.inverse, scale=scale, rows=recall_rows)
    result = MethodResult(name, ms, stats.mean_density, relative_l2(out, dense_out),
                          cosine_similarity(out, dense_out), float(recall.mean()), stats.backend, stats.pattern_counts)
    return result, state


def run_bench(preset: str = "small", *, methods: list[str] | None = None, batch: int = 1, heads: int | None = None,
              device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, repeats: int = 3,
              backend: str = "auto", recall_queries: int = 1024,
              progress: bool = True) -> tuple[dict, dict[str, AttentionState]]:
    """Run the benchmark. Returns a JSON-ready report (environment, one row per method) and the
    last attention state of each sparse method (its mask and head patterns)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    methods = list(METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {list(METHODS)}, got unknown {unknown}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    spec = PRESETS[preset]
    heads = spec.heads if heads is None else heads
    data = synthetic_attention(spec.layout, batch=batch, heads=heads, head_dim=spec.head_dim, seed=seed,
                               dtype=dtype, device=device)
    q, k, v = data.query, data.key, data.value
    dense_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    n = spec.layout.num_tokens
    generator = torch.Generator().manual_seed(seed)
    recall_rows = torch.randperm(n, generator=generator)[: min(n, recall_queries)].sort().values.to(q.device)

    rows, states = [], {}
    for position, name in enumerate(methods, 1):
        if progress:
            print(f"bench {preset}: {name} ({position}/{len(methods)})", file=sys.stderr, flush=True)
        result, state = run_method(name, METHODS[name], q, k, v, spec.layout, dense_out, repeats=repeats,
                                   backend=backend, recall_rows=recall_rows)
        rows.append(result)
        if state is not None:
            states[name] = state
    device_name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "preset": preset,
        "layout": asdict(spec.layout),
        "batch": batch,
        "heads": heads,
        "head_dim": spec.head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_name,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "head_kinds": list(data.head_kinds),
        "results": [asdict(r) for r in rows],
    }
    return report, states


def format_table(report: dict) -> str:
    """The results as an aligned text table."""
    dense_ms = next((r["milliseconds"] for r in report["results"] if r["method"] == "dense"), math.nan)
    header = f"{'method':<20} {'ms':>9} {'speed-up':>8} {'density':>7} {'rel L2':>8} {'cosine':>7} {'recall':>6}  patterns S/T/X"
    lines = [f"preset {report['preset']} on {report['device']} ({report['dtype']}, {report['date']})", header]
    for r in report["results"]:
        p = r["patterns"]
        patterns = f"{p['spatial']}/{p['temporal']}/{p['textural']}" if p else "-"
        lines.append(
            f"{r['method']:<20} {r['milliseconds']:>9.2f} {dense_ms / r['milliseconds']:>7.2f}x {r['density']:>7.3f} "
            f"{r['rel_l2']:>8.4f} {r['cosine']:>7.4f} {r['recall']:>6.3f}  {patterns}"
        )
    return "\n".join(lines)


def check_report(report: dict) -> list[str]:
    """Problems that make the run a failure: non-finite metrics."""
    return [f"{r['method']}: non-finite result" for r in report["results"]
            if not all(math.isfinite(r[key]) for key in ("milliseconds", "rel_l2", "cosine", "recall"))]


def save_json(report: dict, path: str) -> None:
    """Write the report as JSON, creating the missing folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
