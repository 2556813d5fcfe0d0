"""Launcher for the Triton block-sparse attention forward, registered as a torch custom op.

``block_sparse_attention_triton`` validates its inputs, unpacks the BlockSparseMask and calls
``torch.ops.rainfusion.block_sparse_attention_triton`` (plain tensors and scalars, with a fake
implementation so torch.compile can trace it). It never synchronises with the host, but once for
a ``token_order`` given with ``restore_order`` that no plan made (``_check_permutation``).

On Hopper GPUs the Gluon kernel (``_block_sparse_fwd_gluon``) runs where it applies, the Triton
one (``_block_sparse_fwd``) everywhere else; ``kernel`` picks one explicitly. ``precision="fp8"``
runs the Gluon kernel on 8-bit copies of q, k, v made by one pre-pass (``fp8``); where the Gluon
kernel cannot run, the 16-bit kernels run instead (logged once). Launches run on the
query's device. The Triton kernel runs on CUDA tensors; on CPU it runs
under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was first imported
(float32 is accepted there only).
"""

import functools
import math
from typing import Optional, Union

import torch
import triton
from triton.runtime import JITFunction

from .._logging import log_fp8_fallback, log_once
from .._validation import check_kv_valid_len, check_precision, check_qkv
from ..mask import BlockSparseMask, check_block_mask, num_blocks
from ..permutation import is_known_permutation, mark_permutation
from . import _block_sparse_fwd
from .gather_rows import gather_rows_triton
from .memory import empty_like_layout, on_device

HEAD_DIMS = (64, 96, 128)
DTYPES = (torch.bfloat16, torch.float16)
INTERPRETER_DTYPES = DTYPES + (torch.float32,)

# (mask block, BLOCK_D) -> (BLOCK_Q query rows per program, BLOCK_N, num_warps, num_stages, maxnreg),
# bf16/fp16. 128-token blocks chosen by benchmarks/kernel_sweep.py on an H100 (see benchmarks/NOTES.md);
# 64-token blocks compiled for sm_90 without spills, not timed.
_CONFIGS = {
    (128, 64): (128, 128, 8, 2, 128),
    (128, 128): (128, 64, 8, 2, 128),
    (64, 64): (64, 64, 4, 3, None),
    (64, 128): (64, 64, 4, 2, None),
}


# True when the kernel was decorated under TRITON_INTERPRET=1 (then it runs on CPU tensors).
INTERPRETED = not isinstance(_block_sparse_fwd.block_sparse_fwd_kernel, JITFunction)


def _empty_lse(query: torch.Tensor, return_lse: bool) -> torch.Tensor:
    """float32 [B, H, N] when requested, else an empty placeholder."""
    shape = query.shape[:3] if return_lse else (0,)
    return query.new_empty(shape, dtype=torch.float32)


def _use_tma(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """K/V through tensor descriptors (TMA; benchmarks/NOTES.md has the measurement) need a GPU of
    compute capability 9+, unit stride on D, D a power of two and 16-byte aligned rows; they also
    need Triton's scratch allocator for in-kernel descriptors."""
    if not (query.is_cuda and not INTERPRETED):
        return False
    if torch.cuda.get_device_capability(query.device)[0] < 9:
        return False
    d = query.shape[-1]
    if not (_tma_aligned(key, value) and d == triton.next_power_of_2(d)):
        return False
    triton.set_allocator(_descriptor_scratch)
    return True


# On Hopper (sm_90) the Gluon kernel (_block_sparse_fwd_gluon, FA3-style warp specialisation)
# runs instead of the Triton one for head dim 128: at HunyuanVideo 720p on an H100 it is 1.17x
# faster at density 1 and 1.20x at 0.2 (benchmarks/NOTES.md). At head dim 64 (CogVideoX) the
# Triton kernel, two programs per SM, stays faster (1.17x at 0.2), so it keeps those calls.
KERNELS = ("auto", "gluon", "triton")
GLUON_HEAD_DIMS = (128,)
FP8_HEAD_DIMS = (64, 128)  # the Gluon kernel's FP8 path: the only FP8 kernel, so at 64 too
# K/V ring stages of the FP8 Gluon kernel (32 KB each; 4 beat 3 by 5% in f-v4, 5 beat 4 at 0.2 by 1% in f-v6)
FP8_STAGES = 5
# Gluon's API moves between Triton releases (3.9 renamed the TMA copies it uses), so the kernel
# runs only on the releases it was run and tested on (H100 and H200, Triton 3.6).
GLUON_TRITON_RELEASES = ("3.6",)


def gluon_tested_on(triton_version: str) -> bool:
    """The Gluon kernel was tested on this Triton release (major.minor of ``triton_version``)."""
    return ".".join(triton_version.split(".")[:2]) in GLUON_TRITON_RELEASES


def _gluon_case(query: torch.Tensor, block_size: int, head_dims: tuple[int, ...] = GLUON_HEAD_DIMS) -> bool:
    """The calls the Gluon kernel is for: CUDA tensors on sm_90, 128-token blocks, D in ``head_dims``."""
    return (query.is_cuda and not INTERPRETED and torch.cuda.get_device_capability(query.device) == (9, 0)
            and block_size == 128 and query.shape[-1] in head_dims)


def _gluon_refusal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int) -> str | None:
    """Why the Gluon kernel cannot run this call, or None when it can: its case (``_gluon_case``),
    a tested Triton release, unit D stride and 16-byte aligned rows for q, k and v (all three go
    through TMA)."""
    if not _gluon_case(query, block_size):
        return f"it runs on sm_90 (Hopper) GPUs with 128-token blocks and head dims {GLUON_HEAD_DIMS}"
    if not gluon_tested_on(triton.__version__):
        return (f"it is tested on Triton {', '.join(GLUON_TRITON_RELEASES)} only, and this is Triton "
                f"{triton.__version__}")
    if not _tma_aligned(query, key, value):
        return "q, k and v must be 16-byte aligned with a unit head-dim stride"
    return None


def fp8_refusal(query: torch.Tensor, block_size: int) -> str | None:
    """Why ``precision="fp8"`` cannot run this call, or None when it can: the Gluon kernel's case
    on a tested Triton (its 8-bit inputs are fresh, aligned copies)."""
    if not _gluon_case(query, block_size, FP8_HEAD_DIMS):
        return f"it runs on sm_90 (Hopper) GPUs with 128-token blocks and head dims {FP8_HEAD_DIMS}"
    if not gluon_tested_on(triton.__version__):
        return (f"it is tested on Triton {', '.join(GLUON_TRITON_RELEASES)} only, and this is Triton "
                f"{triton.__version__}")
    return None


def _use_gluon(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int, kernel: str) -> bool:
    """Whether ``kernel`` (one of KERNELS) runs the Gluon kernel here; "auto" logs, once, why a
    call of the Gluon kernel's case cannot take it (an untested Triton, unaligned tensors)."""
    if kernel == "triton":
        return False
    refusal = _gluon_refusal(query, key, value, block_size)
    if kernel == "gluon" and refusal:
        raise ValueError(f"kernel='gluon' cannot run this call: {refusal}; use kernel='auto' or 'triton'")
    if refusal:
        if _gluon_case(query, block_size):
            log_once(f"rainfusion: the Gluon kernel for Hopper cannot run ({refusal}); the slower Triton kernel runs")
        return False
    return True


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """[B, H, N, D] tensors TMA can read: unit D stride, 16-byte aligned start and rows."""
    return all(t.stride(-1) == 1 and (t.stride(2) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def fp8_descriptors(q8: torch.Tensor, k8: torch.Tensor, v8t: torch.Tensor, ones: torch.Tensor,
                    block_size: int) -> tuple:
    """Host TMA descriptors (Gluon's) of the FP8 path's contiguous buffers (``fp8``), the heads
    flattened: q8, k8 int8 [B, H, N, D] as [B * H * N, D] (boxes [block_size / 2, D] for a
    consumer's half of a query block, [block_size, D]), v8t e4m3 [B, H, D, Nk padded] as [B * H *
    D, Nk padded] (box [D, block_size]) and the [8, block_size] ones tile whole. Made once per
    launch, they spare each program four in-kernel descriptors (~3.4 us, H200:
    benchmarks/NOTES.md session 10)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    def flat(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), [rows, cols], _fp8_tile_layout(cols))

    d = q8.shape[-1]
    return (flat(q8, block_size // 2, d), flat(k8, block_size, d), flat(v8t, d, block_size),
            flat(ones, *ones.shape))


@functools.lru_cache(maxsize=None)
def _fp8_tile_layout(cols: int):
    """The shared-memory layout of an 8-bit tile with rows of ``cols`` bytes (made once: its
    checks took 40% of ``fp8_descriptors``' host time)."""
    from triton.experimental.gluon.language import NVMMASharedLayout

    return NVMMASharedLayout(swizzle_byte_width=min(128, cols), element_bitwidth=8, rank=2)


def longest_rows_first(counts: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """int32 [B * H, q_blocks]: each head's query blocks by decreasing count of listed key blocks
    (ties in block order), the Gluon kernel's schedule with FP8. Programs start in grid order, one
    per SM at a time, so a long row (v2's dense first-frame and text rows) taken last by the last
    head would run on alone; longest first, the short rows fill in behind it. Within a head, so
    that the programs on the SMs at once still share that head's K/V in L2. counts: int32 [B or
    1, H or 1, q_blocks]."""
    counts = counts.expand(b, h, counts.shape[-1])
    return torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32).view(b * h, -1)


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's scratch for in-kernel descriptors, on the device the launch runs on."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


@torch.library.custom_op("rainfusion::block_sparse_attention_triton", mutates_args=())
def _block_sparse_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    kv_valid_len: Optional[torch.Tensor],
    block_size: int,
    scale: float,
    return_lse: bool,
    kernel: str,
    fp8: bool = False,
    token_order: Optional[torch.Tensor] = None,
    out_index: Optional[torch.Tensor] = None,
    key_center: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Nq, D], key/value [B, H, Nk, D] (any strides); counts int32 [B, H, q_blocks]
    and indices int32 [B, H, q_blocks, width] (stride 0 allowed); kv_valid_len int32 [B] or None;
    ``kernel``: one of KERNELS (decided here, on the real tensors: their alignment is not traceable);
    ``fp8``: the Gluon kernel on 8-bit copies (the caller checked ``fp8_refusal``), with
    ``token_order`` (int64 [N] or [B, H, N], only with fp8) of q, k, v's tokens in that order;
    ``out_index`` (int64 [Nq] or [B, H, Nq], a permutation) or None: query i's row of out and lse
    is out_index[i]; ``key_center`` (float32 [B, H, D], only with fp8) or None: the keys' centre
    (``fp8.quantize_attention_inputs``). Returns (out [B, H, Nq, D] in the layout of query, lse
    float32 [B, H, Nq] or [0])."""
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    out = empty_like_layout(query)
    lse = _empty_lse(query, return_lse)
    block_d = triton.next_power_of_2(d)
    block_q, block_n, num_warps, num_stages, maxnreg = _CONFIGS[(block_size, block_d)]
    lse_strides = lse.stride() if return_lse else (0, 0, 0)
    kv_valid = None if kv_valid_len is None else kv_valid_len.contiguous()  # the kernel reads it densely
    out_rows = None if out_index is None else out_index.expand(b, h, q_len)
    out_rows_strides = (0, 0, 0) if out_rows is None else out_rows.stride()
    if fp8 or _use_gluon(query, key, value, block_size, kernel):
        from . import _block_sparse_fwd_gluon

        triton.set_allocator(_descriptor_scratch)  # its in-kernel TMA descriptors (16 bits)
        if fp8:
            from .fp8 import quantize_attention_inputs, row_sum_ones

            q_in, k_in, v_in, q_scale, k_scale, v_scale, key_center = quantize_attention_inputs(
                query, key, value, block_size, token_order, key_center)
            ones = row_sum_ones(query.device, block_size)
            q_in, k_in, v_in, ones = fp8_descriptors(q_in, k_in, v_in, ones, block_size)
            qkv_strides = (0,) * 9  # (in the descriptors)
            scale_strides = (*q_scale.stride()[:2], *k_scale.stride()[:2], *v_scale.stride()[:2])
            schedule = longest_rows_first(counts, b, h)
        else:  # (q stands in for the pointers of the absent scales and ones, counts for the schedule)
            q_in, k_in, v_in = query, key, value
            q_scale = k_scale = v_scale = ones = query
            qkv_strides = (*query.stride()[:3], *key.stride()[:3], *value.stride()[:3])
            scale_strides = (0,) * 6
            schedule = counts
        _block_sparse_fwd_gluon.block_sparse_fwd_kernel[(num_blocks(q_len, block_size), b * h)](
            # (out and counts stand in for the pointers of an absent lse and kv_valid)
            q_in, k_in, v_in, out, lse if return_lse else out, counts, indices, counts if kv_valid is None else kv_valid,
            q_scale, k_scale, v_scale, ones, schedule,
            *qkv_strides, out.stride(0), out.stride(1), out.stride(2),
            *lse_strides, *counts.stride(), *indices.stride(), *scale_strides,
            h, q_len, kv_len, num_blocks(kv_len, block_size), scale * math.log2(math.e),
            out if out_rows is None else out_rows, *out_rows_strides,
            HEAD_DIM=d, BLOCK=block_size, STAGES=FP8_STAGES if fp8 else 3, RETURN_LSE=return_lse,
            HAS_KV_VALID=kv_valid is not None, FP8=fp8, HAS_OUT_INDEX=out_rows is not None, num_warps=4,
        )
        if fp8 and return_lse:  # the scores were of the centred keys: add q . key_center back
            shift = scale * (query @ key_center.to(query.dtype).unsqueeze(-1)).squeeze(-1).float()  # [B, H, Nq]
            permuted = token_order is not None and out_index is None  # (lse in the order of the tokens taken)
            lse += shift.gather(2, token_order.expand_as(shift)) if permuted else shift
        return out, lse
    grid = (num_blocks(q_len, block_q), b * h)
    _block_sparse_fwd.block_sparse_fwd_kernel[grid](
        query, key, value, out, lse if return_lse else None, counts, indices, kv_valid,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *lse_strides,
        *counts.stride(), *indices.stride(),
        h, q_len, kv_len, num_blocks(kv_len, block_size), scale * math.log2(math.e), out_rows, *out_rows_strides,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_KV_VALID=kv_valid_len is not None, RETURN_LSE=return_lse, USE_TMA=_use_tma(query, key, value),
        HAS_OUT_INDEX=out_rows is not None,
        num_warps=num_warps, num_stages=num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return out, lse


@_block_sparse_attention_op.register_fake
def _(query, key, value, counts, indices, kv_valid_len, block_size, scale, return_lse, kernel, fp8=False,
      token_order=None, out_index=None, key_center=None):
    return empty_like_layout(query), _empty_lse(query, return_lse)


def _check_kernel_inputs(query: torch.Tensor) -> None:
    """What this kernel needs beyond ``check_qkv``: device, dtype, head dim."""
    if query.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"query is on {query.device}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 "
            "set before triton is first imported)"
        )
    dtypes = INTERPRETER_DTYPES if INTERPRETED else DTYPES
    if query.dtype not in dtypes:
        raise TypeError(f"query dtype must be one of {dtypes}, got {query.dtype}")
    d = query.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"query head dim must be one of {HEAD_DIMS}, got {d}")


def block_sparse_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float,
    kv_valid_len: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    kernel: str = "auto",
    precision: str = "native",
    token_order: Optional[torch.Tensor] = None,
    restore_order: bool = False,
    key_center: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q k^T * scale) v over the key blocks that ``mask`` lists for each query block.

    query [B, H, Nq, D], key/value [B, H, Nk, D] with D in (64, 96, 128), bf16 or fp16 (views of
    [B, N, H, D] memory are read in place); mask of batch/heads B or 1 and H or 1. Keys at
    positions >= ``kv_valid_len[b]`` (int32 [B]) are masked out; rows that see no key give 0.
    Returns out [B, H, Nq, D] (same memory layout as query) and, with ``return_lse``, the
    natural log-sum-exp of the scaled scores, float32 [B, H, Nq] (-inf for empty rows).
    ``kernel``: "auto" (the Gluon kernel where it applies, on sm_90; else the Triton one), "gluon"
    (a ValueError where it cannot run) or "triton". ``precision``: "native" (products in the
    inputs' dtype) or "fp8" (the Gluon kernel on int8 q, k with per-block scales and e4m3 P, v, see
    ``fp8``; where it cannot run, the native kernels, logged once; not with kernel="triton").
    ``token_order``: int64 [N] or [B, H, N] (N = Nq = Nk) or None: attention of the tokens taken
    in that order (q, k, v gathered with it; ``mask``, ``kv_valid_len`` and the output are in
    it); with FP8 the gather is fused into the quantization pre-pass, else a row gather runs.
    ``restore_order`` (with a ``token_order`` that holds each token once, else a ValueError:
    ``_check_permutation``): the output and lse come back in the tokens' own order, written there
    by the kernel (the un-permutation fused into its store). ``key_center``: float32 [B, H, D]
    or None: with FP8 the keys are centred on it before their int8 quantization (softmax ignores
    the per-query shift it makes; the returned lse has it added back); None: on their mean, read
    in the pre-pass (``fp8``). Any vector gives the same attention, the mean the smallest error;
    RainFusion2.0's plans pass the mean of their key block means. Unused by the native kernels.
    """
    check_qkv(query, key, value)
    mask = check_block_mask(mask, query, key, name="mask")
    _check_kernel_inputs(query)
    kv_valid_len = check_kv_valid_len(kv_valid_len, query)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    check_precision(precision)
    fp8 = precision == "fp8"
    if fp8 and kernel == "triton":
        raise ValueError("precision='fp8' runs on the Gluon kernel, and kernel='triton' asks for the Triton one: "
                         "use kernel='auto' or 'gluon', or precision='native'")
    if fp8 and (refusal := fp8_refusal(query, mask.block_size)):
        if kernel == "gluon":
            raise ValueError(f"precision='fp8' cannot run this call: {refusal}; use precision='native'")
        log_fp8_fallback(refusal)
        fp8 = False
    if key_center is not None:
        _check_key_center(key_center, key)
    if restore_order and token_order is None:
        raise ValueError("restore_order=True puts the output back in the tokens' own order: it needs a token_order")
    out_index = None
    if token_order is not None:
        _check_token_order(token_order, query, key)
        if restore_order:
            _check_permutation(token_order)
        out_index = token_order if restore_order else None
        if not fp8:
            query, key, value = (gather_rows_triton(t, token_order) for t in (query, key, value))
            token_order = None
    with on_device(query):
        out, lse = _block_sparse_attention_op(query, key, value, mask.counts, mask.indices, kv_valid_len,
                                              mask.block_size, float(scale), return_lse, kernel, fp8, token_order,
                                              out_index, key_center if fp8 else None)
    return (out, lse) if return_lse else out


def _check_key_center(key_center: torch.Tensor, key: torch.Tensor) -> None:
    """key_center: float32 [B, H, D] of key's batch, heads and head dim, on its device."""
    if not isinstance(key_center, torch.Tensor) or key_center.dtype != torch.float32:
        raise TypeError(f"key_center must be a float32 tensor, got {getattr(key_center, 'dtype', type(key_center))}")
    b, h, _, d = key.shape
    if tuple(key_center.shape) != (b, h, d) or key_center.device != key.device:
        raise ValueError(f"key_center must be [B, H, D] = {(b, h, d)} on {key.device} (one centre of the keys per "
                         f"head), got {tuple(key_center.shape)} on {key_center.device}; pass None to centre the keys "
                         "on their mean")


def _check_token_order(token_order: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
    """token_order: int64 [N] or [B, H, N] on the inputs' device, N = Nq = Nk."""
    if not isinstance(token_order, torch.Tensor) or token_order.dtype != torch.int64:
        raise TypeError(f"token_order must be an int64 tensor, got {getattr(token_order, 'dtype', type(token_order))}")
    n = query.shape[2]
    shapes = ((n,), (*query.shape[:2], n))
    if key.shape[2] != n or tuple(token_order.shape) not in shapes or token_order.device != query.device:
        raise ValueError(f"token_order must be [N] or [B, H, N] with N = Nq = Nk on {query.device} (one order of the "
                         f"tokens of q, k and v), got {tuple(token_order.shape)} on {token_order.device} for "
                         f"Nq={n}, Nk={key.shape[2]}; gather the tensors yourself for other cases")


def _check_permutation(token_order: torch.Tensor) -> None:
    """With restore_order the kernels write output row token_order[i] for each i: an order that
    repeats a token would leave rows unwritten. An order not known to be a permutation (plans'
    orders are: ``permutation.mark_permutation``) is checked on the host once, and again after an
    in-place change; not while torch.compile traces or a CUDA graph is captured (no host sync)."""
    if torch.compiler.is_compiling() or (token_order.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if is_known_permutation(token_order):
        return
    n = token_order.shape[-1]
    rows = token_order.reshape(-1, n).sort(dim=1).values
    if not bool((rows == torch.arange(n, device=rows.device)).all()):
        raise ValueError(f"token_order must hold each of its N = {n} tokens once (a permutation of 0..N-1 per "
                         "row) with restore_order=True, which writes output row token_order[i]; with a token "
                         "repeated or missing pass restore_order=False and gather the output yourself")
    mark_permutation(token_order)
