"""Block-sparse attention forward for Hopper in Gluon, FlashAttention-3 style.

One program computes one 128-row query block of one (batch, head) with three partitions: a
loader warp that brings the listed K/V tiles into a ring of shared-memory stages with TMA, and
two consumer warpgroups of 64 query rows each. Each consumer issues its own wgmmas and waits
only on them, so one warpgroup's softmax runs under the other's matrix work (no CTA-wide
barrier in the loop). A stage is refilled once both consumers have released it. Each consumer
pipelines its loop as FA3 does: the scores of a tile are computed while the previous tile's
P V product runs (3 stages, as a stage is released one tile later; 5 with FP8).

With FP8 (``precision="fp8"``), q and k come as int8 with one scale per 128-token block and
v as e4m3 with one scale per channel (``fp8.quantize_attention_inputs``: q and k [B, H, N, D],
v transposed to [B, H, D, N], wgmma's 8-bit operands being K-major, its tokens reordered
within each 32 so that P needs no shuffle to become the operand). Q K^T runs as s8 wgmma into
int32 scores, made float by an integer add (``_float_scores``) and scaled per tile by the q
and k block scales (one scalar each); P is cast to e4m3 after exp2 with a gain of 2^8 (its
largest entry 256, under e4m3's 448; the gain cancels in out = acc / l), four values to a
register at the P V issue; the V channel scales multiply the output once. The row sums l
come from the tensor cores too: P times an [8, BLOCK] e4m3 ones tile (m64n8k32, every column
the row sum of the very e4m3 P that P V takes) instead of 64 adds per thread and tile; and the
running max is lazy (``_softmax_step``), so most tiles skip the 64 multiplies of rescaling acc.

Limits of this version: mask blocks and key tiles of 128, bf16/fp16 inputs; head dim
128, and 64 (it compiles and is correct, but in bf16 the Triton kernel is faster there on an
H100: benchmarks/NOTES.md; FP8 runs here at both).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

ROWS_PER_CONSUMER = gl.constexpr(64)  # query rows of each consumer warpgroup
P_LOG2_GAIN_FP8 = gl.constexpr(8.0)  # with FP8, P = exp2(s - m + 8) in (0, 256]
INT_SCORE_BIAS = gl.constexpr(12582912.0)  # 1.5 * 2^23 (``_float_scores``)
RESCALE_SLACK_FP8 = gl.constexpr(0.8)  # log2 units: P <= 2^(8 + 0.8) = 446 < 448 (``_softmax_step``)


@gluon.jit
def _kv_block(index_row, slot, stride_iw, is_full):
    """The key block of a mask row's slot (full rows list every block and read no table)."""
    listed = gl.load(index_row + slot * stride_iw, mask=is_full == 0, other=0)
    return gl.where(is_full, slot, listed)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, ones_desc, q_smem, k_smem, v_smem, ones_smem, q_ready, k_ready, v_ready,
            kv_empty, ones_ready, q_row0, kv_row0, v_row0, index_row, stride_iw, count, is_full, q_start,
            BLOCK: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr):
    """Loader partition (one warp): with FP8 the ones tile (``_issue_row_sum``), the two halves
    of the query block, then K and V tiles (V^T tiles [D, BLOCK] with FP8). q_row0, kv_row0,
    v_row0: the head's first row in the descriptors (0 in per-head ones)."""
    if FP8:
        mbarrier.expect(ones_ready, ones_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(ones_desc, [0, 0], ones_ready, ones_smem)
    for half in gl.static_range(2):
        mbarrier.expect(q_ready.index(half), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0 + q_start + half * ROWS_PER_CONSUMER, 0],
                                        q_ready.index(half), q_smem.index(half))
    for it in range(count):
        stage = it % STAGES
        phase = (it // STAGES) & 1
        start = _kv_block(index_row, it, stride_iw, is_full) * BLOCK
        mbarrier.wait(kv_empty.index(stage), phase ^ 1)  # a fresh barrier passes parity 1 at once
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + start, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        if FP8:
            tma.async_copy_global_to_shared(v_desc, [v_row0, start], v_ready.index(stage), v_smem.index(stage))
        else:
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + start, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _issue_qk(q, k_smem, k_ready, it, s_layout: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              FP8: gl.constexpr):
    """Start S = Q K^T of tile ``it`` once its K has landed (asynchronous: wait before use; an
    int32 accumulator with int8 q and k)."""
    mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
    k = k_smem.index(it % STAGES)
    return warpgroup_mma(q, k.permute((1, 0)),
                         gl.zeros([ROWS_PER_CONSUMER, BLOCK], gl.int32 if FP8 else gl.float32, s_layout),
                         use_acc=False, is_async=True)


@gluon.jit
def _float_scores(s, FP8: gl.constexpr):
    """float32 scores; int32 ones (|s| <= 127^2 * 256 < 2^22) plus INT_SCORE_BIAS, whose bits
    plus s are exactly that float (an integer add instead of the quarter-rate I2F; the softmax
    takes the bias off inside its multiply-add)."""
    if FP8:
        s = (s + 0x4B400000).to(gl.float32, bitcast=True)
    return s


@gluon.jit
def _issue_pv(p, acc, v_smem, v_ready, it, STAGES: gl.constexpr, FP8: gl.constexpr):
    """Start acc += P V of tile ``it`` once its V has landed (asynchronous; with FP8 the stage
    holds V^T, read K-major)."""
    mbarrier.wait(v_ready.index(it % STAGES), (it // STAGES) & 1)
    v = v_smem.index(it % STAGES)
    if FP8:
        v = v.permute((1, 0))
    return warpgroup_mma(p, v, acc, is_async=True)


@gluon.jit
def _issue_row_sum(p, ones_smem, l_i):
    """FP8: start P 1 [64, 8] (in the layout of l_i), P the e4m3 P V operand and ones_smem the
    [8, BLOCK] ones tile (asynchronous; every column is the tile's row sum of the P that P V
    takes). A fresh accumulator per tile, added to l in registers: FP8 wgmma accumulates with
    ~14 bits, and l summed in it over hundreds of tiles stalls (rel L2 1.8 at hunyuan-720p,
    H200). The ones come by TMA: e4m3 written to shared memory from registers reads back wrong
    in wgmma (Triton 3.6, H200)."""
    l_layout: gl.constexpr = l_i.type.layout
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
    return warpgroup_mma(gl.convert_layout(p, operand, assert_trivial=True), ones_smem.permute((1, 0)),
                         gl.zeros([ROWS_PER_CONSUMER, 8], gl.float32, l_layout), use_acc=False, is_async=True)


@gluon.jit
def _softmax_step(s, m_i, l_i, key_limit, qk_scale_log2, BLOCK: gl.constexpr, MASK_KEYS: gl.constexpr,
                  P_LOG2_GAIN: gl.constexpr, FP8: gl.constexpr):
    """Online softmax of scores s [64, BLOCK] (``_float_scores``): (P in float32, in place of s,
    times 2^P_LOG2_GAIN; the rescale factor of the accumulator; l; m; whether acc must be
    rescaled); keys at column >= ``key_limit`` are masked. With FP8, l passes through
    (``_issue_row_sum`` sums it) and m is lazy, as in FA4: it moves only when some row of the
    warp exceeds it by more than RESCALE_SLACK_FP8 (then every row of the warp takes its own
    max), so most tiles leave acc as it is (alpha 1, ``rescale`` 0: int32 [64], one value per
    warp, ``_warp_any``) and P stays under e4m3's 448."""
    if MASK_KEYS:
        cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < key_limit)[None, :], s, float("-inf"))
    row_max = gl.max(s, 1)
    if FP8:  # the scores' bias (``_float_scores``) comes off the row max and the row offset
        row_max = row_max - INT_SCORE_BIAS
    m_new = gl.maximum(m_i, row_max * qk_scale_log2)
    rescale = True
    if FP8:
        rescale = _warp_any((m_new > m_i + RESCALE_SLACK_FP8).to(gl.int32))
        m_new = gl.where(rescale != 0, m_new, m_i)
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid inf - inf
    offset = m_ref - P_LOG2_GAIN
    if FP8:
        offset = offset + INT_SCORE_BIAS * qk_scale_log2
    p = gl.exp2(s * qk_scale_log2 - offset[:, None])
    alpha = gl.exp2(m_i - m_ref)
    if not FP8:
        l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new, rescale


@gluon.jit
def _to_e4m3(x):
    """float32 -> e4m3, four to a 32-bit register as they lie in it (two paired conversions;
    Triton's own cast splits each pair into bytes and packs them again: 3 PRMT per register)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _mma_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
    """P as the register operand of the P V product (no shared memory). 16-bit: a register
    shuffle. FP8: the columns are reordered within each 32 so that every thread already holds
    the 8-bit operand's elements (key 8a + 2t + b of a chunk, t the thread in its quad, goes to
    position 16(a // 2) + 4t + 2(a % 2) + b), which makes the layout change free; V^T's tokens
    come in the same order (``fp8.quantize_blocks(wgmma_order=True)``), so P V is unchanged."""
    if FP8:
        rows: gl.constexpr = p.shape[0]
        cols: gl.constexpr = p.shape[1]
        p = gl.reshape(p, [rows, cols // 32, 2, 2, 4, 2])  # [row, chunk, a // 2, a % 2, t, b]
        p = gl.reshape(gl.permute(p, (0, 1, 2, 4, 3, 5)), [rows, cols])
        return _to_e4m3(gl.convert_layout(p, p_layout, assert_trivial=True))
    return gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _carried_p(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
    """A tile's P as carried to the next step: 16-bit, the P V operand; FP8, still float32, cast
    when its product is issued (``_pv_operand``), as Triton splits an 8-bit tensor carried
    through a loop into bytes and packs it again (4 PRMT per register)."""
    return p if FP8 else _mma_operand(p, dtype, p_layout, FP8)


@gluon.jit
def _pv_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
    """The P V operand of a carried P (``_carried_p``)."""
    return _mma_operand(p, dtype, p_layout, FP8) if FP8 else p


@gluon.jit
def _rescaled(acc, alpha):
    """acc [64, D] * alpha [64] per row (alpha comes in the scores' row layout)."""
    return acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]


@gluon.jit
def _warp_any(flag):
    """int32 [64] in the scores' row layout -> 1 in every row of a warp where any of its rows has
    a nonzero flag, else 0 (a warp vote; each thread holds two rows). Gluon branches only on
    values uniform over the partition, and a reduction over the warpgroup's rows costs 5
    barriers per tile (FP8 at hunyuan-720p: 218 ms against 201 with no lazy rescale)."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.ne.b32 p, $2, 0; setp.ne.b32 q, $3, 0; or.pred p, p, q; "
        "vote.sync.any.pred p, p, 0xffffffff; selp.b32 $0, 1, 0, p; mov.b32 $1, $0; }",
        "=r,=r,r,r", [flag], dtype=gl.int32, is_pure=False, pack=2)


def _rescale_asm(count: int) -> str:
    """PTX: ``count`` accumulator registers (outputs tied to inputs) multiplied by their rows'
    factors unless the warp's flag (the first flag operand) is 0, branched over as a warp."""
    muls = " ".join(f"mul.f32 ${i}, ${count + i}, ${2 * count + i};" for i in range(count))
    return f"{{ .reg .pred p; setp.eq.b32 p, ${3 * count}, 0; @p bra.uni skip; {muls} skip: }}"


def _rescale_constraints(count: int) -> str:
    """Outputs, the accumulators tied to them, then the factors and flags."""
    return ",".join(["=r"] * count + [str(i) for i in range(count)] + ["r"] * (2 * count))


# HEAD_DIM 64 and 128: 32 and 64 accumulators per thread
RESCALE_ASM_32, RESCALE_ASM_64 = gl.constexpr(_rescale_asm(32)), gl.constexpr(_rescale_asm(64))
RESCALE_CONSTRAINTS_32 = gl.constexpr(_rescale_constraints(32))
RESCALE_CONSTRAINTS_64 = gl.constexpr(_rescale_constraints(64))


@gluon.jit
def _lazily_rescaled(acc, alpha, rescale, FP8: gl.constexpr):
    """acc rescaled by alpha (``_rescaled``); with FP8 only in the warps whose ``rescale`` is 1
    (``_softmax_step``): the multiplies (64 per thread at head dim 128) are branched over, not
    predicated."""
    if FP8:
        count: gl.constexpr = acc.shape[0] * acc.shape[1] // 128
        rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        acc = gl.inline_asm_elementwise(
            RESCALE_ASM_64 if count == 64 else RESCALE_ASM_32,
            RESCALE_CONSTRAINTS_64 if count == 64 else RESCALE_CONSTRAINTS_32,
            [acc, gl.convert_layout(alpha, rows)[:, None], gl.convert_layout(rescale, rows)[:, None]],
            dtype=gl.float32, is_pure=True, pack=count)
    else:
        acc = _rescaled(acc, alpha)
    return acc


@gluon.jit
def _attend_tile(acc, l_i, m_i, p_prev, alpha_prev, rescale_prev, q, k_smem, v_smem, ones_smem, k_ready, v_ready,
                 kv_empty, it, count, key_limit, tile_scale, qk_scale_log2, index_row, stride_iw, is_full, k_scale_row,
                 s_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                 MASK_KEYS: gl.constexpr, FP8: gl.constexpr, P_LOG2_GAIN: gl.constexpr):
    """FA3's in-warpgroup pipelining: S of tile ``it`` is issued, acc is rescaled for tile
    ``it - 1`` (by ``alpha_prev``, where ``rescale_prev``) and acc += P V of tile ``it - 1``
    issued (with FP8 also its row sums, added to l rescaled by ``alpha_prev``); then the softmax
    of tile ``it`` runs (in float32, in the registers of S) while the products are in flight.
    Returns this tile's P as carried (``_carried_p``; a 16-bit P operand is written only after
    the wait: it lives in the registers that the P V product in flight reads) and rescale
    factor and flag for the next step. With FP8 the tile's scores take ``tile_scale`` (its key
    block's, loaded by the previous step) and the next tile's is loaded here, a step ahead of
    its use: its table entry and scale are two dependent loads."""
    next_scale = tile_scale
    if FP8:
        next_scale = _tile_score_scale(index_row, stride_iw, is_full, gl.minimum(it + 1, count - 1), qk_scale_log2,
                                       k_scale_row)
    # S first: its issue ends the tensor cores' wait for this warpgroup, and neither the rescale
    # nor the P operand's conversion feeds it (with them after it FP8 at hunyuan-720p took 2.3%
    # less time, H200)
    s = _issue_qk(q, k_smem, k_ready, it, s_layout, BLOCK, STAGES, FP8)
    acc = _lazily_rescaled(acc, alpha_prev, rescale_prev, FP8)
    p_prev = _pv_operand(p_prev, v_smem.dtype, p_layout, FP8)
    acc = _issue_pv(p_prev, acc, v_smem, v_ready, it - 1, STAGES, FP8)
    if FP8:
        row_sum = _issue_row_sum(p_prev, ones_smem, l_i)
        s = warpgroup_mma_wait(2, deps=(s,))  # the oldest of the three: S
    else:
        s = warpgroup_mma_wait(1, deps=(s,))  # the older of the two: S
    p, alpha, l_i, m_i, rescale = _softmax_step(_float_scores(s, FP8), m_i, l_i, key_limit, tile_scale, BLOCK,
                                                MASK_KEYS, P_LOG2_GAIN, FP8)
    if FP8:
        acc, row_sum, p = warpgroup_mma_wait(0, deps=(acc, row_sum, p))
        l_i = _rescaled(l_i, alpha_prev) + row_sum
    else:
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    mbarrier.arrive(kv_empty.index((it - 1) % STAGES), count=1)
    return acc, l_i, m_i, _carried_p(p, v_smem.dtype, p_layout, FP8), alpha, rescale, next_scale


@gluon.jit
def _unmasked_tiles(index_row, stride_iw, count, is_full, key_limit, BLOCK: gl.constexpr):
    """How many listed tiles lie wholly below ``key_limit``: a prefix, as listed blocks ascend
    (the others, usually the last one or two, are masked)."""
    clean = count
    while (clean > 0) & ((_kv_block(index_row, gl.maximum(clean - 1, 0), stride_iw, is_full) + 1) * BLOCK > key_limit):
        clean -= 1
    return clean


@gluon.jit
def _tile_score_scale(index_row, stride_iw, is_full, it, qk_scale_log2, k_scale_row):
    """FP8: the score scale of tile ``it``, qk_scale_log2 times its key block's scale."""
    return qk_scale_log2 * gl.load(k_scale_row + _kv_block(index_row, it, stride_iw, is_full))


@gluon.jit
def _consumer(half, q_smem, k_smem, v_smem, ones_smem, q_ready, k_ready, v_ready, kv_empty, ones_ready, out_base,
              stride_on, lse_base, stride_ln, out_index_row, stride_xn, index_row, stride_iw, count, is_full, q_start,
              q_len, key_limit, qk_scale_log2, k_scale_row, v_scale_row, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, RETURN_LSE: gl.constexpr, FP8: gl.constexpr, HAS_OUT_INDEX: gl.constexpr):
    """Consumer partition (one warpgroup): 64 query rows against every listed tile; keys at
    positions >= ``key_limit`` are masked out (only in the tiles that reach it); query row i is
    stored at row out_index_row[i] (with HAS_OUT_INDEX) or i. With FP8, qk_scale_log2 includes
    the query block's scale, k_scale_row points at the head's key block scales and v_scale_row at
    its value channel scales (applied to the output)."""
    INSTR_K: gl.constexpr = 32 if FP8 else 16  # the wgmma K of 8- and 16-bit operands
    P_LOG2_GAIN: gl.constexpr = P_LOG2_GAIN_FP8 if FP8 else 0.0
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, INSTR_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, INSTR_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if FP8 else 2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    m_i = gl.full([ROWS_PER_CONSUMER], float("-inf"), gl.float32, row_layout)
    if FP8:  # l in each of the 8 columns of a product accumulator (``_issue_row_sum``)
        l_i = gl.zeros([ROWS_PER_CONSUMER, 8], gl.float32, gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, INSTR_K]))
        mbarrier.wait(ones_ready, 0)
    else:
        l_i = gl.zeros([ROWS_PER_CONSUMER], gl.float32, row_layout)
    acc = gl.zeros([ROWS_PER_CONSUMER, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_ready.index(half), 0)
    q = q_smem.index(half)
    tile_scale = qk_scale_log2
    if count > 0:  # (an empty row reads no table entry: the table may have width 0)
        clean = _unmasked_tiles(index_row, stride_iw, count, is_full, key_limit, BLOCK)
        if FP8:
            tile_scale = _tile_score_scale(index_row, stride_iw, is_full, 0, qk_scale_log2, k_scale_row)
        s = warpgroup_mma_wait(0, deps=(_issue_qk(q, k_smem, k_ready, 0, s_layout, BLOCK, STAGES, FP8),))
        s = _float_scores(s, FP8)
        p, alpha, l_i, m_i, rescale = _softmax_step(
            s, m_i, l_i, key_limit - _kv_block(index_row, 0, stride_iw, is_full) * BLOCK, tile_scale, BLOCK, True,
            P_LOG2_GAIN, FP8)
        p = _carried_p(p, v_smem.dtype, p_layout, FP8)
        if FP8:  # the first step's tile (``_attend_tile`` loads each next one)
            tile_scale = _tile_score_scale(index_row, stride_iw, is_full, gl.minimum(1, count - 1), qk_scale_log2,
                                           k_scale_row)
        for it in range(1, clean):
            acc, l_i, m_i, p, alpha, rescale, tile_scale = _attend_tile(
                acc, l_i, m_i, p, alpha, rescale, q, k_smem, v_smem, ones_smem, k_ready, v_ready, kv_empty, it, count,
                BLOCK, tile_scale, qk_scale_log2, index_row, stride_iw, is_full, k_scale_row, s_layout, p_layout, BLOCK,
                STAGES, False, FP8, P_LOG2_GAIN)
        for it in range(gl.maximum(clean, 1), count):
            tile_limit = key_limit - _kv_block(index_row, it, stride_iw, is_full) * BLOCK
            acc, l_i, m_i, p, alpha, rescale, tile_scale = _attend_tile(
                acc, l_i, m_i, p, alpha, rescale, q, k_smem, v_smem, ones_smem, k_ready, v_ready, kv_empty, it, count,
                tile_limit, tile_scale, qk_scale_log2, index_row, stride_iw, is_full, k_scale_row, s_layout, p_layout,
                BLOCK, STAGES, True, FP8, P_LOG2_GAIN)
        last = count - 1
        p = _pv_operand(p, v_smem.dtype, p_layout, FP8)
        acc = _issue_pv(p, _lazily_rescaled(acc, alpha, rescale, FP8), v_smem, v_ready, last, STAGES, FP8)
        if FP8:
            acc, row_sum = warpgroup_mma_wait(0, deps=(acc, _issue_row_sum(p, ones_smem, l_i)))
            l_i = _rescaled(l_i, alpha) + row_sum
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last % STAGES), count=1)
    if FP8:
        l_i = gl.max(l_i, 1)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    empty = l_o == 0.0  # rows that saw no key output 0
    out = acc * (1.0 / gl.where(empty, 1.0, l_o))[:, None]
    rows = q_start + half * ROWS_PER_CONSUMER + gl.arange(0, ROWS_PER_CONSUMER, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if FP8:
        out = out * gl.load(v_scale_row + cols)[None, :]
    out_rows = rows.to(gl.int64)
    if HAS_OUT_INDEX:  # the un-permutation, fused: query i's row is out_index[i]
        out_rows = gl.load(out_index_row + out_rows * stride_xn, mask=rows < q_len, other=0)
    ptrs = out_base + out_rows[:, None] * stride_on + cols[None, :]
    gl.store(ptrs, out.to(out_base.dtype.element_ty), mask=(rows < q_len)[:, None])
    if RETURN_LSE:
        lse = gl.where(empty, float("-inf"), (gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
                                              + gl.log2(gl.where(empty, 1.0, l_o)) - P_LOG2_GAIN) * 0.6931471805599453)
        gl.store(lse_base + out_rows * stride_ln, lse, mask=rows < q_len)


@gluon.jit(do_not_specialize=["q_len", "kv_len", "kv_blocks"])
def block_sparse_fwd_kernel(
    q_in, k_in, v_in, out_ptr, lse_ptr, counts_ptr, indices_ptr, kv_valid_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    ones_in, schedule_ptr, stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_ln,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_iw,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    num_heads, q_len, kv_len, kv_blocks, qk_scale_log2, out_index_ptr, stride_xb, stride_xh, stride_xn,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
    HAS_KV_VALID: gl.constexpr, FP8: gl.constexpr, HAS_OUT_INDEX: gl.constexpr = False,
):
    """q, k, v: pointers (16 bits) of q [B, H, Nq, D], k/v [B, H, Nk, D] with unit D stride and
    the given strides; with FP8 host TMA descriptors (``block_sparse.fp8_descriptors``) of the
    pre-pass's contiguous buffers with the heads flattened: q, k int8 [B * H * N, D] (boxes [64,
    D], [BLOCK, D]), v e4m3 transposed [B * H * D, Nk padded to whole blocks, zeros after Nk]
    (box [D, BLOCK]), its tokens in the P operand order (``_mma_operand``), and ``ones_in`` of an
    [8, BLOCK] e4m3 tile of ones (``_issue_row_sum``; without FP8 a pointer that stands in). A
    tile past a head's last query or key row reads the next head's rows there: masked like the
    zeros of a per-head descriptor. out [B, H, Nq, D] with unit D stride; lse float32 [B, H,
    Nq]; counts int32 [B, H, q_blocks]; indices int32 [B, H, q_blocks, width]; kv_valid int32 [B]
    (with HAS_KV_VALID): keys at positions >= kv_valid[b] are masked out. FP8 block scales float32
    q [B, H, q_blocks], k [B, H, kv_blocks] (unit block stride) and v per channel [B, H, D]
    (unit stride). out_index int64 [B, H, Nq] (with HAS_OUT_INDEX): query i's row of out and lse
    is out_index[b, h, i]. schedule int32 [B * H, q_blocks] (with FP8; without, the grid order):
    program (i, bh) takes query block schedule[bh, i] of its head (each head's longest rows first:
    a long row started last would run on while the other SMs idle; on the H200 bf16's sparse rows
    ran 1-2% slower with it and its v2 end to end no faster, benchmarks/NOTES.md). Grid:
    (q_blocks, B * H); num_warps=4 (the first consumer; the other two partitions add 5)."""
    pid_bh = gl.program_id(1)
    if FP8:
        q_block = gl.load(schedule_ptr + pid_bh * gl.num_programs(0) + gl.program_id(0))
    else:
        q_block = gl.program_id(0)
    b = (pid_bh // num_heads).to(gl.int64)
    h = (pid_bh % num_heads).to(gl.int64)
    row = q_block.to(gl.int64)
    q_start = q_block * BLOCK
    BITS: gl.constexpr = 8 if FP8 else 16
    # rows of HEAD_DIM elements (q, k; v without FP8) and, with FP8, V^T rows of BLOCK elements
    tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, HEAD_DIM * BITS // 8),
                                                     element_bitwidth=BITS, rank=2)
    vt_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=BITS, rank=2)
    if FP8:  # host descriptors, built once per launch: no descriptor is made in each program
        q_desc, k_desc, v_desc, ones_desc = q_in, k_in, v_in, ones_in
        q_row0, kv_row0, v_row0 = pid_bh * q_len, pid_bh * kv_len, pid_bh * HEAD_DIM
        dtype: gl.constexpr = q_in.dtype  # int8
        v_smem = gl.allocate_shared_memory(v_in.dtype, [STAGES, HEAD_DIM, BLOCK], vt_layout)
        ones_smem = gl.allocate_shared_memory(v_in.dtype, [8, BLOCK], vt_layout)
    else:  # per-head descriptors of the caller's tensors (16-bit host descriptors of [B, H, N, D]
        # boxes made rows of 186 blocks 3% slower, H200, benchmarks/NOTES.md session 10)
        dtype: gl.constexpr = q_in.dtype.element_ty
        q_desc = tma.make_tensor_descriptor(q_in + b * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM],
                                            strides=[stride_qn, 1], block_shape=[ROWS_PER_CONSUMER, HEAD_DIM],
                                            layout=tile_layout)
        k_desc = tma.make_tensor_descriptor(k_in + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_kn, 1], block_shape=[BLOCK, HEAD_DIM],
                                            layout=tile_layout)
        v_desc = tma.make_tensor_descriptor(v_in + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_vn, 1], block_shape=[BLOCK, HEAD_DIM],
                                            layout=tile_layout)
        q_row0, kv_row0, v_row0 = 0, 0, 0
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], tile_layout)
        ones_desc, ones_smem = v_desc, v_smem  # (unused)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS_PER_CONSUMER, HEAD_DIM], tile_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], tile_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if FP8:
        ones_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout()).index(0)
        mbarrier.init(ones_ready, count=1)
    else:
        ones_ready = q_ready.index(0)  # (unused)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage
    fence_async_shared()  # the initialised barriers are visible to TMA before the first copy

    index_row = indices_ptr + b * stride_ib + h * stride_ih + row * stride_im
    count = gl.load(counts_ptr + b * stride_cb + h * stride_ch + row * stride_cm)
    is_full = count == kv_blocks
    key_limit = kv_len
    if HAS_KV_VALID:
        key_limit = gl.minimum(kv_len, gl.load(kv_valid_ptr + b))
    out_base = out_ptr + b * stride_ob + h * stride_oh
    lse_base = lse_ptr + b * stride_lb + h * stride_lh
    out_index_row = out_index_ptr + b * stride_xb + h * stride_xh
    k_scale_row = k_scale_ptr + b * stride_ksb + h * stride_ksh
    v_scale_row = v_scale_ptr + b * stride_vsb + h * stride_vsh
    if FP8:
        qk_scale_log2 = qk_scale_log2 * gl.load(q_scale_ptr + b * stride_qsb + h * stride_qsh + row)
    gl.warp_specialize([
        (_consumer, (0, q_smem, k_smem, v_smem, ones_smem, q_ready, k_ready, v_ready, kv_empty, ones_ready, out_base,
                     stride_on, lse_base, stride_ln, out_index_row, stride_xn, index_row, stride_iw, count, is_full,
                     q_start, q_len, key_limit, qk_scale_log2, k_scale_row, v_scale_row, BLOCK, HEAD_DIM, STAGES,
                     RETURN_LSE, FP8, HAS_OUT_INDEX)),
        (_consumer, (1, q_smem, k_smem, v_smem, ones_smem, q_ready, k_ready, v_ready, kv_empty, ones_ready, out_base,
                     stride_on, lse_base, stride_ln, out_index_row, stride_xn, index_row, stride_iw, count, is_full,
                     q_start, q_len, key_limit, qk_scale_log2, k_scale_row, v_scale_row, BLOCK, HEAD_DIM, STAGES,
                     RETURN_LSE, FP8, HAS_OUT_INDEX)),
        (_loader, (q_desc, k_desc, v_desc, ones_desc, q_smem, k_smem, v_smem, ones_smem, q_ready, k_ready, v_ready,
                   kv_empty, ones_ready, q_row0, kv_row0, v_row0, index_row, stride_iw, count, is_full, q_start,
                   BLOCK, STAGES, FP8)),
    ], [4, 1], [232, 40])
