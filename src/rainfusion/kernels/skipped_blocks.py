"""Launcher of the fused skipped-block compensation (``compensation`` on CUDA), a torch custom op.

One program per (query block, batch x head) reads its queries once, walks the key blocks' means
with the mask's kept flags, and writes the merged output: no N x kv_blocks scores in memory.
"""

import math

import torch
import triton

from . import _skipped_blocks
from .memory import on_device

# (block means per inner step, num_warps, num_stages) for 128- and 64-token mask blocks (one
# query block per program); 128 chosen by benchmarks/kernel_sweep.py --compensation on an H200
CONFIGS = {128: (32, 4, 4), 64: (64, 4, 3)}


@torch.library.custom_op("rainfusion::compensate_skipped_blocks", mutates_args=())
def compensate_triton(query: torch.Tensor, k_mean: torch.Tensor, v_mean: torch.Tensor, kept: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, block_size: int, kv_len: int,
                      scale: float) -> torch.Tensor:
    """query [B, H, N, D] (bf16 / fp16 / fp32, any strides); k_mean, v_mean [B, H, KB, D] (cast to
    query's dtype); kept bool [B or 1, H or 1, QB, KB] (the mask's dense form); out [B, H, N, D] and
    lse float32 [B, H, N], the exact block-sparse part (natural log-sum-exp, -inf for rows that saw
    no key); kv_len: the key count (the last block's size). Returns the merged output [B, H, N, D]
    in query's dtype: exact part plus the estimate of the skipped blocks (``compensation``)."""
    b, h, n, d = query.shape
    kv_blocks = k_mean.shape[2]
    means = [t.to(query.dtype) for t in (k_mean, v_mean)]
    flags = kept.to(torch.uint8)
    merged = torch.empty_like(query)
    strides = [*flags.stride()]
    for axis in (0, 1):  # a mask shared over batch or heads: stride 0
        if flags.shape[axis] == 1:
            strides[axis] = 0
    block_k, num_warps, num_stages = CONFIGS.get(block_size, CONFIGS[64])
    with on_device(query):
        _skipped_blocks.compensate_kernel[(triton.cdiv(n, block_size), b * h)](
            query, means[0], means[1], flags, out, lse, merged,
            *query.stride(), *means[0].stride(), *means[1].stride(), *strides, *out.stride(), *lse.stride(),
            *merged.stride(), h, n, kv_len, kv_blocks, scale * math.log2(math.e),
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_size, BLOCK_K=block_k,
            IEEE=query.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
        )
    return merged


@compensate_triton.register_fake
def _(query, k_mean, v_mean, kept, out, lse, block_size, kv_len, scale):
    return torch.empty_like(query)
