"""Launch-setting sweep of our Triton kernel on a GPU (TMA or pointer loads; BLOCK_N, warps,
stages) at density 1.0 and 0.2.

    python benchmarks/kernel_sweep.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import random_block_mask, time_ms
from rainfusion import block_sparse_attention
from rainfusion.kernels import block_sparse

SETTINGS = [(64, 8, 3), (64, 8, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3)]
SHAPES = [(24, 32768, 128), (48, 17550, 64)]  # heads, tokens, head dim


def main() -> None:
    print(torch.cuda.get_device_name())
    for heads, n, d in SHAPES:
        q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"H={heads} N={n} D={d}: cuDNN {cudnn:.2f} ms")
        masks = {density: random_block_mask(1, heads, n, density) for density in (1.0, 0.2)}
        for use_tma, setting in [(t, s) for t in (False, True) for s in SETTINGS]:
            block_sparse.USE_TMA_ON_HOPPER = use_tma
            block_sparse._CONFIGS[(128, d)] = setting
            times = []
            for density, mask in masks.items():
                try:
                    times.append(time_ms(lambda: block_sparse_attention(q, k, v, mask, backend="triton")))
                except Exception as error:  # out of resources for this setting
                    times.append(float("nan"))
                    print("  ", setting, type(error).__name__, str(error)[:80])
            print(f"  TMA {use_tma!s:5} BLOCK_N, warps, stages {setting}: dense {times[0]:.2f} ms ({cudnn / times[0]:.2f}x cuDNN), "
                  f"0.2 {times[1]:.2f} ms ({cudnn / times[1]:.2f}x)")


if __name__ == "__main__":
    main()
