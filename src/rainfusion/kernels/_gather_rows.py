"""Row gather along the token axis (the Triton kernel only): out[b, h, i] = x[b, h, index[b, h, i]]."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])
def gather_rows_kernel(
    # pointers
    x_ptr, out_ptr, index_ptr,
    # strides: x and out (batch, head, token, dim); index (batch, head, token)
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_in,
    # sizes
    num_heads, num_tokens,
    # compile-time
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """Grid: (cdiv(num_tokens, ROWS), B * H); each program copies ROWS rows of D elements."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < num_tokens)[:, None] & (cols < HEAD_DIM)[None, :]
    source = tl.load(index_ptr + b * stride_ib + h * stride_ih + rows.to(tl.int64) * stride_in,
                     mask=rows < num_tokens, other=0).to(tl.int64)
    values = tl.load(x_ptr + b * stride_xb + h * stride_xh + source[:, None] * stride_xn
                     + cols[None, :] * stride_xd, mask=ok)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_on
             + cols[None, :] * stride_od, values, mask=ok)
