"""Same-call timings of source trees against each other: a kernel change against main, on one GPU.

Each tree (``LABEL=PATH`` of a ``src`` folder, e.g. main's copied by ``git archive HEAD src | tar
-x -C .before``) runs in its own process, the trees in turn for ``--rounds`` rounds, so that the
clock and the card's state drift evenly over them. A process times our block-sparse kernel
(``backend="triton"``) with FP8 and in bf16 at ``--keeps`` random key blocks per query block and
v2 0.8 end to end with both, at one preset, and SDPA cuDNN dense as the baseline of the end to
end ratios: each call once, as ``benchmarks/attention.py`` times it, and up to 20 back to back
(the GPU's and the host's time per call: where the host is the slower, the single call's time
is the host's). Each of our outputs' sum of squares comes along, so that a refactor meant to
leave the arithmetic alone shows it did (equal sums across trees). The tables give each tree's
median over rounds and its speed-up over the first tree.

    python benchmarks/compare_trees.py --trees main=.before/src new=src [--preset hunyuan-720p]
        [--keeps 1 186 931] [--precisions fp8 native] [--rounds 2] [--out compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_trees(values: list[str] | None) -> list[tuple[str, str]]:
    """``--trees`` LABEL=PATH values -> (label, path) pairs."""
    trees = [tuple(value.split("=", 1)) for value in values or []]
    if not trees or any(len(tree) != 2 for tree in trees):
        raise ValueError(f"--trees takes LABEL=PATH pairs, got {values}")
    return trees


def tree_environment(path: str) -> dict:
    """The environment of a tree's process: its ``src`` folder and this one on the path."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(path), HERE]))


def random_inputs(preset: str, heads: int | None = None):
    """(in a tree's process) bf16 q, k, v [1, heads (the preset's by default), N, D] on CUDA at
    a preset's token count, the same in every tree."""
    import torch

    from rainfusion.tools.bench import PRESETS

    spec = PRESETS[preset]
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, heads or spec.heads, spec.layout.num_tokens, spec.head_dim)
    return tuple(torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))


def keep_mask(heads: int, n: int, keep: int):
    """(mask, kept): ``random_block_mask`` with ``keep`` key blocks per query block (at most all)."""
    from attention import random_block_mask

    blocks = -(-n // 128)
    kept = min(keep, blocks)
    return random_block_mask(1, heads, n, kept / blocks), kept


def our_calls(preset: str, keeps: list[int], precisions: list[str]):
    """((q, k, v) of ``random_inputs``, what -> a zero-argument call): our kernel at each of
    ``keeps`` random key blocks per query block and v2 0.8 end to end, in each of
    ``precisions``."""
    from rainfusion import RainFusion2Config, block_sparse_attention, sparse_attention
    from rainfusion.tools.bench import PRESETS

    spec = PRESETS[preset]
    q, k, v = random_inputs(preset)
    calls = {}
    for keep in keeps:
        mask, kept = keep_mask(spec.heads, spec.layout.num_tokens, keep)
        for precision in precisions:
            calls[f"{precision} {kept} blocks"] = (
                lambda mask=mask, precision=precision: block_sparse_attention(q, k, v, mask, backend="triton",
                                                                              precision=precision))
    for precision in precisions:
        config = RainFusion2Config(precision=precision)
        calls[f"v2 end to end {precision}"] = (
            lambda config=config: sparse_attention(q, k, v, layout=spec.layout, config=config, backend="triton"))
    return (q, k, v), calls


def measure(preset: str, keeps: list[int], precisions: list[str]) -> list[dict]:
    """(in the tree's process) rows of what, ms (one call, ``time_ms``), back_to_back_ms and
    host_ms (GPU and host time per call of up to 20 issued back to back), checksum."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention import back_to_back_ms, time_ms

    (q, k, v), calls = our_calls(preset, keeps, precisions)

    def row(what, fn, checksum=True):
        ms = time_ms(fn)
        gpu, host = back_to_back_ms(fn, calls=max(3, min(20, round(1000 / ms))))
        return dict(what=what, ms=ms, back_to_back_ms=gpu, host_ms=host,
                    checksum=float(fn().double().pow(2).sum()) if checksum else 0.0)

    rows = [row(what, fn) for what, fn in calls.items()]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # the end-to-end ratios' baseline, in the same process
        rows.append(row("sdpa cudnn dense", lambda: F.scaled_dot_product_attention(q, k, v), checksum=False))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", help="LABEL=PATH of a src folder, the reference first")
    parser.add_argument("--preset", default="hunyuan-720p")
    parser.add_argument("--keeps", nargs="+", type=int, default=[1, 186, 931], help="key blocks per query block")
    parser.add_argument("--precisions", nargs="+", default=["fp8", "native"], choices=["fp8", "native"],
                        help="our kernel's (native: bf16; only fp8 when a change leaves bf16's kernel as it is)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=150, help="seconds a tree's process may take (a hang)")
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # (a tree's process: JSON rows on stdout)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.preset, args.keeps, args.precisions)))
        return
    trees = parse_trees(args.trees)
    rows, failed = [], set()
    for round_ in range(args.rounds):
        for label, path in trees:
            if label in failed:
                continue
            try:
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", label, "--preset",
                                       args.preset, "--keeps", *map(str, args.keeps),
                                       "--precisions", *args.precisions],
                                      env=tree_environment(path), capture_output=True, text=True,
                                      timeout=args.timeout)
                error = done.stderr[-3000:] if done.returncode != 0 else None
            except subprocess.TimeoutExpired:
                error = f"no result within --timeout {args.timeout:g} s (a hang?)"
            if error is not None:  # the other trees go on; this one leaves the table
                print(f"tree {label} ({path}) failed in round {round_}:\n{error}", flush=True)
                failed.add(label)
                continue
            rows += [dict(row, tree=label, round=round_) for row in json.loads(done.stdout.splitlines()[-1])]
    labels = [label for label, _ in trees if label not in failed]
    if not labels or labels[0] != trees[0][0]:
        raise RuntimeError(f"the reference tree {trees[0][0]} gave no timings")
    whats = list(dict.fromkeys(row["what"] for row in rows))
    print(f"{args.preset}: median ms of {args.rounds} rounds (speed-up over {labels[0]}); '=': equal output checksums")
    for key, title in (("ms", "one call"), ("back_to_back_ms", "GPU per call, 20 back to back"),
                       ("host_ms", "host per call, 20 back to back")):
        median = {(w, t): statistics.median(r[key] for r in rows if r["what"] == w and r["tree"] == t)
                  for w in whats for t in labels}
        print(f"{title:28s}" + "".join(f"{label:>22s}" for label in labels))
        for w in whats:
            sums = {r["checksum"] for r in rows if r["what"] == w}
            cells = "".join(f"{median[w, t]:>12.3f} ({median[w, labels[0]] / median[w, t]:5.3f}x)" for t in labels)
            print(f"{w:26s}{'=' if len(sums) == 1 else ' '} {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
