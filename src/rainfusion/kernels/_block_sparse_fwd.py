"""Block-sparse attention forward, FlashAttention-2 style (the Triton kernel only).

One program computes BLOCK_Q query rows (all or part of one mask row's query block) of one
(batch, head): it walks the key blocks listed in that mask row (every key block for a full row)
as BLOCK_N-wide tiles, with an online softmax in float32. Listed blocks are ascending, so only
the last one can hold the key tail: every tile but the last block's runs without key masking.
The launch settings make two programs share an SM (docs/design.md). To run on CPU (Triton's
interpreter), ``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_start(it, index_row, stride_iw, is_full, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key position of tile ``it`` of a mask row (BLOCK_M // BLOCK_N tiles per listed block)."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_M // BLOCK_N
    slot = it // TILES_PER_BLOCK
    # full rows read no table entry (the table may be narrower than kv_blocks)
    listed = tl.load(index_row + slot * stride_iw, mask=is_full == 0, other=0)
    kv_block = tl.where(is_full, slot, listed)
    return kv_block * BLOCK_M + (it % TILES_PER_BLOCK) * BLOCK_N


@triton.jit
def _load_tile(base, desc, stride_n, start, kv_end,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_KEYS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK_N) of K or V: [BLOCK_N, BLOCK_D]. ``base`` already points at
    column offsets; with TMA, rows past the tensor's end are zero-filled."""
    if USE_TMA:
        return desc.load([start, 0])
    offs_n = start + tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM
    ptrs = base + offs_n.to(tl.int64)[:, None] * stride_n
    if MASK_KEYS:
        return tl.load(ptrs, mask=(offs_n < kv_end)[:, None] & d_ok, other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok, other=0.0)


@triton.jit
def _softmax_update(acc, l_i, m_i, s, v, start, kv_end, qk_scale_log2,
                    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    """One online-softmax step: scores s [BLOCK_Q, BLOCK_N] of keys from ``start``, values v."""
    if MASK_KEYS:
        s = tl.where((start + tl.arange(0, BLOCK_N) < kv_end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
    # rows that have seen no key yet keep m = -inf: subtract 0 instead to avoid inf - inf
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale_log2 - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, k_desc, v_desc, index_row, stride_kn, stride_vn, stride_iw,
    first_tile, end_tile, is_full, kv_end, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over tiles [first_tile, end_tile) of the row."""
    for it in range(first_tile, end_tile):
        start = _tile_start(it, index_row, stride_iw, is_full, BLOCK_M, BLOCK_N)
        k = _load_tile(k_base, k_desc, stride_kn, start, kv_end, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KEYS, USE_TMA)
        v = _load_tile(v_base, v_desc, stride_vn, start, kv_end, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KEYS, USE_TMA)
        s = tl.dot(q, tl.trans(k))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, start, kv_end, qk_scale_log2, BLOCK_N, MASK_KEYS)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_len", "kv_len", "kv_blocks"])
def block_sparse_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, counts_ptr, indices_ptr, kv_valid_ptr,
    # strides, per tensor: (batch, head, token, dim); lse (batch, head, token); mask (batch, head, row[, slot])
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_iw,
    # sizes (runtime)
    num_heads, q_len, kv_len, kv_blocks, qk_scale_log2,
    # out_index [B, H, Nq] and its strides (read with HAS_OUT_INDEX)
    out_index_ptr, stride_xb, stride_xh, stride_xn,
    # compile-time
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    BLOCK_M: tl.constexpr,  # mask block size (query and key blocks)
    BLOCK_Q: tl.constexpr,  # query rows per program; divides BLOCK_M
    BLOCK_N: tl.constexpr,  # key tile; divides BLOCK_M
    HAS_KV_VALID: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    USE_TMA: tl.constexpr,  # K/V through tensor descriptors (unit dim stride, D a power of two)
    HAS_OUT_INDEX: tl.constexpr = False,
):
    """q [B, H, Nq, D], k/v [B, H, Nk, D], out [B, H, Nq, D] (any strides); lse float32 [B, H, Nq];
    counts int32 [B, H, q_blocks]; indices int32 [B, H, q_blocks, width]; kv_valid int32 [B];
    out_index int64 [B, H, Nq] (read with HAS_OUT_INDEX): query i's row of out and lse is
    out_index[b, h, i]. Grid: (cdiv(Nq, BLOCK_Q), B * H)."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_M // BLOCK_N
    q_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    row64 = (q_tile // (BLOCK_M // BLOCK_Q)).to(tl.int64)  # the mask row of this query tile

    offs_m = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len

    q_ptrs = (q_ptr + b * stride_qb + h * stride_qh
              + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    k_desc = None
    v_desc = None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                           strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_ptr + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                           strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    index_row = indices_ptr + b * stride_ib + h * stride_ih + row64 * stride_im
    count = tl.load(counts_ptr + b * stride_cb + h * stride_ch + row64 * stride_cm)
    is_full = count == kv_blocks
    kv_end = kv_len
    if HAS_KV_VALID:
        kv_end = tl.minimum(kv_end, tl.load(kv_valid_ptr + b))

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    end_tile = count * TILES_PER_BLOCK
    last_block = tl.maximum(end_tile - TILES_PER_BLOCK, 0)
    # with per-item valid lengths any block may be cut: mask every tile
    unmasked_end = 0 if HAS_KV_VALID else last_block
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, index_row, stride_kn, stride_vn, stride_iw,
        0, unmasked_end, is_full, kv_end, qk_scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, MASK_KEYS=False, USE_TMA=USE_TMA,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, index_row, stride_kn, stride_vn, stride_iw,
        unmasked_end, end_tile, is_full, kv_end, qk_scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, MASK_KEYS=True, USE_TMA=USE_TMA,
    )

    empty = l_i == 0.0  # rows that saw no key output 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_rows = offs_m.to(tl.int64)
    if HAS_OUT_INDEX:  # the un-permutation, fused: query i's row is out_index[i]
        out_rows = tl.load(out_index_ptr + b * stride_xb + h * stride_xh + out_rows * stride_xn, mask=m_ok, other=0)
    out_ptrs = (out_ptr + b * stride_ob + h * stride_oh
                + out_rows[:, None] * stride_on + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        # natural log: (m + log2 l) * ln 2
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + out_rows * stride_ln, lse, mask=m_ok)
