"""Nsight Compute profiles of our block-sparse kernel in source trees side by side, on one GPU: why
one tree's kernel is slower than another's when their instructions are the same.

Each tree (``LABEL=PATH`` of a ``src`` folder, as for ``compare_trees.py``) runs one call under
``ncu --set full`` (the clocks left alone, one launch of the kernel profiled after a warm-up
call) at a preset's token count with ``--heads`` heads and ``--keep`` random key blocks per
query block. The table gives each tree's duration, cycles, issue and eligibility rates and the
warp stall reasons (cycles per issued instruction, largest first); each tree's full raw page is
written as ``LABEL.csv`` under ``--out`` for the rest, and its per-instruction page (every SASS
instruction with its sampled warp stalls) as ``LABEL-sass.csv``, summarised by
``--hot`` instructions of the most samples; the report itself is ``LABEL.ncu-rep``.

    python benchmarks/profile_trees.py --trees main=.trees/main/src new=.trees/new/src
        [--preset hunyuan-720p] [--heads 2] [--keep 931] [--precision fp8] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys

from compare_trees import parse_trees, tree_environment

HEADLINE = {  # raw metric -> what the table calls it
    "gpu__time_duration.sum": "duration",
    "gpc__cycles_elapsed.max": "cycles elapsed",
    "smsp__inst_executed.sum": "instructions",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue active %",
    "smsp__warps_eligible.avg.per_cycle_active": "eligible warps per scheduler",
    "launch__registers_per_thread": "registers",
}
STALL = re.compile(r"smsp__\w*issue_stalled_(\w+?)_per_issue_active\.ratio")  # cycles per issued instruction


def run_call(preset: str, heads: int, keep: int, precision: str) -> None:
    """(in the tree's process, under ncu) a warm-up call, then the profiled one."""
    import torch

    from compare_trees import keep_mask, random_inputs
    from rainfusion import block_sparse_attention

    q, k, v = random_inputs(preset, heads)
    mask, _ = keep_mask(heads, q.shape[2], keep)
    for _ in range(2):
        block_sparse_attention(q, k, v, mask, backend="triton", precision=precision)
    torch.cuda.synchronize()


def read_raw_page(text: str) -> dict[str, tuple[str, str]]:
    """ncu's ``--page raw --csv`` output (one kernel) -> metric: (value, unit)."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    has_units = len(rows) > 1 and rows[1][0] == ""  # (a row of units under the names, when ncu gives one)
    if len(rows) < 2 + has_units:
        raise ValueError(f"no profiled kernel in ncu's output:\n{text[-2000:]}")
    names, values = rows[0], rows[1 + has_units]
    units = rows[1] if has_units else [""] * len(names)
    return {name: (value, unit) for name, unit, value in zip(names, units, values)}


def export_page(ncu: str, report: str, page: list[str], path: str) -> str:
    """One page of a saved ncu report as CSV text, also written to ``path``."""
    text = subprocess.run([ncu, "--import", report, "--csv", *page], capture_output=True, text=True).stdout
    with open(path, "w") as f:
        f.write(text)
    return text


def print_hot_instructions(label: str, text: str, count: int) -> None:
    """The ``count`` SASS instructions with the most warp samples (ncu's source page), each with
    its share of all samples and its two largest stall reasons."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), len(lines))  # (a kernel line first)
    rows = list(csv.DictReader(lines[start:]))
    column = next((c for c in (rows[0] if rows else {}) if c.startswith("Warp Stall Sampling (All")), None)
    if column is None:
        print(f"tree {label}: no per-instruction samples in ncu's source page; its columns: "
              f"{list(rows[0]) if rows else text[:500]}")
        return
    samples = [as_number(r[column]) for r in rows]
    total = sum(samples) or 1.0
    reasons = [c for c in rows[0] if c.startswith("stall_") and not c.endswith("(Not Issued)")]
    base = int(rows[0]["Address"], 16)  # (offsets from the kernel's start: as in kernel_report.py's SASS)
    print(f"{label}: the {count} instructions of the most warp samples ({total:.0f} samples)")
    for n, r in sorted(zip(samples, rows), key=lambda pair: -pair[0])[:count]:
        top = sorted(((as_number(r[c]), c) for c in reasons), reverse=True)[:2]
        why = ", ".join(f"{c} {v / max(n, 1):.0%}" for v, c in top if v > 0)
        print(f"  {int(r['Address'], 16) - base:#08x} {100 * n / total:5.1f}%  {r.get('Source', '')[:60]:60s} {why}")


def as_number(value: str) -> float:
    return float(value.replace(",", "")) if value not in ("", "n/a") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", help="LABEL=PATH of a src folder")
    parser.add_argument("--preset", default="hunyuan-720p")
    parser.add_argument("--heads", type=int, default=2, help="heads of the call (fewer than the preset's: shorter)")
    parser.add_argument("--keep", type=int, default=10**6, help="key blocks per query block (default: all)")
    parser.add_argument("--precision", default="fp8", choices=["fp8", "native"])
    parser.add_argument("--timeout", type=float, default=150, help="seconds a tree's profile may take")
    parser.add_argument("--out", default="/tmp/profiles", help="folder for each tree's raw page (LABEL.csv)")
    parser.add_argument("--hot", type=int, default=25, help="instructions of the most stall samples to print per tree")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # (the profiled process)
    args = parser.parse_args()
    if args.worker:
        run_call(args.preset, args.heads, args.keep, args.precision)
        return
    trees = parse_trees(args.trees)
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    os.makedirs(args.out, exist_ok=True)
    pages = {}
    for label, path in trees:
        report = os.path.join(args.out, f"{label}.ncu-rep")
        command = [ncu, "--clock-control", "none", "--set", "full", "--import-source", "no", "-k",
                   "regex:block_sparse_fwd", "--launch-skip", "1", "--launch-count", "1", "-f", "-o", report,
                   sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset,
                   "--heads", str(args.heads), "--keep", str(args.keep), "--precision", args.precision]
        try:
            done = subprocess.run(command, env=tree_environment(path), capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # the other trees go on
            print(f"tree {label} ({path}): no profile within --timeout {args.timeout:g} s", flush=True)
            continue
        raw = export_page(ncu, report, ["--page", "raw"], os.path.join(args.out, f"{label}.csv"))
        try:
            pages[label] = read_raw_page(raw)
        except ValueError as error:
            print(f"tree {label} ({path}): {error}\n{done.stdout[-1500:]}{done.stderr[-1500:]}", flush=True)
            continue
        sass = export_page(ncu, report, ["--page", "source", "--print-source", "sass"],
                           os.path.join(args.out, f"{label}-sass.csv"))
        print_hot_instructions(label, sass, args.hot)
    labels = list(pages)
    if not labels:
        raise RuntimeError("no tree gave a profile")
    print(f"{args.preset}, {args.heads} heads, {args.keep} key blocks per row at most, {args.precision}")
    print(f"{'':44s}" + "".join(f"{label:>18s}" for label in labels))
    for metric, name in HEADLINE.items():
        print(f"{name:44s}" + "".join(f"{pages[t].get(metric, ('n/a',))[0]:>18s}" for t in labels))
    first = pages[labels[0]]
    stalls = {STALL.fullmatch(m).group(1): m for m in first if STALL.fullmatch(m)}
    print("warp stalls, cycles per issued instruction:")
    for reason, metric in sorted(stalls.items(), key=lambda item: -as_number(first[item[1]][0])):
        print(f"  {reason:42s}" + "".join(f"{as_number(pages[t].get(metric, ('',))[0]):>18.3f}" for t in labels))


if __name__ == "__main__":
    main()
