"""Command line: ``rainfusion bench``, ``rainfusion generate`` and ``rainfusion demo``."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_for(name: str, device: str) -> torch.dtype:
    """``--dtype``: a named dtype, or for "auto" bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import check_report, format_table, run_bench, save_json

    report, states = run_bench(
        args.preset, methods=args.methods, batch=args.batch, heads=args.heads, device=args.device,
        dtype=dtype_for(args.dtype, args.device), seed=args.seed, repeats=args.repeats, backend=args.backend,
        progress=not args.no_progress,
    )
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_bench

        plot_bench(report, states, args.plot)
        print(f"wrote {args.plot}")
    problems = check_report(report)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import main_generate

    return main_generate(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import main_demo

    return main_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import METHODS, PRESETS
    from .generate import METHODS as GENERATE_METHODS

    parser = argparse.ArgumentParser(prog="rainfusion", description="Training-free sparse attention for video DiTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="dense vs RainFusion variants on synthetic video attention")
    bench.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="attention shape (default: small, a laptop-CPU size)")
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods to run (default: all)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, help="override the preset's head count (fewer = faster)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                       help="auto: bfloat16 on CUDA (what the GPU kernels take), float32 on CPU")
    bench.add_argument("--backend", default="auto", choices=["auto", "triton", "portable"])
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median)")
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.add_argument("--plot", help="write a PNG: error vs density, head patterns, a block mask")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    generate = commands.add_parser(
        "generate", help="generate a video with a diffusers pipeline and RainFusion (optionally vs dense)")
    generate.add_argument("--model", required=True, help="diffusers pipeline directory or hub id (cached locally)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--method", default="rainfusion2", choices=list(GENERATE_METHODS))
    generate.add_argument("--sparsity", type=float, help="fraction skipped (default: the method's, 0.5 v1 / 0.8 v2)")
    generate.add_argument("--steps", type=int, default=50, help="denoising steps (num_inference_steps)")
    generate.add_argument("--out", default="video.mp4", help="output video; a GIF next to it without an MP4 encoder")
    generate.add_argument("--compare", action="store_true",
                          help="also generate densely with the same seed (<out>_dense), print PSNR / SSIM / times")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--frames", type=int, help="num_frames (default: the pipeline's)")
    generate.add_argument("--height", type=int, help="default: the pipeline's")
    generate.add_argument("--width", type=int, help="default: the pipeline's")
    generate.add_argument("--guidance-scale", type=float, help="default: the pipeline's")
    generate.add_argument("--block-size", type=int, choices=[64, 128], help="attention block (default: 128)")
    generate.add_argument("--fps", type=int, default=16)
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                          help="auto: bfloat16 on CUDA, float32 on CPU")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo", help="quality of RainFusion on the demo video model: PSNR / SSIM vs dense, density, time")
    demo.add_argument("--checkpoint", help="demo model weights (default: the embedded model)")
    demo.add_argument("--quick", action="store_true", help="fewer clips, steps and variants (CPU in minutes)")
    demo.add_argument("--sensitivity", action="store_true",
                      help="instead of the methods: v2 0.8 sparse in one layer at a time, and longer dense warm-ups")
    demo.add_argument("--clips", type=int, help="caption/seed pairs (default: 16, 1 with --quick)")
    demo.add_argument("--steps", type=int, help="sampling steps (default: 30, 8 with --quick)")
    demo.add_argument("--block-size", type=int, default=128, choices=[64, 128], help="attention block")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo", help="folder for demo.json, demo.gif, demo-quality.png")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                      help="auto: bfloat16 on CUDA, float32 on CPU")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
