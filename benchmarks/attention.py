"""Kernel benchmark on a GPU: dense baselines vs block-sparse backends with the same mask.

For each preset and density: SDPA cuDNN, SDPA flash, FA4 dense (once per preset), then with one
random 128-block mask (diagonal kept): compiled FlexAttention (its output checked against our
kernel's on the same mask), FA4 block-sparse, our kernel (BHND and BNHD inputs; the Gluon one on
Hopper, where the Triton one is timed too as ``triton-v3``), ``auto`` and, where it runs, the FP8
kernel (``triton-fp8``, its quantization included). Then RainFusion2.0 end to end at sparsity 0.8 split
into permute / predict / attention / un-permute (auto backend, and end to end on Triton), the v1
ARM and v1 end to end, and cuDNN once more for the run-to-run spread. Prints a table last and writes
JSON (card name and date inside).

    python benchmarks/attention.py --out results.json [--presets hunyuan-720p ...] [--densities 0.2 ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rainfusion import BlockSparseMask, RainFusion2Config, RainFusionConfig, block_sparse_attention, sparse_attention
from rainfusion.arm import recognise_heads
from rainfusion.backends import gather_tokens
from rainfusion.kernels import block_sparse
from rainfusion.kernels.block_sparse import block_sparse_attention_triton
from rainfusion.kernels.fa4 import block_sparse_attention_fa4, dense_attention_fa4, fa4_available
from rainfusion.methods import plan_attention
from rainfusion.reference import relative_l2
from rainfusion.tools.bench import PRESETS


def time_ms(fn, *, budget_ms: float = 1500.0, min_runs: int = 3, max_runs: int = 50, rest_s: float = 0.0) -> float:
    """Median of CUDA-event timings after one warm-up call (each call issued after a
    synchronisation, and with ``rest_s`` after the host slept that long: ``gpu_breakdown.py``)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    runs = int(min(max_runs, max(min_runs, budget_ms // max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(runs):
        time.sleep(rest_s)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn, calls: int = 20) -> tuple[float, float]:
    """(GPU ms per call, host ms per call) of ``calls`` calls issued back to back after a warm-up:
    the GPU time with the host running ahead (as in a model's forward, where other work keeps the
    queue full), and the host's time to issue one call. ``time_ms``'s single call is the larger of
    the two, roughly, where the host is the slower."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - began) * 1e3 / calls
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, host


def random_block_mask(batch: int, heads: int, n: int, density: float, block_size: int = 128,
                      seed: int = 0) -> BlockSparseMask:
    """ceil(density * blocks) random key blocks per query block, the diagonal always among them."""
    blocks = -(-n // block_size)
    keep = min(blocks, max(1, math.ceil(density * blocks - 1e-9)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(batch, heads, blocks, blocks, device="cuda", generator=g)
    scores += 2.0 * torch.eye(blocks, device="cuda")
    indices = torch.topk(scores, keep, dim=-1).indices.sort(-1).values.to(torch.int32)
    counts = torch.full((batch, heads, blocks), keep, dtype=torch.int32, device="cuda")
    return BlockSparseMask(counts, indices, n, n, block_size)


def bench_preset(name: str, densities: list[float], dtype: torch.dtype, with_flex: bool = True) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    spec = PRESETS[name]
    layout, heads, d = spec.layout, spec.heads, spec.head_dim
    n = layout.num_tokens
    scale = d**-0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    bnhd = [torch.randn(1, n, heads, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2).contiguous() for t in bnhd)  # [B, H, N, D] contiguous
    views = [t.transpose(1, 2) for t in bnhd]  # [B, H, N, D] views of [B, N, H, D] memory
    rows = []

    def add(provider: str, density: float, ms: float, **extra) -> None:
        rows.append(dict(preset=name, provider=provider, density=density, ms=ms, **extra))

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        add("sdpa-cudnn", 1.0, time_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        add("sdpa-flash", 1.0, time_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    has_fa4 = fa4_available()
    if has_fa4:
        add("fa4-dense", 1.0, time_ms(lambda: dense_attention_fa4(*views, scale=scale)))

    flex = torch.compile(flex_attention, dynamic=False)
    for density in densities:
        mask = random_block_mask(1, heads, n, density)
        realized = float(mask.density().mean())
        if with_flex:
            flex_mask = mask.to_flex_block_mask()
            # the same mask on both: FlexAttention's output against our kernel's (bf16 rounding ~3e-3)
            agreement = relative_l2(flex(q, k, v, block_mask=flex_mask, scale=scale),
                                    block_sparse_attention(q, k, v, mask, backend="triton"))
            add("flex", density, time_ms(lambda: flex(q, k, v, block_mask=flex_mask, scale=scale)),
                realized=realized, rel_l2_vs_triton=agreement)
        if has_fa4:
            add("fa4-sparse", density, time_ms(lambda: block_sparse_attention_fa4(*views, mask, scale=scale)),
                realized=realized)
        add("triton", density, time_ms(lambda: block_sparse_attention(q, k, v, mask, backend="triton")),
            realized=realized)
        add("triton-bnhd", density, time_ms(lambda: block_sparse_attention(*views, mask, backend="triton")),
            realized=realized)
        if block_sparse._gluon_refusal(q, k, v, mask.block_size) is None:  # "triton" ran Gluon: time v3 too
            add("triton-v3", density,
                time_ms(lambda: block_sparse_attention_triton(q, k, v, mask, scale=scale, kernel="triton")),
                realized=realized)
        add("auto", density, time_ms(lambda: block_sparse_attention(q, k, v, mask)), realized=realized)
        if block_sparse.fp8_refusal(q, mask.block_size) is None:  # FP8 (quantization included), vs our bf16
            fp8 = lambda: block_sparse_attention(q, k, v, mask, backend="triton", precision="fp8")  # noqa: E731
            add("triton-fp8", density, time_ms(fp8), realized=realized,
                rel_l2_vs_triton=relative_l2(fp8(), block_sparse_attention(q, k, v, mask, backend="triton")))

    # RainFusion2.0 end to end at its video preset, and its parts
    config = RainFusion2Config()
    plan = plan_attention(q, k, layout, config, scale)  # block means read through the order, then top-N
    permuted = [gather_tokens(t, plan.order) for t in (q, k, v)]
    v2_density = float(plan.mask.density().mean())
    add("v2-permute", v2_density, time_ms(lambda: [gather_tokens(t, plan.order) for t in (q, k, v)]))
    add("v2-predict", v2_density, time_ms(lambda: plan_attention(q, k, layout, config, scale)))
    add("v2-attention", v2_density, time_ms(lambda: block_sparse_attention(*permuted, plan.mask)))
    add("v2-unpermute", v2_density, time_ms(lambda: gather_tokens(permuted[0], plan.inverse)))
    add("v2-end-to-end", v2_density, time_ms(lambda: sparse_attention(q, k, v, layout=layout, config=config)))
    add("v2-end-to-end-triton", v2_density,
        time_ms(lambda: sparse_attention(q, k, v, layout=layout, config=config, backend="triton")))
    for label, variant in (("compensated", RainFusion2Config(compensate=True)),
                           ("adaptive", RainFusion2Config(selection="adaptive")),
                           ("fp8", RainFusion2Config(precision="fp8"))):
        add(f"v2-end-to-end-{label}", v2_density,
            time_ms(lambda: sparse_attention(q, k, v, layout=layout, config=variant)))
    v1 = RainFusionConfig()
    add("v1-arm", 0.5, time_ms(lambda: recognise_heads(q, k, layout, v1, scale=scale)))
    add("v1-end-to-end", 0.5, time_ms(lambda: sparse_attention(q, k, v, layout=layout, config=v1)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # the baseline again: run-to-run spread
        add("sdpa-cudnn-again", 1.0, time_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    return rows


def summary(rows: list[dict]) -> str:
    lines = [f"{'preset':<15} {'provider':<14} {'density':>7} {'ms':>9} {'vs cuDNN':>8}  check"]
    cudnn = {r["preset"]: r["ms"] for r in rows if r["provider"] == "sdpa-cudnn"}
    for r in rows:
        check = f"  rel L2 vs ours {r['rel_l2_vs_triton']:.4f}" if "rel_l2_vs_triton" in r else ""
        lines.append(f"{r['preset']:<15} {r['provider']:<14} {r.get('realized', r['density']):>7.3f} "
                     f"{r['ms']:>9.2f} {cudnn[r['preset']] / r['ms']:>7.2f}x{check}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["wan-1.3b-480p", "cogvideox-5b", "wan-14b-720p", "hunyuan-720p"])
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compiles are slow)")
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    report = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                  dtype=args.dtype, fa4=fa4_available(), rows=[])
    for name in args.presets:
        report["rows"] += bench_preset(name, args.densities, dtype, with_flex=not args.no_flex)
        torch.cuda.empty_cache()
        if args.out:  # after each preset: a run stopped by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    rows = report["rows"]
    print(f"{report['card']}  {report['date']}  torch {report['torch']}  {args.dtype}")
    print(summary(rows))


if __name__ == "__main__":
    main()
