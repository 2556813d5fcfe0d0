"""FlashAttention-4 (CuTe DSL, optional ``flash-attn-4``) as a block-sparse backend.

Our kept blocks are FA4's *full* blocks (no mask function inside them); FA4 visits only those.
FA4 reads ``full_block_idx`` up to each row's count, so full rows need their indices written
out (``BlockSparseMask.full_indices``). Needs an SM90+ GPU.
"""

from __future__ import annotations

import functools

import torch

from ..mask import BlockSparseMask

HEAD_DIMS = (64, 128)  # the head dims tested on an H100


@functools.lru_cache(maxsize=None)
def fa4_available(device_index: int = 0) -> bool:
    """True when flash-attn-4 imports and the GPU is Hopper (SM90) or newer."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception:  # an incomplete CuTe DSL install raises more than ImportError
        return False
    return True


def dense_attention_fa4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Dense FA4 attention; tensors [B, H, N, D] (views of [B, N, H, D] memory cost no copy)."""
    from flash_attn.cute.interface import flash_attn_func

    out = flash_attn_func(*(t.transpose(1, 2) for t in (query, key, value)), softmax_scale=scale)
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def block_sparse_attention_fa4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockSparseMask,
                               *, scale: float, return_lse: bool = False):
    """FA4 block-sparse forward over the blocks of ``mask``; tensors [B, H, N, D] -> [B, H, N, D]
    and, with ``return_lse``, the natural log-sum-exp of the scaled scores, float32 [B, H, N]."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    no_partial = torch.zeros_like(mask.counts)
    tensors = BlockSparseTensorsTorch(
        mask_block_cnt=no_partial,
        mask_block_idx=no_partial.unsqueeze(-1),
        full_block_cnt=mask.counts,
        full_block_idx=mask.full_indices(),
        block_size=(mask.block_size, mask.block_size),
    )
    result = flash_attn_func(*(t.transpose(1, 2) for t in (query, key, value)), softmax_scale=scale,
                             block_sparse_tensors=tensors, return_lse=return_lse)
    out = (result[0] if isinstance(result, tuple) else result).transpose(1, 2)
    return (out, result[1]) if return_lse else out
