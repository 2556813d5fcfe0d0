"""Command line: ``rainfusion bench``."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import check_report, format_table, run_bench, save_json

    report, states = run_bench(
        args.preset, methods=args.methods, batch=args.batch, heads=args.heads, device=args.device,
        dtype=DTYPES[args.dtype], seed=args.seed, repeats=args.repeats, backend=args.backend,
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


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import METHODS, PRESETS

    parser = argparse.ArgumentParser(prog="rainfusion", description="Training-free sparse attention for video DiTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="dense vs RainFusion variants on synthetic video attention")
    bench.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="attention shape (default: small, a laptop-CPU size)")
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods to run (default: all)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, help="override the preset's head count (fewer = faster)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--backend", default="auto", choices=["auto", "triton", "portable"])
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median)")
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.add_argument("--plot", help="write a PNG: error vs density, head patterns, a block mask")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
