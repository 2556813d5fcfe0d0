"""Block means along the token axis with non-finite elements as 0 (the Triton kernel only)."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])
def block_means_kernel(
    # pointers (index_ptr: int64 [N] token order, read when HAS_INDEX)
    x_ptr, out_ptr, index_ptr,
    # strides: x and out (batch, head, token or block, dim)
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    # sizes
    num_heads, num_tokens,
    # compile-time
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
):
    """Grid: (cdiv(num_tokens, BLOCK_SIZE), B * H); each program reads one block of BLOCK_SIZE
    rows, ROWS (a divisor of BLOCK_SIZE) at a time into a [ROWS, BLOCK_D] fp32 sum, and writes
    the mean of its real rows (num_tokens cuts the tail block), NaN and +-inf read as 0. With
    HAS_INDEX, row r of the sequence is token index[r] of x (the means of the permuted tokens)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    block = tl.program_id(0).to(tl.int64)
    start = block * BLOCK_SIZE
    cols = tl.arange(0, BLOCK_D)
    x_head = x_ptr + b * stride_xb + h * stride_xh + cols[None, :] * stride_xd
    total = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)  # reduced over rows once, at the end
    for offset in tl.static_range(0, BLOCK_SIZE, ROWS):
        rows = start + offset + tl.arange(0, ROWS)
        in_range = rows < num_tokens
        tokens = tl.load(index_ptr + rows, mask=in_range, other=0) if HAS_INDEX else rows
        ok = in_range[:, None] & (cols < HEAD_DIM)[None, :]
        values = tl.load(x_head + tokens[:, None] * stride_xn, mask=ok, other=0.0).to(tl.float32)
        total += tl.where(tl.abs(values) < float("inf"), values, 0.0)
    count = tl.minimum(num_tokens - start, BLOCK_SIZE).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + block * stride_on + cols * stride_od,
             tl.sum(total, axis=0) / count, mask=cols < HEAD_DIM)
