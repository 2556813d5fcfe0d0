"""Which implementation runs each device op, and the one importer of ``kernels/``.

Block-sparse attention (``resolve_backend``, ``run_block_sparse``):

- ``fa4``: FlashAttention-4's block-sparse forward (optional ``flash-attn-4``, SM90+ GPUs,
  bf16/fp16, head dims 64/128, 128-token blocks): the fastest measured on an H100;
- ``triton``: our Triton kernel (CUDA GPUs; CPU only under ``TRITON_INTERPRET=1``);
- ``portable``: plain PyTorch, any device;
- ``auto``: on CUDA ``fa4`` where it applies and is the faster (head dim 128), else ``triton``,
  else ``portable`` (a fallback from the fastest kernel is logged once); ``portable`` elsewhere.

``precision="fp8"`` (opt-in) runs on ``triton``'s Gluon kernel for Hopper, which ``auto`` then
takes; where that kernel cannot run, the native precision runs (logged once); ``fa4`` and
``portable`` have no FP8 path and refuse it.

Gradients: ``portable`` is plain PyTorch, so autograd differentiates it (the mask is a constant); ``fa4`` and ``triton`` are forward only and refuse inputs that need a
gradient, for which ``auto`` picks ``portable`` (logged once). Under ``torch.no_grad()`` or
``torch.inference_mode()`` nothing needs a gradient.

Dense work (warm-up steps, dense layers) goes to ``dense_attention``: FA4 dense where it applies,
else PyTorch SDPA. Token permutations (``gather_tokens``), v2's block means (``block_means``) and
its top-N selection (``predict_from_means``) run on Triton kernels on CUDA, PyTorch elsewhere.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._logging import log_fp8_fallback, log_once
from ._validation import check_precision
from .compensation import merge_with_estimate, skipped_block_estimate
from .config import RainFusion2Config
from .mask import BlockSparseMask, key_padding_mask
from .permutation import dense_block_range
from .portable import block_sparse_attention_portable
from .predictor import block_budget, block_means as block_means_torch, predict_from_means as predict_from_means_torch

BACKENDS = ("auto", "fa4", "triton", "portable")
# head dims where ``auto`` prefers FA4's block-sparse call to our kernel: on an H200 (CogVideoX
# 5B, 48 heads x 64, 17,550 tokens) our Triton kernel was 7% faster at density 0.2 (2.04 vs
# 2.20 ms) and 12% at 0.1 (1.23 vs 1.41), even at 0.5; at 128 FA4 is (HunyuanVideo 720p at 0.2:
# 54.2 vs 61.1 ms). Both in benchmarks/results/attention-h200-2026-12-01*.json.
FA4_FIRST_HEAD_DIMS = (128,)
# SDPA kernels for dense CUDA calls, fastest first (H100: cuDNN 1.6x flash at HunyuanVideo 720p);
# SDPA's own order tries flash first
SDPA_ON_CUDA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Autograd would record an op on these tensors (grad mode on, one of them requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _fa4_applies(query: torch.Tensor, block_size: int) -> bool:
    from .kernels.fa4 import HEAD_DIMS, fa4_available

    return (fa4_available(query.device.index or 0) and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] in HEAD_DIMS and block_size == 128)


def _triton_kernel_takes(query: torch.Tensor) -> bool:
    """Our Triton kernel is installed and takes this CUDA query's dtype and head dim."""
    if not (query.is_cuda and triton_available()):
        return False
    from .kernels.block_sparse import DTYPES, HEAD_DIMS

    return query.dtype in DTYPES and query.shape[-1] in HEAD_DIMS


def _fp8_refusal(query: torch.Tensor, block_size: int, grad: bool) -> str | None:
    """Why ``precision="fp8"`` cannot run this call, or None when the FP8 Gluon kernel can."""
    if grad:
        return "the inputs require grad, and the FP8 kernel is forward only"
    if not (query.is_cuda and triton_available()):
        return "it needs Triton and CUDA tensors"
    from .kernels.block_sparse import fp8_refusal

    return fp8_refusal(query, block_size)


def resolve_backend(backend: str, query: torch.Tensor, block_size: int, padded_keys: bool = False,
                    grad: bool = False, precision: str = "native") -> str:
    """The backend that will run ``query`` [B, H, N, D] with masks of ``block_size`` for the
    requested ``backend``; ``padded_keys``: the call has per-item valid key counts (FA4 can't);
    ``grad``: the inputs need a gradient (only the portable backend has one); ``precision``: one
    of ``PRECISIONS`` (with "fp8", ``triton`` where its FP8 kernel runs)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_precision(precision)
    if precision == "fp8":
        if backend in ("fa4", "portable"):
            raise ValueError(f"precision='fp8' runs on our Gluon kernel for Hopper (backend 'triton' or 'auto'); "
                             f"backend={backend!r} has no FP8 path: use precision='native' with it")
        if backend == "auto":
            refusal = _fp8_refusal(query, block_size, grad)
            if refusal is None:
                return "triton"
            log_fp8_fallback(refusal)
    device = query.device
    if grad and backend in ("fa4", "triton"):
        raise ValueError(f"backend={backend!r} is forward only, and the inputs require grad: use backend='portable' "
                         "(or 'auto') to train through it, or call it under torch.no_grad() for inference")
    if backend == "auto":
        if device.type != "cuda":
            return "portable"
        if grad:
            log_once("rainfusion: the inputs require grad, and the GPU kernels are forward only: the slower "
                     "portable backend runs (use torch.no_grad() or torch.inference_mode() for inference)")
            return "portable"
        if _fa4_applies(query, block_size) and not padded_keys and query.shape[-1] in FA4_FIRST_HEAD_DIMS:
            return "fa4"
        if not triton_available():
            log_once("rainfusion: Triton is not installed; using the slower portable backend on CUDA")
            return "portable"
        if not _triton_kernel_takes(query):
            from .kernels.block_sparse import DTYPES, HEAD_DIMS

            log_once(f"rainfusion: the Triton kernel takes {DTYPES} and head dims {HEAD_DIMS}; "
                     f"{query.dtype} with head dim {query.shape[-1]} runs on the slower portable backend")
            return "portable"
        return "triton"
    if backend == "triton" and not (triton_available() and _triton_runs_on(device)):
        raise ValueError(
            f"backend='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1), got tensors on "
            f"{device}; use backend='portable' or 'auto'"
        )
    if backend == "fa4" and padded_keys:
        raise ValueError("backend='fa4' does not take kv_valid_len; use backend='triton' or 'auto'")
    if backend == "fa4" and not (device.type == "cuda" and _fa4_applies(query, block_size)):
        raise ValueError(
            "backend='fa4' needs flash-attn-4 on an SM90+ GPU, bf16/fp16 tensors, head dim 64 or 128 and "
            f"128-token blocks; got {query.dtype}, head dim {query.shape[-1]}, block {block_size} on {device}"
        )
    return backend


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    kv_valid_len: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Full attention on the fastest dense kernel that applies: FA4 on SM90+ GPUs where installed
    (1.13-1.22x SDPA cuDNN on an H100), else PyTorch SDPA (cuDNN first on CUDA). Keys at
    positions >= kv_valid_len[b] are masked out: on CUDA by our Triton kernel with a full block
    mask (HunyuanVideo 720p dense steps 1.21x faster than on SDPA cuDNN with the key mask, H100),
    elsewhere by SDPA with a mask; inputs that need a gradient always go to SDPA. Returns
    (output, backend name)."""
    forward_only = not needs_grad(query, key, value)
    if kv_valid_len is not None:
        if forward_only and _triton_kernel_takes(query):
            from .kernels.block_sparse import block_sparse_attention_triton

            full = BlockSparseMask.full(query.shape[2], key.shape[2], device=query.device)
            return block_sparse_attention_triton(query, key, value, full, scale=scale,
                                                 kv_valid_len=kv_valid_len), "triton"
        allowed = key_padding_mask(kv_valid_len, key.shape[2])
        return _sdpa(query, key, value, scale, allowed), "sdpa"
    if forward_only and query.is_cuda and _fa4_applies(query, 128):
        from .kernels.fa4 import dense_attention_fa4

        return dense_attention_fa4(query, key, value, scale=scale), "fa4"
    return _sdpa(query, key, value, scale), "sdpa"


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch SDPA, on CUDA with cuDNN's kernel first."""
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    with sdpa_kernel(SDPA_ON_CUDA, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


def run_block_sparse(backend: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: BlockSparseMask, scale: float, kv_valid_len: torch.Tensor | None = None,
                     return_lse: bool = False, precision: str = "native",
                     token_order: torch.Tensor | None = None,
                     inverse_order: torch.Tensor | None = None,
                     key_center: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to a resolved backend; tensors [B, H, N, D], output in the input dtype;
    kv_valid_len int32 [B] or None (not with fa4); with ``return_lse`` also the natural
    log-sum-exp of the visited scores, float32 [B, H, N] (-inf for rows that see no key);
    ``precision`` reaches the ``triton`` backend only (``resolve_backend`` sends FP8 there).
    ``token_order`` (``gather_tokens``' index) or None: attention of the tokens taken in that
    order, the mask's and the output's; the ``triton`` backend gathers them itself (with FP8 in
    its quantization pre-pass), the others get gathered copies. ``inverse_order`` (the index that
    undoes ``token_order``) or None: the output and lse come back in the tokens' own order, which
    the ``triton`` backend's kernels write directly (no gather), the others gather.
    ``key_center`` (float32 [B, H, D]) or None: the vector FP8's pre-pass centres the keys on
    (``block_sparse_attention_triton``); the result does not depend on it, and only the
    ``triton`` backend with FP8 uses it."""
    if inverse_order is not None and token_order is None:
        raise ValueError("inverse_order undoes a token_order: pass the token_order too (or neither)")
    if backend == "triton":
        from .kernels.block_sparse import block_sparse_attention_triton

        return block_sparse_attention_triton(query, key, value, mask, scale=scale, kv_valid_len=kv_valid_len,
                                             return_lse=return_lse, precision=precision, token_order=token_order,
                                             restore_order=inverse_order is not None, key_center=key_center)
    if token_order is not None:
        query, key, value = (gather_tokens(t, token_order) for t in (query, key, value))
    if backend == "fa4":
        from .kernels.fa4 import block_sparse_attention_fa4

        result = block_sparse_attention_fa4(query, key, value, mask, scale=scale, return_lse=return_lse)
    else:
        result = block_sparse_attention_portable(query, key, value, mask, scale=scale, kv_valid_len=kv_valid_len,
                                                 return_lse=return_lse)
    if inverse_order is None:
        return result
    if not return_lse:
        return gather_tokens(result, inverse_order)
    out, lse = result
    return gather_tokens(out, inverse_order), gather_tokens(lse.unsqueeze(-1), inverse_order).squeeze(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] reordered along N: ``out[..., i, :] = x[..., index[i], :]``.

    index is int64 [N] (one order for all heads) or [B, H, N] (one order per head). On CUDA a
    Triton row gather runs at near copy bandwidth (2.3x ``index_select`` on an H100); where x
    needs a gradient, PyTorch's differentiable gathers.
    """
    if x.is_cuda and triton_available() and not needs_grad(x):
        from .kernels.gather_rows import gather_rows_triton

        return gather_rows_triton(x, index)
    if index.dim() == 1:
        return x.index_select(2, index)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def block_means(x: torch.Tensor, block_size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, H, ceil(N / block_size), D]: the block means of x [B, H, N, D] taken in the token
    order ``index`` (int64 [N]; None: as it is), non-finite elements counted as 0
    (``predictor.block_means``). On CUDA one Triton kernel reads x once, with no permuted copy."""
    if x.is_cuda and triton_available():
        from .kernels.block_means import block_means_triton

        return block_means_triton(x, block_size, index)
    return block_means_torch(x if index is None else x.index_select(2, index), block_size)


def predict_from_means(q_mean: torch.Tensor, k_mean: torch.Tensor, *, seq_len: int, num_dense: int,
                       num_dense_tail: int = 0, config: RainFusion2Config, scale: float) -> BlockSparseMask:
    """``predictor.predict_from_means`` (block means float32 [B, H, blocks, D] of the permuted
    query and key). On CUDA with ``selection="topk"`` the selection runs in one Triton kernel
    instead of a softmax and two sorts (``kernels.top_blocks``): the same mask but for ties, as
    it ranks by the scores and torch by their softmax, whose float32 values can tie."""
    blocks = q_mean.shape[2]
    if q_mean.is_cuda and triton_available() and config.selection == "topk":
        from .kernels.top_blocks import MAX_BLOCKS, top_blocks_triton

        if blocks <= MAX_BLOCKS:
            head, tail_start = dense_block_range(seq_len, num_dense, num_dense_tail, config.block_size)
            width = block_budget(blocks, head, tail_start, config)[2]
            counts, indices = top_blocks_triton(q_mean @ k_mean.transpose(-1, -2), width, head, tail_start,
                                                config.force_diagonal, scale)
            return BlockSparseMask(counts, indices, seq_len, seq_len, config.block_size, check=False)
        log_once(f"v2's mask over {blocks} key blocks is selected by torch's sorts: the Triton selection "
                 f"holds at most {MAX_BLOCKS} in registers")
    return predict_from_means_torch(q_mean, k_mean, seq_len=seq_len, num_dense=num_dense,
                                    num_dense_tail=num_dense_tail, config=config, scale=scale)


def compensate_skipped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockSparseMask,
                       exact: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """The block-sparse output ``exact`` [B, H, N, D] (with its natural log-sum-exp ``lse``
    [B, H, N]) merged with the estimate of the blocks ``mask`` skips from the block means of
    key and value (``compensation``), in query's dtype. On CUDA one fused Triton kernel (no
    N x kv_blocks scores in memory); elsewhere, and where autograd needs it, PyTorch."""
    k_mean, v_mean = (block_means(t, mask.block_size) for t in (key, value))
    if (query.is_cuda and triton_available() and not needs_grad(query, key, value)
            and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] == value.shape[-1]):
        from .kernels.skipped_blocks import compensate_triton

        return compensate_triton(query, k_mean, v_mean, mask.to_dense(), exact, lse.float(), mask.block_size,
                                 key.shape[2], scale)
    estimate, estimate_lse = skipped_block_estimate(query, k_mean, v_mean, mask, scale)
    return merge_with_estimate(exact, lse, estimate, estimate_lse).to(query.dtype)
