"""Attention-map analysis of the demo model: do its heads fall into RainFusion's spatial /
temporal / textural patterns? One denoising forward at a chosen noise level records q and k of
every self-attention layer; per head, the ARM's verdict and recalls, the share of the exact
attention that the masks of v2 at 0.8 and v1 at 0.5 keep, and the most that any mask with the
same number of blocks in each row could keep (the exact best blocks, in the same token order:
what separates a prediction miss from a head that block sparsity cannot capture at that
density), the frame-to-frame attention mass
[T, T] and the mean attention of middle-frame queries over spatial offsets inside their own
frame. One figure per layer (needs matplotlib).

    python -m rainfusion.tools.demo.analysis --checkpoint demo.safetensors --out maps/
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...arm import recognise_heads
from ...attention import sparse_attention
from ...config import AnyConfig, RainFusion2Config, RainFusionConfig
from ...config import PATTERN_NAMES
from ...layout import VideoLayout
from ...steps import AttentionState
from .model import DemoVideoModel, load_checkpoint, to_latents
from .videos import sample_videos


class _RecordSelfAttention(TorchFunctionMode):
    """Keeps q, k, v [B, H, N, D] of every SDPA call over ``num_tokens`` keys (self-attention)."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens, self.calls = num_tokens, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = (args[i] if len(args) > i else kwargs[name]
                                 for i, name in enumerate(("query", "key", "value")))
            if key.shape[2] == self.num_tokens:
                self.calls.append((query.detach(), key.detach(), value.detach()))
        return func(*args, **kwargs)


@dataclass
class LayerMaps:
    """One layer's analysis (first clip of the batch). patterns: ARM verdicts [H];
    local_recall, global_recall [H]; mask_recall: per method name, the exact attention mass
    inside its mask [H] (mean over queries); best_recall: per method name, the mass inside the
    best mask with the same block count per row [H]; frame_mass [H, T, T] (rows sum to 1);
    spatial [H, 2h-1, 2w-1]: mean attention (over the middle frame's queries that have a key
    there) at each offset within the query's frame."""

    patterns: list[str]
    local_recall: list[float]
    global_recall: list[float]
    mask_recall: dict[str, list[float]]
    best_recall: dict[str, list[float]]
    frame_mass: torch.Tensor
    spatial: torch.Tensor


MASKS: dict[str, AnyConfig] = {"rainfusion2 0.8": RainFusion2Config(), "rainfusion 0.5": RainFusionConfig()}


def mask_recall(query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor, layout: VideoLayout,
                config: AnyConfig, scale: float) -> tuple[list[float], list[float]]:
    """Per head, for the mask that ``config`` predicts for query/key [1, H, N, D] at a sparse
    step: (the exact attention mass inside it, the mass inside the best mask that keeps as many
    key blocks in each query block's row: each row's heaviest blocks), both means over queries.
    probs float64 [H, N, N]: the exact attention of these query and key."""
    state = AttentionState()
    sparse_attention(query, key, key, layout=layout, config=config, state=state, scale=scale)
    heads, n = probs.shape[:2]
    mask = state.cache.plan.mask.expand(1, heads)
    block = state.cache.plan.inverse.expand(1, heads, n)[0] // mask.block_size  # [H, N]: each token's block
    mass = torch.zeros(heads, mask.q_blocks, n, dtype=torch.float64, device=probs.device)
    mass.scatter_add_(1, block[:, :, None].expand(-1, -1, n), probs)
    mass = torch.zeros(heads, mask.q_blocks, mask.kv_blocks, dtype=torch.float64, device=probs.device).scatter_add_(
        2, block[:, None, :].expand(-1, mask.q_blocks, -1), mass)  # [H, q_blocks, kv_blocks]
    inside = (mass * mask.to_dense()[0]).sum((-1, -2)) / n
    ranked = mass.sort(-1, descending=True).values.cumsum(-1)
    counts = mask.counts[0].long()
    best = torch.where(counts > 0, ranked.gather(2, (counts - 1).clamp_min(0)[..., None])[..., 0], 0.0).sum(-1) / n
    return inside.tolist(), best.tolist()


@torch.no_grad()
def capture_self_attention(model: DemoVideoModel, *, noise: float = 0.5,
                           seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) [1, H, N, D] of every self-attention layer, in order, for one procedural clip
    noised to level ``noise`` (in the model's device and dtype)."""
    layout = model.layout
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    videos, captions = sample_videos(1, model.spec, generator, device)
    latents = to_latents(videos)
    noisy = (1 - noise) * latents + noise * torch.randn(latents.shape, generator=generator).to(device)
    recorder = _RecordSelfAttention(layout.num_tokens)
    with recorder:
        model(noisy.to(dtype), torch.tensor([noise * 1000], device=device), captions)
    return recorder.calls


@torch.no_grad()
def analyse(model: DemoVideoModel, *, noise: float = 0.5, seed: int = 0, config: RainFusionConfig | None = None,
            masks: dict[str, AnyConfig] = MASKS) -> list[LayerMaps]:
    """Per self-attention layer, the maps of one procedural clip noised to level ``noise``;
    ``config``: the ARM's; ``masks``: the methods whose mask recall is measured."""
    layout = model.layout
    config = config or RainFusionConfig(sink_first_frame=False)
    t, h, w = layout.frames, layout.height, layout.width
    layers = []
    for query, key, _ in capture_self_attention(model, noise=noise, seed=seed):
        q, k = query[:1].float(), key[:1].float()  # [1, H, N, D]
        scale = q.shape[-1] ** -0.5
        verdict = recognise_heads(q, k, layout, config, scale=scale)
        probs = torch.softmax((q[0].double() @ k[0].double().transpose(-1, -2)) * scale, dim=-1)  # [H, N, N]
        heads = probs.shape[0]
        by_frame = probs.view(heads, t, h * w, t, h * w)
        frame_mass = by_frame.sum(-1).mean(2)  # [H, T(query), T(key)]
        middle = by_frame[:, t // 2, :, t // 2, :].reshape(heads, h, w, h, w)
        spatial = torch.zeros(heads, 2 * h - 1, 2 * w - 1, dtype=probs.dtype, device=probs.device)
        queries = torch.zeros(2 * h - 1, 2 * w - 1, dtype=probs.dtype, device=probs.device)  # queries that see each offset
        for y in range(h):  # move each query's map so that the query sits at the centre
            for x in range(w):
                spatial[:, h - 1 - y:2 * h - 1 - y, w - 1 - x:2 * w - 1 - x] += middle[:, y, x]
                queries[h - 1 - y:2 * h - 1 - y, w - 1 - x:2 * w - 1 - x] += 1
        recalls = {name: mask_recall(q, k, probs, layout, masked, scale) for name, masked in masks.items()}
        layers.append(LayerMaps([PATTERN_NAMES[p] for p in verdict.pattern[0].tolist()],
                                verdict.local_recall[0, :, 0].tolist(), verdict.global_recall[0, :, 0].tolist(),
                                {name: inside for name, (inside, _) in recalls.items()},
                                {name: best for name, (_, best) in recalls.items()},
                                frame_mass.float().cpu(), (spatial / queries).float().cpu()))
    return layers


def plot_layer(maps: LayerMaps, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = len(maps.patterns)
    fig, axes = plt.subplots(2, heads, figsize=(2.6 * heads, 5.4), squeeze=False)
    for i in range(heads):
        axes[0, i].imshow(maps.frame_mass[i].numpy(), cmap="magma")
        kept = "\n".join(f"{name.replace('rainfusion', 'v')}: {recall[i]:.2f} (best {maps.best_recall[name][i]:.2f})"
                         for name, recall in maps.mask_recall.items())
        axes[0, i].set_title(f"head {i}: {maps.patterns[i]}\nARM local {maps.local_recall[i]:.2f} "
                             f"global {maps.global_recall[i]:.2f}\nmask keeps\n{kept}", fontsize=7)
        axes[0, i].set(xlabel="key frame", ylabel="query frame")
        axes[1, i].imshow(maps.spatial[i].numpy(), cmap="magma")
        axes[1, i].set(xlabel="key x - query x", ylabel="key y - query y")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="attention-maps")
    parser.add_argument("--noise", type=float, default=0.5, help="noise level of the analysed step (0 to 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint, args.device)
    layers = analyse(model, noise=args.noise, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, maps in enumerate(layers):
        plot_layer(maps, f"demo model, self-attention layer {i}, noise {args.noise}", out / f"layer{i}.png")
    summary = [dict(layer=i, patterns=m.patterns, local_recall=m.local_recall, global_recall=m.global_recall,
                    mask_recall=m.mask_recall, best_recall=m.best_recall) for i, m in enumerate(layers)]
    (out / "patterns.json").write_text(json.dumps(summary, indent=1))
    for s in summary:
        recalls = "  ".join(f"{name} keeps {' '.join(f'{r:.2f}' for r in kept)} (best "
                            f"{' '.join(f'{r:.2f}' for r in s['best_recall'][name])})"
                            for name, kept in s["mask_recall"].items())
        print(f"layer {s['layer']}: {' '.join(s['patterns'])}  {recalls}")


if __name__ == "__main__":
    main()
