"""Skipped-block compensation: what the key blocks a mask skips would have added, estimated
from their block means, merged exactly with the block-sparse output through the log-sum-exp.

For a query q and a skipped key block j of n_j tokens with mean key k_j and mean value v_j, the
zeroth-order estimate puts n_j * exp(scale * q . k_j) in the softmax normaliser and that times
v_j in the numerator: attention of q over the block means with a log(n_j) bias, restricted to
the skipped blocks. It costs N x kv_blocks x D per head (1 / block_size of dense attention) and
is most accurate where the scores within a block vary little: the diffuse heads, where the
dropped blocks carry the most mass. Exact when nothing is skipped.
"""

from __future__ import annotations

import torch

from .mask import BlockSparseMask, block_lengths

# query rows per chunk are chosen so that one chunk's scores stay near this many elements
_CHUNK_ELEMENTS = 1 << 26


def skipped_block_estimate(query: torch.Tensor, k_mean: torch.Tensor, v_mean: torch.Tensor, mask: BlockSparseMask,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Nq, Dv], lse [B, H, Nq]), float32 (float64 for float64 inputs): softmax
    attention of query [B, H, Nq, D] over the means ([B, H, kv_blocks, D] and [..., Dv]) of the
    key blocks ``mask`` skips, each weighted by its token count; rows that skip nothing give lse
    -inf and 0. No host synchronisation."""
    b, h, n_q, _ = query.shape
    compute = torch.promote_types(query.dtype, torch.float32)
    k_mean, v_mean = k_mean.to(compute), v_mean.to(compute)
    bs, kv_blocks, n_k = mask.block_size, mask.kv_blocks, mask.kv_len
    skipped = ~mask.to_dense().expand(b, h, -1, -1)  # [B, H, q_blocks, kv_blocks]
    bias = block_lengths(n_k, bs, dtype=compute, device=query.device).log()
    lse = torch.empty(b, h, n_q, dtype=compute, device=query.device)
    out = torch.empty(b, h, n_q, v_mean.shape[-1], dtype=compute, device=query.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * kv_blocks * bs)) * bs
    for start in range(0, n_q, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_q))
        q_blocks = torch.arange(rows.start, rows.stop, device=query.device) // bs
        scores = (query[:, :, rows].to(compute) @ k_mean.transpose(-1, -2)) * scale + bias
        scores = scores.masked_fill(~skipped[:, :, q_blocks], float("-inf"))
        lse[:, :, rows] = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[:, :, rows, None]).nan_to_num(0.0)  # rows skipping nothing: 0
        out[:, :, rows] = weights @ v_mean
    return out, lse


def merge_with_estimate(out: torch.Tensor, lse: torch.Tensor, estimate: torch.Tensor,
                        estimate_lse: torch.Tensor) -> torch.Tensor:
    """The softmax over the union of two disjoint key sets from each set's normalised output
    ([B, H, N, D]) and natural log-sum-exp ([B, H, N], -inf where a set is empty), in the
    estimate's dtype."""
    lse = lse.to(estimate_lse.dtype)
    total = torch.logaddexp(lse, estimate_lse)
    exact_share = torch.exp(lse - total).nan_to_num(0.0)[..., None]
    estimate_share = torch.exp(estimate_lse - total).nan_to_num(0.0)[..., None]
    return out.to(estimate.dtype) * exact_share + estimate * estimate_share
