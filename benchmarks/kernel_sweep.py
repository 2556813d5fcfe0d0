"""Launch-setting sweep of our Triton kernel on a GPU at density 1.0 and 0.2: query rows per
program, key tile, warps, stages and register cap (2 programs per SM need <= 128 registers at 8
warps). Each setting is checked against SDPA (density 1) before it is timed; the Gluon kernel
(Hopper's default) is off during the sweep. ``--gluon``: the Gluon kernel against the Triton
kernel's chosen setting instead of the sweep. ``--compensation``: the fused skipped-block
compensation kernel's settings (block means per step, warps, stages) at hunyuan-720p and the
parts that compensation adds to a v2 0.8 call. ``--fp8``: the FP8 Gluon kernel's ring stages
against the bf16 Gluon kernel at hunyuan-720p, and its quantization pre-pass alone.

    python benchmarks/kernel_sweep.py [--gluon | --compensation | --fp8]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import random_block_mask, time_ms
from rainfusion import RainFusion2Config, sparse_attention
from rainfusion.backends import block_means, gather_tokens, resolve_backend, run_block_sparse
from rainfusion.compensation import merge_with_estimate, skipped_block_estimate
from rainfusion.kernels import block_sparse, skipped_blocks
from rainfusion.kernels.block_sparse import block_sparse_attention_triton
from rainfusion.methods import plan_attention
from rainfusion.reference import relative_l2
from rainfusion.tools.bench import PRESETS

# head dim -> (BLOCK_Q, BLOCK_N, num_warps, num_stages, maxnreg) for 128-token mask blocks
SETTINGS = {
    128: [(128, 128, 8, 3, None), (128, 64, 8, 2, None), (128, 64, 8, 2, 128), (128, 32, 8, 3, 128),
          (128, 32, 8, 4, 128)],
    64: [(128, 64, 8, 3, None), (64, 128, 4, 2, None), (64, 128, 4, 3, None), (128, 128, 8, 2, 128),
         (128, 128, 8, 3, 128), (128, 64, 8, 3, 128)],
}
# heads, tokens, head dim, settings (None: all of SETTINGS[head dim])
SHAPES = [(24, 32768, 128, None), (48, 17550, 64, None),
          (24, 119056, 128, [(128, 128, 8, 3, None), (128, 64, 8, 2, 128), (128, 32, 8, 3, 128)])]  # hunyuan-720p


# (block means per step, warps, stages)
COMPENSATION_SETTINGS = [(64, 8, 3), (32, 4, 4), (32, 4, 3), (32, 4, 5), (16, 4, 4), (32, 8, 4), (64, 4, 3),
                         (128, 8, 2)]


def compensation_sweep() -> None:
    """v2 0.8 at hunyuan-720p: the compensation kernel per setting (checked against the float32
    torch estimate), then each part compensation adds, timed alone."""
    spec = PRESETS["hunyuan-720p"]
    n, heads, d = spec.layout.num_tokens, spec.heads, spec.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = d**-0.5
    plan = plan_attention(q, k, spec.layout, RainFusion2Config(), scale)
    pq, pk, pv = (gather_tokens(t, plan.order) for t in (q, k, v))
    mask = plan.mask
    backend = resolve_backend("auto", pq, mask.block_size, padded_keys=False, grad=False)
    exact, lse = run_block_sparse(backend, pq, pk, pv, mask, scale, return_lse=True)
    k_mean, v_mean = (block_means(t, mask.block_size) for t in (pk, pv))
    kept = mask.to_dense()
    reference = merge_with_estimate(exact, lse, *skipped_block_estimate(pq, k_mean, v_mean, mask, scale))
    print(f"hunyuan-720p N={n} H={heads} D={d}, v2 0.8 realized density {float(mask.density().mean()):.3f}, "
          f"block-sparse backend {backend}")

    def fused():
        return skipped_blocks.compensate_triton(pq, k_mean, v_mean, kept, exact, lse, mask.block_size, n, scale)

    default = skipped_blocks.CONFIGS[128]
    for setting in COMPENSATION_SETTINGS:
        skipped_blocks.CONFIGS[128] = setting
        try:
            error = relative_l2(fused(), reference)
            ms = time_ms(fused, budget_ms=600)
        except Exception as exc:  # out of resources for this setting
            print(f"  {setting}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
            continue
        print(f"  compensation kernel {setting}: {ms:.2f} ms, rel L2 vs torch estimate {error:.1e}", flush=True)
    skipped_blocks.CONFIGS[128] = default
    parts = {
        "block-sparse kernel": lambda: run_block_sparse(backend, pq, pk, pv, mask, scale),
        "block-sparse kernel + lse": lambda: run_block_sparse(backend, pq, pk, pv, mask, scale, return_lse=True),
        "block means k, v": lambda: [block_means(t, mask.block_size) for t in (pk, pv)],
        "mask.to_dense": mask.to_dense,
        "compensation kernel": fused,
        "v2 end to end": lambda: sparse_attention(q, k, v, layout=spec.layout, config=RainFusion2Config()),
        "v2 end to end compensated": lambda: sparse_attention(q, k, v, layout=spec.layout,
                                                              config=RainFusion2Config(compensate=True)),
    }
    for label, fn in parts.items():
        print(f"  {label:<28} {time_ms(fn, budget_ms=800):8.2f} ms", flush=True)


def fp8_sweep() -> None:
    """hunyuan-720p at densities 1.0 and 0.2: bf16 Gluon kernel, then FP8 per ring-stage count
    (quantization included; rel L2 against the bf16 output), then the pre-pass alone."""
    from rainfusion.kernels.fp8 import quantize_attention_inputs

    spec = PRESETS["hunyuan-720p"]
    n, heads, d = spec.layout.num_tokens, spec.heads, spec.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    masks = {density: random_block_mask(1, heads, n, density) for density in (1.0, 0.2)}
    flops = 4 * n * n * d * heads
    for density, mask in masks.items():
        native = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel="gluon")
        ms = time_ms(lambda: block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel="gluon"), budget_ms=800)
        print(f"density {density}: bf16 Gluon {ms:.2f} ms ({density * flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
        for stages in (3, 4):
            block_sparse.FP8_STAGES = stages
            run = lambda: block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, precision="fp8")  # noqa: E731
            error = relative_l2(run(), native)
            fp8_ms = time_ms(run, budget_ms=800)
            print(f"  fp8 stages={stages}: {fp8_ms:.2f} ms ({ms / fp8_ms:.2f}x bf16), rel L2 vs bf16 {error:.4f}",
                  flush=True)
    print(f"  quantization pre-pass: {time_ms(lambda: quantize_attention_inputs(q, k, v, 128), budget_ms=500):.3f} ms")


def main() -> None:
    print(torch.cuda.get_device_name())
    if "--compensation" in sys.argv[1:]:
        return compensation_sweep()
    if "--fp8" in sys.argv[1:]:
        return fp8_sweep()
    gluon = "--gluon" in sys.argv[1:]
    shapes = [(h, n, d, [block_sparse._CONFIGS[(128, d)], "gluon"]) for h, n, d, _ in SHAPES] if gluon else SHAPES
    rows = []
    for heads, n, d, settings in shapes:
        q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            reference = F.scaled_dot_product_attention(q, k, v).float()
            cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), budget_ms=800)
        flops = 4 * n * n * d * heads
        print(f"H={heads} N={n} D={d}: cuDNN {cudnn:.2f} ms ({flops / cudnn / 1e9:.0f} TFLOP/s)", flush=True)
        masks = {density: random_block_mask(1, heads, n, density) for density in (1.0, 0.2)}
        for setting in settings or SETTINGS[d]:
            kernel = "gluon" if setting == "gluon" else "triton"
            if not isinstance(setting, str):
                block_sparse._CONFIGS[(128, d)] = setting
            label = f"N={n} {setting}"
            try:
                out = block_sparse_attention_triton(q, k, v, masks[1.0], scale=d**-0.5, kernel=kernel).float()
                error = float((out - reference).norm() / reference.norm())
                times = [time_ms(lambda: block_sparse_attention_triton(q, k, v, m, scale=d**-0.5, kernel=kernel),
                                 budget_ms=800) for m in masks.values()]
            except Exception as exc:  # out of resources for this setting
                print(f"  {label}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
                continue
            rows.append((d, label, times[0], times[1], error))
            print(f"  {label}: dense {times[0]:.2f} ms ({flops / times[0] / 1e9:.0f} TFLOP/s, {times[0] / cudnn:.3f}x cuDNN "
                  f"time), 0.2 {times[1]:.2f} ms ({times[1] / cudnn:.3f}x), rel err {error:.1e}", flush=True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            print(f"  cuDNN again {time_ms(lambda: F.scaled_dot_product_attention(q, k, v), budget_ms=800):.2f} ms")
    print("\nD   setting                                   dense ms   0.2 ms   rel err")
    for d, label, dense, sparse, error in rows:
        print(f"{d:<3} {label:<40} {dense:8.2f} {sparse:8.2f} {error:9.1e}")


if __name__ == "__main__":
    main()
