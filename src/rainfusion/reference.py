"""Slow, exact oracles: masked dense attention in float64 and the fidelity metrics.

These materialise N x N matrices (``masked_attention``) and are meant for tests and small
benchmarks only; the metrics that the benchmark runs at larger sizes are chunked. Nothing in the
attention path imports this module.
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


def attention_recall(query: torch.Tensor, key: torch.Tensor, mask: BlockSparseMask, inverse: torch.Tensor,
                     *, scale: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [B, H]: dense attention mass inside the mask, averaged over query rows.

    query/key [B, H, N, D] in the original token order; ``mask`` was built on tokens permuted by
    an order whose inverse is ``inverse`` (int64 [N] or [B, H, N]: original token -> position).
    ``rows`` (int64 [R]) restricts the average to those query tokens; memory is O(R * N).
    """
    b, h, n, _ = query.shape
    rows = torch.arange(n, device=query.device) if rows is None else rows
    position = inverse.expand(b, h, n)
    q_block = position[..., rows] // mask.block_size  # [B, H, R]
    k_block = position // mask.block_size  # [B, H, N]
    kept = mask.expand(b, h).to_dense()  # [B, H, qb, kb]
    recall = torch.zeros(b, h, dtype=torch.float64, device=query.device)
    for chunk in torch.arange(rows.numel(), device=query.device).split(256):
        q = query[:, :, rows[chunk]].double()
        probs = torch.softmax((q @ key.double().transpose(-1, -2)) * scale, dim=-1)  # [B, H, c, N]
        row_blocks = torch.gather(kept, 2, q_block[..., chunk, None].expand(-1, -1, -1, kept.shape[-1]))
        inside = torch.gather(row_blocks, 3, k_block.unsqueeze(2).expand(-1, -1, chunk.numel(), -1))
        recall += (probs * inside).sum((-1, -2))
    return recall / rows.numel()


def relative_l2(output: torch.Tensor, target: torch.Tensor) -> float:
    """||output - target|| / ||target|| in float64."""
    out, ref = output.double(), target.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine_similarity(output: torch.Tensor, target: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened, in float64."""
    out, ref = output.double().flatten(), target.double().flatten()
    return float(out @ ref / (out.norm() * ref.norm()).clamp_min(1e-30))
