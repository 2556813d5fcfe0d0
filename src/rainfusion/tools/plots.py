"""Pictures of a benchmark run (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from .._validation import require
from ..config import PATTERN_NAMES
from ..steps import AttentionState

require("matplotlib", "--plot", "plot")  # on import: `rainfusion bench --plot` fails before it runs
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

COLORS = ("blue", "orange", "green")


def plot_bench(report: dict, states: dict[str, AttentionState], path: str) -> None:
    """Write a PNG (and its missing folders): error vs density per method, v1 head patterns, one v2 block mask."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for r in report["results"]:
        ax.scatter(r["density"], r["rel_l2"], s=40)
        ax.annotate(r["method"], (r["density"], r["rel_l2"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="realized density", ylabel="relative L2 error vs dense", title=f"error vs density ({report['preset']})")
    ax.grid(alpha=0.3)

    ax = axes[1]
    v1 = next((s for name, s in states.items() if s.stats.patterns is not None), None)
    if v1 is not None:
        patterns = v1.stats.patterns.cpu()
        ax.imshow(patterns, cmap=ListedColormap([f"tab:{c}" for c in COLORS]), vmin=0, vmax=2,
                  aspect="auto")
        ax.set_xticks(range(patterns.shape[1]))
        ax.set_yticks(range(patterns.shape[0]))
        ax.set(xlabel="head", ylabel="batch item",
               title="ARM head patterns: " + " / ".join(f"{n} ({c})" for n, c in zip(PATTERN_NAMES, COLORS)))
    else:
        ax.axis("off")

    ax = axes[2]
    v2 = next(((name, s) for name, s in states.items() if s.stats.patterns is None), None)
    if v2 is not None:
        name, state = v2
        ax.imshow(state.cache.plan.mask.to_dense()[0, 0].cpu(), cmap="Greys", interpolation="nearest")
        ax.set(xlabel="key block", ylabel="query block", title=f"{name} block mask (batch 0, head 0)")
    else:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
