"""8-bit inputs of the block-sparse kernel (``precision="fp8"``): one pre-pass per tensor. q
and k int8 with one scale per block of tokens (SageAttention's choice: 3x more accurate scores
than e4m3 on the demo model's sharpest layer, at the FP8 rate on Hopper;
benchmarks/fp8_emulation.py), v e4m3 with one scale per channel (it multiplies the kernel's
output once, so the kernel's loop carries no value scale and can skip most rescales).

``quantize_blocks`` reads x once and writes int8 or e4m3 with one float32 scale per block (or
divided by given channel scales); keys are centred first (minus their mean over all tokens:
softmax is unchanged by a per-query shift, and the quantization error then scales with how
keys differ, not with their common part, as SageAttention does); values are written
transposed, [B, H, D, N], the layout FP8 wgmma reads its second operand in.
"""

import functools
from typing import Optional

import torch
import triton

from . import _quantize_fp8
from .memory import on_device

FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_DTYPE = torch.float8_e4m3fn
# warps of a quantization program (one [128, D] block): 4 beat 8 by 12% on the three of a v2 call
# (1.20 against 1.38 ms, hunyuan-720p, H200: benchmarks/NOTES.md session 14), 2 and 16 slower
QUANTIZE_WARPS = 4


def quantize_blocks(x: torch.Tensor, block_size: int, *, center: Optional[torch.Tensor] = None,
                    channel_scale: Optional[torch.Tensor] = None, token_order: Optional[torch.Tensor] = None,
                    transpose: bool = False, wgmma_order: bool = False,
                    int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] (any strides, bf16 / fp16 / fp32) -> (e4m3 [B, H, N, D] (``int8``: int8,
    rounded to nearest, block max -> 127), or with ``transpose`` [B, H, D, N], and scales
    float32 [B, H, ceil(N / block_size)]) with x - center ~ out * scale per block. center:
    float32 [B, H, D] or None. channel_scale: float32 [B, H, D] (positive) or None: x ~ out *
    channel_scale per channel instead, and it is returned as the scales. token_order: int64 [N]
    or [B, H, N] or None: x's tokens taken in that order (``backends.gather_tokens`` fused into
    the read: the output is that of the gathered x). ``wgmma_order`` (with
    ``transpose``): the tokens of each 32 in the FP8 kernel's P operand order
    (``_quantize_fp8``), N padded to whole blocks with zeros (the returned tensor's width; its
    row stride tells the padded width to TMA)."""
    b, h, n, d = x.shape
    blocks = triton.cdiv(n, block_size)
    if token_order is not None and (token_order.dtype != torch.int64 or token_order.shape[-1] != n):
        raise ValueError(f"token_order must be int64 [N] or [B, H, N] with N = {n} (x's tokens), got "
                         f"{token_order.dtype} {tuple(token_order.shape)}")
    if wgmma_order and not transpose:
        raise ValueError("wgmma_order=True reorders the tokens of V^T: it needs transpose=True")
    if int8 and transpose:
        raise ValueError("int8=True is for q and k; the transposed V^T is e4m3 (pass int8=False)")
    if transpose:
        width = blocks * block_size if wgmma_order else triton.cdiv(n, 16) * 16  # 16-byte rows for TMA
        out = x.new_empty(b, h, d, width, dtype=FP8_DTYPE)[..., :width if wgmma_order else n]
        out_strides = (out.stride(0), out.stride(1), out.stride(3), out.stride(2))  # token, dim
    else:
        out = x.new_empty(b, h, n, d, dtype=torch.int8 if int8 else FP8_DTYPE)
        out_strides = out.stride()
    scale = x.new_empty(b, h, blocks, dtype=torch.float32) if channel_scale is None else channel_scale
    index = None if token_order is None else token_order.expand(b, h, n)
    with on_device(x):
        _quantize_fp8.quantize_blocks_kernel[(blocks, b * h)](
            x, x if index is None else index, x if center is None else center,
            x if channel_scale is None else channel_scale, out, scale,
            *x.stride(), *((0, 0, 0) if index is None else index.stride()),
            *((0, 0, 0) if center is None else center.stride()),
            *((0, 0, 0) if channel_scale is None else channel_scale.stride()), *out_strides,
            *((0, 0, 0) if channel_scale is not None else scale.stride()),
            h, n, out.shape[-1] if transpose else n, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK=block_size,
            HAS_CENTER=center is not None, WGMMA_ORDER=wgmma_order, FP8_MAX=FP8_MAX, INT8=int8,
            CHANNEL_SCALE=channel_scale is not None, HAS_INDEX=index is not None, num_warps=QUANTIZE_WARPS,
        )
    return out, scale


def row_sum_ones(device: torch.device, block_size: int) -> torch.Tensor:
    """The e4m3 [8, block_size] tile of ones the FP8 kernel multiplies P by for its row sums,
    made once per device (and per call while a CUDA graph is captured, as a temporary of it)."""
    if torch.cuda.is_current_stream_capturing():
        return _ones(device, block_size)
    return _cached_ones(device, block_size)


def _ones(device: torch.device, block_size: int) -> torch.Tensor:
    return torch.ones(8, block_size, device=device).to(FP8_DTYPE)


_cached_ones = functools.lru_cache(maxsize=None)(_ones)


def quantize_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int,
                              token_order: Optional[torch.Tensor] = None,
                              key_center: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8t, q_scale, k_scale, v_scale, key_center) for the FP8 kernel: q and k int8
    [B, H, N, D] (k minus key_center, float32 [B, H, D]: the given one, else the keys' mean, read
    here; scores shift by q . key_center per query, which the softmax ignores and a log-sum-exp
    must add back; the mean makes the smallest int8 error), v e4m3 [B, H, D, N
    padded to whole blocks] with each 32 tokens in the P operand order (``quantize_blocks``); block
    scales float32 [B, H, blocks] for q and k, channel scales float32 [B, H, D] for v. With
    ``token_order`` (``quantize_blocks``) all three are of the tokens taken in that order."""
    center = key.mean(dim=2, dtype=torch.float32) if key_center is None else key_center
    v_amax = torch.linalg.vector_norm(value, float("inf"), dim=2, dtype=torch.float32)
    v_scale = v_amax.div_(FP8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)  # (an all-zero channel stays 0)
    q8, q_scale = quantize_blocks(query, block_size, token_order=token_order, int8=True)
    k8, k_scale = quantize_blocks(key, block_size, center=center, token_order=token_order, int8=True)
    v8t, v_scale = quantize_blocks(value, block_size, channel_scale=v_scale, token_order=token_order, transpose=True,
                                   wgmma_order=True)
    return q8, k8, v8t, q_scale, k_scale, v_scale, center
