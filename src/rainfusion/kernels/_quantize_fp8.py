"""Quantization to FP8 e4m3 or int8 (the Triton kernel only): one scale per block of tokens, or
a given one per channel."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])  # out_rows % 16 == 0 (V^T): 16-byte stores
def quantize_blocks_kernel(
    # pointers: x [B, H, N, D]; token_index int64 [B, H, N] (read with HAS_INDEX: out row i is
    # x's token token_index[b, h, i]); center float32 [B, H, D] (read with HAS_CENTER);
    # channel_scale float32 [B, H, D] (read with CHANNEL_SCALE); out e4m3 with out_rows rows,
    # [B, H, rows, D] or, through its strides, transposed; scale float32 [B, H, blocks] (written
    # without CHANNEL_SCALE)
    x_ptr, token_index_ptr, center_ptr, channel_scale_ptr, out_ptr, scale_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_tb, stride_th, stride_tn,
    stride_cb, stride_ch, stride_cd,
    stride_csb, stride_csh, stride_csd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_sb, stride_sh, stride_sn,
    num_heads, num_tokens, out_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_CENTER: tl.constexpr,
    WGMMA_ORDER: tl.constexpr, FP8_MAX: tl.constexpr, INT8: tl.constexpr = False,
    CHANNEL_SCALE: tl.constexpr = False, HAS_INDEX: tl.constexpr = False,
):
    """Grid: (cdiv(N, BLOCK), B * H). Each program reads one block of BLOCK positions (fp32 in
    registers, the center subtracted), takes its largest magnitude, and writes the block divided
    by scale = amax / FP8_MAX (1 for an all-zero block) in e4m3, rounded to nearest, and the
    scale; with CHANNEL_SCALE, divided by the given scale of each channel instead. Output row p
    holds position p, or with WGMMA_ORDER position 8a + 2t + b of its chunk of 32 where p =
    16(a // 2) + 4t + 2(a % 2) + b (the FP8 kernel's P operand order); positions >= num_tokens
    are read as 0, rows >= out_rows are not written."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    block = tl.program_id(0).to(tl.int64)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    positions = rows
    if WGMMA_ORDER:
        within = rows % 32
        positions = rows - within + 8 * (2 * (within // 16) + (within % 4) // 2) + 2 * ((within % 16) // 4) + within % 2
    cols = tl.arange(0, BLOCK_D)
    ok = (positions < num_tokens)[:, None] & (cols < HEAD_DIM)[None, :]
    tokens = positions
    if HAS_INDEX:  # the permutation gather, fused: position p reads token token_index[p]
        tokens = tl.load(token_index_ptr + b * stride_tb + h * stride_th + positions * stride_tn,
                         mask=positions < num_tokens, other=0)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + tokens[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    if HAS_CENTER:
        center = tl.load(center_ptr + b * stride_cb + h * stride_ch + cols * stride_cd, mask=cols < HEAD_DIM, other=0.0)
        x = tl.where(ok, x - center[None, :], 0.0)
    if CHANNEL_SCALE:
        channel_scale = tl.load(channel_scale_ptr + b * stride_csb + h * stride_csh + cols * stride_csd,
                                mask=cols < HEAD_DIM, other=1.0)
        x = x * (1.0 / channel_scale)[None, :]
        scale = 1.0
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        top: tl.constexpr = 127.0 if INT8 else FP8_MAX
        scale = tl.where(amax > 0, amax / top, 1.0)
    if INT8:  # rounded to nearest (halves away from zero), within [-127, 127]
        scaled = x * (1.0 / scale)
        rounded = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(0.5 - scaled))
        quantized = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
    else:
        quantized = (x * (1.0 / scale)).to(tl.float8e4nv)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols[None, :] * stride_od,
             quantized, mask=(rows < out_rows)[:, None] & (cols < HEAD_DIM)[None, :])
    if not CHANNEL_SCALE:
        tl.store(scale_ptr + b * stride_sb + h * stride_sh + block * stride_sn, scale)
