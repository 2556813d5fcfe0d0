"""Launch-setting sweep of our Triton kernel on a GPU at density 1.0 and 0.2: query rows per
program, key tile, warps, stages and register cap (2 programs per SM need <= 128 registers at 8
warps). Each setting is checked against SDPA (density 1) before it is timed; the Gluon kernel
(Hopper's default) is off during the sweep. ``--gluon``: the Gluon kernel against the Triton
kernel's chosen setting instead of the sweep.

    python benchmarks/kernel_sweep.py [--gluon]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import random_block_mask, time_ms
from rainfusion.kernels import block_sparse
from rainfusion.kernels.block_sparse import block_sparse_attention_triton

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


def main() -> None:
    print(torch.cuda.get_device_name())
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
