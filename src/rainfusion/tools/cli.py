"""Command line: ``rainfusion bench``, ``rainfusion generate`` and ``rainfusion demo``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import torch

from .._validation import require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = TypeVar("T")


def dtype_for(name: str, device: str) -> torch.dtype:
    """``--dtype``: a named dtype, or for "auto" bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# argparse ``type=`` callables: a bad value is a one-line parser error naming the option


def _checked(text: str, parse: Callable[[str], T], accept: Callable[[T], bool], expected: str) -> T:
    """``parse(text)`` when it parses and ``accept`` takes it, else "expected <expected>, got <text>"."""
    try:
        value = parse(text)
    except ValueError:
        pass
    else:
        if accept(value):
            return value
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive_int(text: str) -> int:
    """Counts and sizes: an integer >= 1."""
    return _checked(text, int, lambda n: n >= 1, "an integer >= 1")


def seed_int(text: str) -> int:
    """A random seed: what ``torch.Generator.manual_seed`` takes, from 0."""
    return _checked(text, int, lambda n: 0 <= n < 2**64, "an integer in [0, 2**64)")


def sparsity_fraction(text: str) -> float:
    """The fraction of attention skipped: in [0, 1)."""
    return _checked(text, float, lambda x: 0 <= x < 1, "a number in [0, 1)")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, lambda x: 0 <= x < math.inf, "a finite number >= 0")


def available_device(text: str) -> str:
    """A torch device string whose device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda, cuda:1 or mps, got {text!r}") \
            from None
    if device.type == "cpu":
        return text
    if device.type == "cuda" and not torch.backends.cuda.is_built():
        raise argparse.ArgumentTypeError(f"this torch has no CUDA (a CPU-only build), got {text!r}; use --device cpu")
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not hasattr(backend, "is_available"):
        raise argparse.ArgumentTypeError(f"expected a device to compute on (cpu, cuda, mps, xpu), got {text!r}")
    count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"no {device.type} device is available here, got {text!r}; use --device cpu")
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(
            f"this machine has {count} {device.type} device(s), {device.type}:0 to {device.type}:{count - 1}, "
            f"got {text!r}")
    return text


def _writable(text: str, folder: bool) -> str:
    """``text`` when a file (with ``folder``, a folder) can be written there: it is not the other kind,
    and its nearest existing ancestor is a writable folder (the commands create the missing ones)."""
    path = Path(text)
    if path.exists() and path.is_dir() != folder:
        expected, found = ("a folder", "a file") if folder else ("a file name", "a folder")
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}, which is {found}")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"expected a path that can be written, got {text!r}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"expected a path that can be written, got {text!r}: {existing} is read-only")
    return text


def output_file(text: str) -> str:
    """A file to write (its missing folders are created)."""
    return _writable(text, folder=False)


def output_folder(text: str) -> str:
    """A folder to write files in (created when missing)."""
    return _writable(text, folder=True)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line like the commands' own: ``error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def _bench(args: argparse.Namespace) -> int:
    from .bench import check_report, format_table, run_bench, save_json

    if args.plot:
        from .plots import plot_bench  # without matplotlib: fails here, before the benchmark runs
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
        plot_bench(report, states, args.plot)
        print(f"wrote {args.plot}")
    problems = check_report(report)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _generate(args: argparse.Namespace) -> int:
    require("diffusers", "rainfusion generate", "diffusers")
    from .generate import generate

    generate(model=args.model, prompt=args.prompt, method=args.method, sparsity=args.sparsity, steps=args.steps,
             out=args.out, compare=args.compare, seed=args.seed, frames=args.frames, height=args.height,
             width=args.width, guidance_scale=args.guidance_scale, device=args.device,
             dtype=dtype_for(args.dtype, args.device), block_size=args.block_size, fps=args.fps,
             progress=not args.no_progress)
    return 0


def _demo(args: argparse.Namespace) -> int:
    for module in ("diffusers", "safetensors"):
        require(module, "rainfusion demo", "demo")
    from .demo.run import main_demo

    return main_demo(args, dtype_for(args.dtype, args.device))


def build_parser() -> argparse.ArgumentParser:
    from ..config import METHODS as NAMED_METHODS
    from .bench import METHODS, PRESETS

    parser = OneLineErrorParser(prog="rainfusion", description="Training-free sparse attention for video DiTs.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="dense vs RainFusion variants on synthetic video attention")
    bench.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="attention shape (default: small, a laptop-CPU size)")
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods to run (default: all)")
    bench.add_argument("--batch", type=positive_int, default=1)
    bench.add_argument("--heads", type=positive_int, help="override the preset's head count (fewer = faster)")
    bench.add_argument("--device", type=available_device, default=DEFAULT_DEVICE)
    bench.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                       help="auto: bfloat16 on CUDA (what the GPU kernels take), float32 on CPU")
    bench.add_argument("--backend", default="auto", choices=["auto", "triton", "portable"])
    bench.add_argument("--seed", type=seed_int, default=0)
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per method (median)")
    bench.add_argument("--json", type=output_file, help="write the results to this JSON file")
    bench.add_argument("--plot", type=output_file, help="write a PNG: error vs density, head patterns, a block mask")
    bench.add_argument("--no-progress", action="store_true", help="no progress lines")
    bench.set_defaults(run=_bench)

    generate = commands.add_parser(
        "generate", help="generate a video with a diffusers pipeline and RainFusion (optionally vs dense)")
    generate.add_argument("--model", required=True, help="diffusers pipeline directory or hub id (cached locally)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--method", default="rainfusion2", choices=list(NAMED_METHODS))
    generate.add_argument("--sparsity", type=sparsity_fraction,
                          help="fraction skipped (default: the method's, 0.5 v1 / 0.8 v2)")
    generate.add_argument("--steps", type=positive_int, default=50, help="denoising steps (num_inference_steps)")
    generate.add_argument("--out", type=output_file, default="video.mp4",
                          help="output video; a GIF next to it without an MP4 encoder")
    generate.add_argument("--compare", action="store_true",
                          help="also generate densely with the same seed (<out>_dense), print PSNR / SSIM / times")
    generate.add_argument("--seed", type=seed_int, default=0)
    generate.add_argument("--frames", type=positive_int, help="num_frames (default: the pipeline's)")
    generate.add_argument("--height", type=positive_int, help="default: the pipeline's")
    generate.add_argument("--width", type=positive_int, help="default: the pipeline's")
    generate.add_argument("--guidance-scale", type=non_negative_float, help="default: the pipeline's")
    generate.add_argument("--block-size", type=int, choices=[64, 128], help="attention block (default: 128)")
    generate.add_argument("--fps", type=positive_int, default=16)
    generate.add_argument("--device", type=available_device, default=DEFAULT_DEVICE)
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
    demo.add_argument("--clips", type=positive_int, help="caption/seed pairs (default: 16, 1 with --quick)")
    demo.add_argument("--steps", type=positive_int, help="sampling steps (default: 30, 8 with --quick)")
    demo.add_argument("--block-size", type=int, default=128, choices=[64, 128], help="attention block")
    demo.add_argument("--seed", type=seed_int, default=0)
    demo.add_argument("--out", type=output_folder, default="demo",
                      help="folder for demo.json, demo.gif, demo-quality.png")
    demo.add_argument("--device", type=available_device, default=DEFAULT_DEVICE)
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
