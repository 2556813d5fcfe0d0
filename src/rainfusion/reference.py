"""Slow, exact oracles: masked dense attention in float64 and the fidelity metrics.

These materialise N x N matrices (``masked_attention``) and are meant for tests and small
benchmarks only; the metrics that the benchmark runs at larger sizes are chunked.
"""

from __future__ import annotations

import torch

from .mask import BlockSparseMask


def token_mask(mask: BlockSparseMask) -> torch.Tensor:
    """bool [B, H, q_len, kv_len]: the block mask expanded to tokens."""
    dense = mask.to_dense()
    bs = mask.block_size
    expanded = dense.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
    return expanded[:, :, : mask.q_len, : mask.kv_len]


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | BlockSparseMask | None = None,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v computed in ``dtype``; rows with no key give 0.

    query [B, H, Nq, D], key/value [B, H, Nk, D]; mask bool [B or 1, H or 1, Nq, Nk] (True =
    attend) or a BlockSparseMask. Returns [B, H, Nq, D] in ``dtype``.
    """
    if isinstance(mask, BlockSparseMask):
        mask = token_mask(mask.expand(query.shape[0], query.shape[1]))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.to(dtype) for t in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # a row with no allowed key is all -inf: softmax gives NaN there, which becomes 0
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def relative_l2(output: torch.Tensor, target: torch.Tensor) -> float:
    """||output - target|| / ||target|| in float64."""
    out, ref = output.double(), target.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine_similarity(output: torch.Tensor, target: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened, in float64."""
    out, ref = output.double().flatten(), target.double().flatten()
    return float(out @ ref / (out.norm() * ref.norm()).clamp_min(1e-30))
