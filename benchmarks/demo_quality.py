"""Quality at equal compute on the demo model (issue 15): skipped-block compensation, per-head
(adaptive) budgets and shorter dense warm-ups against RainFusion2.0's default, PSNR / SSIM /
cosine against dense on the same captions and seeds (16 clips, 30 steps: those of
``rainfusion demo``).

Per variant: ``mean_density``, the fraction of dense attention computed over the whole schedule
(warm-up included), and ``overhead``, the compensation's extra compute as a fraction of dense
attention over the schedule; ``compute`` is their sum. Writes the issue's JSON
(``checkpoints[]`` of {``tokens``, ``rows[]``}) and a quality-vs-compute plot.

    python benchmarks/demo_quality.py [--checkpoints PATH ...  (default: both shipped checkpoints)] [--device cuda] [--out results.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from rainfusion.config import method_config
from rainfusion.tools.demo.run import EMBEDDED, EMBEDDED_16K, Variant, run_demo


def variants() -> list[Variant]:
    """Dense first, then the default and the new options, alone and together."""
    def v2(label: str, **fields: object) -> Variant:
        return Variant(label, method_config("rainfusion2", **fields))

    return [
        Variant("dense", None),
        v2("v2 0.8 (default)"),
        v2("v2 0.8 compensated", compensate=True),
        v2("v2 0.8 adaptive", selection="adaptive"),
        v2("v2 0.8 adaptive compensated", selection="adaptive", compensate=True),
        v2("v2 0.8 compensated warm-up 0.2", compensate=True, warmup_fraction=0.2),
        v2("v2 0.8 compensated warm-up 0.1", compensate=True, warmup_fraction=0.1),
        v2("v2 0.8 adaptive warm-up 0.2", selection="adaptive", warmup_fraction=0.2),
        v2("v2 0.7 warm-up 0.2", sparsity=0.7, warmup_fraction=0.2),
        v2("v2 0.6", sparsity=0.6),
        Variant("v1 0.5", method_config("rainfusion")),
        Variant("v1 0.5 compensated", method_config("rainfusion", compensate=True)),
        v2("v2 0.8 fp8", precision="fp8"),
        Variant("v1 0.5 fp8", method_config("rainfusion", precision="fp8")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", default=[str(EMBEDDED), str(EMBEDDED_16K)])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="+", help="run only these variants (dense always runs first)")
    parser.add_argument("--out")
    parser.add_argument("--plot")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    report = dict(card=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  date=datetime.date.today().isoformat(), torch=torch.__version__, clips=args.clips, steps=args.steps,
                  checkpoints=[])
    for checkpoint in args.checkpoints:
        chosen = [v for v in variants() if v.config is None or args.only is None or v.name in args.only]
        if args.only and len(chosen) != len(args.only) + 1:
            raise ValueError(f"--only names unknown variants: {sorted(set(args.only) - {v.name for v in chosen})}")
        demo, _ = run_demo(checkpoint, variant_list=chosen, clips=args.clips, steps=args.steps,
                           device=args.device, dtype=dtype, log=lambda line: None)
        spec = demo["spec"]
        rows = [dict(variant=r["variant"], psnr=r["psnr"], ssim=r["ssim"], cosine=r["cosine"],
                     mean_density=r["density"], overhead=r["overhead"], compute=r["density"] + r["overhead"],
                     seconds=r["seconds"]) for r in demo["rows"]]
        report["checkpoints"].append(dict(checkpoint=checkpoint, spec=spec, tokens=demo["tokens"], rows=rows))
        print(f"{checkpoint}: {report['checkpoints'][-1]['tokens']} tokens")
        print(f"  {'variant':<34} {'PSNR':>6} {'SSIM':>6} {'cosine':>7} {'density':>8} {'overhead':>8} {'compute':>8}")
        for r in rows:
            print(f"  {r['variant']:<34} {r['psnr']:>6.2f} {r['ssim']:>6.3f} {r['cosine']:>7.4f} "
                  f"{r['mean_density']:>8.3f} {r['overhead']:>8.4f} {r['compute']:>8.3f}")
        if args.out:  # after each checkpoint: a run stopped by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    if args.plot:
        _plot(report, args.plot)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry, marker in zip(report["checkpoints"], "os^D"):
        rows = entry["rows"][1:]
        ax.scatter([r["compute"] for r in rows], [r["psnr"] for r in rows], s=30, marker=marker,
                   label=f"{entry['tokens']:,} tokens")
        for r in rows:
            ax.annotate(r["variant"], (r["compute"], r["psnr"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=8)
    ax.set(xlabel="compute (fraction of dense attention over the schedule)", ylabel="PSNR vs dense (dB)",
           title=f"demo model, {report['card']}: quality vs compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
