"""Skipped-block compensation in one pass (the Triton kernel only): attention of each query over
the block means of the key blocks its mask skips, merged with the exact block-sparse output."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_queries", "kv_len", "kv_blocks"])
def compensate_kernel(
    # pointers: q [B, H, N, D]; k_mean, v_mean [B, H, KB, D] in q's dtype; kept uint8
    # [B or 1, H or 1, QB, KB] (1 = the block was computed exactly); out, lse: the exact part
    # [B, H, N, D] and fp32 [B, H, N]; merged [B, H, N, D]
    q_ptr, k_ptr, v_ptr, kept_ptr, out_ptr, lse_ptr, merged_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_gb, stride_gh, stride_gn, stride_gd,
    num_heads, num_queries, kv_len, kv_blocks, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_M), B * H), BLOCK_M the mask's block size (one query block per
    program; value head dim = HEAD_DIM). Online softmax in base 2 over the skipped block means,
    BLOCK_K at a time (products on the tensor cores in q's dtype; exact with IEEE, fp32), each
    weighted by its token count (a log2 bias: BLOCK_M, fewer in the tail block of kv_len keys);
    then out * exp(lse - total) + estimate * exp(lse_estimate - total) in fp32, stored in merged's
    dtype."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_block = tl.program_id(0).to(tl.int64)
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    col_ok = cols < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols[None, :] * stride_qd,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    log2e: tl.constexpr = 1.4426950408889634
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kept_row = kept_ptr + b * stride_mb + h * stride_mh + q_block * stride_mq
    for start in range(0, kv_blocks, BLOCK_K):
        blocks = start + tl.arange(0, BLOCK_K)
        in_range = blocks < kv_blocks
        skipped = in_range & (tl.load(kept_row + blocks * stride_mk, mask=in_range, other=1) == 0)
        tile_ok = in_range[:, None] & col_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + blocks[:, None] * stride_kn + cols[None, :] * stride_kd,
                    mask=tile_ok, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + blocks[:, None] * stride_vn + cols[None, :] * stride_vd,
                    mask=tile_ok, other=0.0)
        tokens = tl.minimum(kv_len - blocks * BLOCK_M, BLOCK_M)
        bias = tl.log2(tl.where(in_range, tokens, 1).to(tl.float32))
        if IEEE:  # fp32 inputs: exact products (the interpreter's tests)
            products = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            products = tl.dot(q, tl.trans(k))
        scores = products * scale_log2 + bias[None, :]
        scores = tl.where(skipped[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(running_max - safe_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        running_max = new_max
    # base-2 log-sum-exp of the estimate; -inf where the row skipped nothing
    estimate_lse2 = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
    estimate = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    exact_lse2 = tl.load(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_ln, mask=row_ok,
                         other=float("-inf")) * log2e
    top = tl.maximum(exact_lse2, estimate_lse2)
    top = tl.where(top == float("-inf"), 0.0, top)
    exact_weight = tl.exp2(exact_lse2 - top)
    estimate_weight = tl.exp2(estimate_lse2 - top)
    total = exact_weight + estimate_weight
    total = tl.where(total > 0, total, 1.0)
    exact = tl.load(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols[None, :] * stride_od,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    merged = (exact * exact_weight[:, None] + estimate * estimate_weight[:, None]) / total[:, None]
    tl.store(merged_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + cols[None, :] * stride_gd,
             merged.to(merged_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
