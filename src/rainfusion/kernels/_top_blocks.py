"""RainFusion2.0's top-N key blocks per query block, by selection instead of a sort (the Triton kernel only)."""

import triton
import triton.language as tl


@triton.jit
def _ordered(bits):
    """int32 bits of float32 -> int32 keys in the floats' order (negative floats reversed)."""
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit(do_not_specialize=["blocks", "width", "head", "tail_start"])
def top_blocks_kernel(
    # pointers: scores float32 [B, H, blocks, blocks]; counts int32 [B, H, blocks]; indices int32 [B, H, blocks, width]
    scores_ptr, counts_ptr, indices_ptr,
    # strides: scores (batch, head, row; unit column stride), counts (batch, head), indices (batch, head, row)
    stride_sb, stride_sh, stride_sr, stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
    # sizes: the forced key blocks are those < head and >= tail_start (and the diagonal)
    num_heads, blocks, width, head, tail_start, scale,
    FORCE_DIAGONAL: tl.constexpr, BLOCKS_P2: tl.constexpr,
):
    """Grid: (blocks, B * H); one program per query block (a row of ``scores`` q_mean k_mean^T):
    the ``width`` key blocks of the highest ``scale * score``, forced blocks first, ties to the
    lower block, written in ascending order; its count ``width``, or ``blocks`` for a forced
    (dense) row. The width-th highest key is found by bisection on the scores' bits (32 counts
    over the row), then the chosen blocks are compacted by a prefix sum."""
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    cols = tl.arange(0, BLOCKS_P2)
    real = cols < blocks
    scores = tl.load(scores_ptr + b * stride_sb + h * stride_sh + row.to(tl.int64) * stride_sr + cols, mask=real,
                     other=0.0) * scale
    keys = _ordered(scores.to(tl.int32, bitcast=True))
    forced = (cols < head) | (cols >= tail_start)
    if FORCE_DIAGONAL:
        forced = forced | (cols == row)
    keys = tl.where(forced, 0x7FFFFFFF, keys)
    keys = tl.where(real, keys, -0x7FFFFFFF - 1)
    low = tl.full([], -(2**31), tl.int64)  # count(keys >= low) >= width; count(keys >= high) < width
    high = tl.full([], 2**31, tl.int64)
    for _ in range(32):
        middle = (low + high) >> 1
        enough = tl.sum((keys >= middle).to(tl.int32), axis=0) >= width
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle)
    above = keys > low
    tied = keys == low
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= width - tl.sum(above.to(tl.int32), axis=0)))
    slots = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(indices_ptr + b * stride_ib + h * stride_ih + row.to(tl.int64) * stride_ir + slots, cols, mask=chosen)
    dense_row = (row < head) | (row >= tail_start)
    tl.store(counts_ptr + b * stride_cb + h * stride_ch + row, tl.where(dense_row, blocks, width))
