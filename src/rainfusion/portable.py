"""Block-sparse attention in plain PyTorch, for any torch device.

One query block at a time (all batch items and heads together): a row that visits every key
block runs fused SDPA over all keys; a row with a sparse list gathers only its listed key blocks
(work proportional to the kept blocks) and runs SDPA over them with a mask for unused slots and
the key tail; a row where only some heads are full runs SDPA over all keys with its block mask.
Peak memory is one query block's scores; no N x N tensor is formed. Heads with different masks
(and different patterns) share one call. Math in float32 (float64 for float64 inputs); the
output keeps the input dtype. Differentiable by autograd (the mask is a constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask import BlockSparseMask


def block_sparse_attention_portable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    mask: BlockSparseMask, *, scale: float, kv_valid_len: torch.Tensor | None = None,
                                    return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Nq, D], key/value [B, H, Nk, D], mask for (B, H) -> [B, H, Nq, D]; keys at
    positions >= ``kv_valid_len[b]`` (int [B]) are ignored; rows that see no key give 0. With
    ``return_lse`` also the natural log-sum-exp of the scaled scores over the visited keys, float32
    (float64 for float64 inputs) [B, H, Nq] (-inf for rows that see no key; the scores are then formed explicitly, not by SDPA).

    Reads ``mask.counts`` on the host once to sort the rows into full / sparse / mixed.
    """
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    bs = mask.block_size
    kv_blocks = mask.kv_blocks
    compute = torch.promote_types(query.dtype, torch.float32)
    q, k, v = (t.to(compute) for t in (query, key, value))
    padded = [F.pad(t, (0, 0, 0, kv_blocks * bs - n_k)).unflatten(2, (kv_blocks, bs)) for t in (k, v)]
    limit = torch.full((b,), n_k, device=query.device) if kv_valid_len is None else kv_valid_len.clamp(max=n_k)
    key_valid = torch.arange(kv_blocks * bs, device=query.device) < limit[:, None]  # [B, Nk padded]
    block_valid = key_valid.view(b, kv_blocks, bs)
    item = torch.arange(b, device=query.device).view(b, 1, 1)

    counts = mask.counts.long()
    full = counts == kv_blocks
    all_full = full.all(0).all(0).tolist()
    any_full = full.any(0).any(0).tolist()
    slot = torch.arange(mask.indices.shape[-1], device=query.device)
    out = torch.empty(b, h, n_q, d, dtype=compute, device=query.device)
    lse = torch.empty(b, h, n_q, dtype=compute, device=query.device) if return_lse else None
    dense_rows = None

    for row in range(mask.q_blocks):
        rows = slice(row * bs, min((row + 1) * bs, n_q))
        if any_full[row]:  # every key block for some heads: all keys, masked per head unless all full
            allowed = key_valid[:, None, None, :n_k]
            if not all_full[row]:
                if dense_rows is None:
                    dense_rows = mask.to_dense()
                allowed = dense_rows[:, :, row].repeat_interleave(bs, -1)[..., None, :n_k] & allowed
            _attend(q[:, :, rows], k, v, allowed, scale, out[:, :, rows], None if lse is None else lse[:, :, rows])
            continue
        listed = slot < counts[:, :, row, None]  # [B, H, W]
        blocks = torch.where(listed, mask.indices[:, :, row].long(), 0)
        gather = blocks[..., None, None].expand(-1, -1, -1, bs, d)
        k_sel, v_sel = (torch.gather(t, 2, gather).flatten(2, 3) for t in padded)  # [B, H, W*bs, D]
        allowed = (listed[..., None] & block_valid[item, blocks]).flatten(2)[:, :, None, :]
        _attend(q[:, :, rows], k_sel, v_sel, allowed, scale, out[:, :, rows], None if lse is None else lse[:, :, rows])
    return (out.to(query.dtype), lse) if return_lse else out.to(query.dtype)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float,
            out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Attention restricted to ``allowed`` (bool, broadcast to [B, H, 1, Nk]) written into
    ``out`` (and its log-sum-exp into ``lse`` when given); a row with no allowed key gives 0 (SDPA's
    softmax would give NaN there). Fused SDPA unless the log-sum-exp is wanted."""
    if lse is None:
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)
        out.copy_(torch.where(allowed.any(-1, keepdim=True), attended, 0.0))
        return
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse.copy_(torch.logsumexp(scores, dim=-1))
    out.copy_(torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ value)
