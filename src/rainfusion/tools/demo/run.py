"""``rainfusion demo``: the demo model generates the same captions and seeds with dense attention
and with RainFusion v1, RainFusion+ and RainFusion2.0 at several sparsities (and, without
``--quick``, ablations: v1 without the textural pattern; v2 without permutation, with 8x8 tiles,
without the first-frame sink, with top-p, with the forced blocks inside the budget), then reports
PSNR, SSIM and cosine similarity against the dense videos, realized density, v1 head patterns
and time; writes the table as JSON, a side-by-side GIF and a quality-vs-density plot."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import AnyConfig, method_config
from ..metrics import psnr, ssim, summarize_history
from .flow import sample
from .model import checkpoint_config, from_latents, load_checkpoint
from .videos import caption_text, sample_captions

EMBEDDED = Path(__file__).parent / "weights" / "demo.safetensors"  # 4,096 tokens (16 frames of 128 px)
EMBEDDED_16K = EMBEDDED.with_name("demo-16k.safetensors")  # 16,384 tokens (16 frames of 256 px), fine-tuned from it


@dataclass(frozen=True)
class Variant:
    name: str
    config: AnyConfig | None  # None: dense
    skip_layers: tuple[int, ...] = ()  # self-attention layers kept dense


def variants(quick: bool, block_size: int = 128) -> list[Variant]:
    """The methods a demo run compares (dense first): named methods of ``config.METHODS``."""
    def named(label: str, name: str, **overrides: object) -> Variant:
        return Variant(label, method_config(name, block_size=block_size, **overrides))

    chosen = [Variant("dense", None), named("rainfusion 0.5", "rainfusion"), named("rainfusion2 0.8", "rainfusion2")]
    if quick:
        return chosen
    return chosen + [
        named("rainfusion+", "rainfusion+"),
        named("rainfusion 0.5 no textural", "rainfusion-no-textural"),
        named("rainfusion2 0.6", "rainfusion2", sparsity=0.6),
        named("rainfusion2 0.9", "rainfusion2", sparsity=0.9),
        named("rainfusion2 0.8 no permutation", "rainfusion2-none"),
        named("rainfusion2 0.8 tile2d", "rainfusion2-tile2d"),
        named("rainfusion2 0.8 no sink", "rainfusion2-no-sink"),
        named("rainfusion2 0.8 top-p 0.9", "rainfusion2-topp"),
        named("rainfusion2 0.8 forced in budget", "rainfusion2-in-budget"),
    ]


def sensitivity_variants(layers: int, block_size: int = 128) -> list[Variant]:
    """Where the quality goes (dense first): v2 at 0.8 sparse in one layer only, each layer in
    turn; v2 at 0.8 and v1 at 0.5 with half the steps dense."""
    v2 = method_config("rainfusion2", block_size=block_size)
    return [Variant("dense", None)] + [
        Variant(f"rainfusion2 0.8 layer {i} only", v2, tuple(j for j in range(layers) if j != i)) for i in range(layers)
    ] + [Variant("rainfusion2 0.8 warm-up 0.5", method_config("rainfusion2", block_size=block_size, warmup_fraction=0.5)),
         Variant("rainfusion 0.5 warm-up 0.5", method_config("rainfusion", block_size=block_size, warmup_fraction=0.5))]


def _frames(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, S, S] in [-1, 1] -> [B, T, S, S, 3] in [0, 1] (what psnr / ssim take per clip)."""
    return ((videos.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu()


def run_demo(checkpoint: str | Path, *, variant_list: list[Variant], clips: int = 4, seed: int = 0, steps: int = 30,
             device: str = "cpu", dtype: torch.dtype = torch.float32, log=print) -> tuple[dict, dict[str, torch.Tensor]]:
    """(report, videos per variant name as [clips, T, S, S, 3] in [0, 1]). The first variant is
    the dense reference of the quality columns."""
    from ...integrations.diffusers import apply_rainfusion, remove_rainfusion

    if not variant_list or variant_list[0].config is not None:
        raise ValueError("variant_list must start with the dense variant (config None): the quality reference")
    model = load_checkpoint(str(checkpoint), device, dtype)
    captions = sample_captions(clips, model.spec, torch.Generator().manual_seed(seed)).to(device)
    rows, videos = [], {}
    for variant in variant_list:
        controller = None if variant.config is None else apply_rainfusion(
            model.transformer, variant.config, num_steps=steps, skip_layers=variant.skip_layers)
        started = time.perf_counter()
        latents = sample(model, captions, torch.Generator(device).manual_seed(seed), steps=steps, dtype=dtype)
        if latents.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        history = controller.history if controller is not None else []
        if controller is not None:
            remove_rainfusion(model.transformer)
        frames = videos[variant.name] = _frames(from_latents(latents))
        reference = videos[variant_list[0].name]
        summary = summarize_history(history)
        cosine = torch.nn.functional.cosine_similarity(frames.flatten(1) - 0.5, reference.flatten(1) - 0.5).mean()
        rows.append(dict(
            variant=variant.name, seconds=round(seconds, 3),
            psnr=sum(min(psnr(f, r), 99.0) for f, r in zip(frames, reference)) / clips,
            ssim=sum(ssim(f, r) for f, r in zip(frames, reference)) / clips, cosine=float(cosine),
            density=summary.mean_density, sparse_density=summary.sparse_density, overhead=summary.overhead,
            patterns=summary.patterns))
        log(format_row(rows[-1]))
    report = dict(spec=vars(model.spec), tokens=model.layout.num_tokens, clips=clips, seed=seed, steps=steps,
                  device=device, captions=[caption_text(c) for c in captions.cpu()], rows=rows)
    return report, videos


HEADER = f"{'variant':<34} {'PSNR dB':>8} {'SSIM':>6} {'cosine':>7} {'density':>8} {'sparse':>7} {'s':>7}  patterns S/T/X"


def format_row(r: dict) -> str:
    patterns = "/".join(str(r["patterns"].get(p, 0)) for p in ("spatial", "temporal", "textural")) if r["patterns"] else "-"
    sparse = f"{r['sparse_density']:.3f}" if r["sparse_density"] is not None else "-"
    return (f"{r['variant']:<34} {r['psnr']:>8.2f} {r['ssim']:>6.3f} {r['cosine']:>7.4f} {r['density']:>8.3f} "
            f"{sparse:>7} {r['seconds']:>7.1f}  {patterns}")


def write_outputs(report: dict, videos: dict[str, torch.Tensor], out_dir: Path, fps: int = 8,
                  log=print) -> list[Path]:
    """demo.json, demo.gif (clips as rows, variants side by side: at most four) and, with
    matplotlib, demo-quality.png (PSNR against realized density; without it, logs that it is skipped)."""
    from ..._validation import require
    from ..generate import write_video

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "demo.json"]
    written[0].write_text(json.dumps(report, indent=1))
    shown = list(videos.values())[:4]
    grid = torch.cat([torch.cat(list(v), dim=1) for v in shown], dim=2)  # [T, clips*S, variants*S, 3]
    written.append(write_video(grid, out_dir / "demo.gif", fps)[0])
    plot_path = out_dir / "demo-quality.png"
    try:
        require("matplotlib", "the quality plot", "demo")
    except ImportError as error:
        log(f"skipped {plot_path}: {error}")
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"][1:]:
        ax.scatter(r["density"], r["psnr"], s=30)
        ax.annotate(r["variant"], (r["density"], r["psnr"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="realized density (all steps)", ylabel="PSNR vs dense (dB)", title="demo model: quality vs density")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    return written + [plot_path]


def _transformer_config(checkpoint: Path) -> dict:
    """The transformer configuration of a demo checkpoint; ValueError (one line) when it is none."""
    from safetensors import SafetensorError

    try:
        return checkpoint_config(str(checkpoint))[1]
    except (SafetensorError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--checkpoint {checkpoint}: not a demo checkpoint ({type(error).__name__}: {error})") \
            from None


def main_demo(args, dtype: torch.dtype) -> int:
    """CLI handler: ``args`` from ``rainfusion.tools.cli``, ``dtype`` resolved from ``--dtype``."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else EMBEDDED
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"no demo checkpoint at {checkpoint}: pass --checkpoint PATH (train one with "
            "`python -m rainfusion.tools.demo.training --out PATH`)")
    transformer_config = _transformer_config(checkpoint)
    steps = args.steps if args.steps is not None else (8 if args.quick else 30)
    clips = args.clips if args.clips is not None else (1 if args.quick else 16)
    print(f"demo: {clips} clips, {steps} steps, {args.device}")
    print(HEADER)
    if args.sensitivity:
        variant_list = sensitivity_variants(transformer_config["num_layers"], args.block_size)
    else:
        variant_list = variants(args.quick, args.block_size)
    report, videos = run_demo(checkpoint, variant_list=variant_list, clips=clips,
                              seed=args.seed, steps=steps, device=args.device, dtype=dtype)
    for path in write_outputs(report, videos, Path(args.out)):
        print(f"wrote {path}")
    return 0
