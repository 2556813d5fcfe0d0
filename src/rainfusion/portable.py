"""Block-sparse attention in plain PyTorch, for any torch device.

Query blocks are processed in chunks. A chunk of sparse rows gathers only the listed key blocks
(work proportional to the kept blocks); a chunk holding a full row attends to all keys with the
chunk's block mask applied. Peak memory is bounded by ``chunk_elements`` scores; no N x N tensor
is ever formed. Heads with different masks (and different patterns) share one call. Math in
float32; the output is returned in the input dtype.
"""

from __future__ import annotations

import torch

from .mask import BlockSparseMask

DEFAULT_CHUNK_ELEMENTS = 1 << 25


def _softmax_weighted_sum(scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to ``allowed``, times ``values``; empty rows give 0."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    return (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))


def _chunks(full_rows: list[bool], rows_per_chunk_sparse: int, rows_per_chunk_full: int):
    """Split query blocks into runs of equal fullness, each at most the run's chunk size."""
    start = 0
    while start < len(full_rows):
        full = full_rows[start]
        limit = rows_per_chunk_full if full else rows_per_chunk_sparse
        stop = start + 1
        while stop < len(full_rows) and full_rows[stop] == full and stop - start < limit:
            stop += 1
        yield start, stop, full
        start = stop


def block_sparse_attention_portable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    mask: BlockSparseMask, *, scale: float, kv_valid_len: torch.Tensor | None = None,
                                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """query [B, H, Nq, D], key/value [B, H, Nk, D], mask for (B, H) -> [B, H, Nq, D]; keys at
    positions >= ``kv_valid_len[b]`` (int [B]) are ignored.

    Reads ``mask.counts`` on the host once to find the chunks with full rows.
    """
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    bs = mask.block_size
    q_blocks, kv_blocks = mask.q_blocks, mask.kv_blocks
    width = mask.indices.shape[-1]

    q = torch.nn.functional.pad(query.float(), (0, 0, 0, q_blocks * bs - n_q)).unflatten(2, (q_blocks, bs))
    k = torch.nn.functional.pad(key.float(), (0, 0, 0, kv_blocks * bs - n_k))
    v = torch.nn.functional.pad(value.float(), (0, 0, 0, kv_blocks * bs - n_k))
    k_blocks, v_blocks = k.unflatten(2, (kv_blocks, bs)), v.unflatten(2, (kv_blocks, bs))
    limit = torch.full((b,), n_k, device=query.device) if kv_valid_len is None else kv_valid_len.clamp(max=n_k)
    key_valid = (torch.arange(kv_blocks * bs, device=query.device) < limit[:, None]).view(b, kv_blocks, bs)
    item = torch.arange(b, device=query.device).view(b, 1, 1, 1)
    dense_block_mask = None

    counts = mask.counts.long()
    full = counts == kv_blocks
    full_rows = full.any(0).any(0).tolist()
    out = torch.empty(b, h, q_blocks, bs, d, dtype=torch.float32, device=query.device)
    rows_sparse = max(1, chunk_elements // max(1, b * h * bs * width * bs))
    rows_full = max(1, chunk_elements // (b * h * bs * kv_blocks * bs))
    slot = torch.arange(width, device=query.device)

    for start, stop, has_full in _chunks(full_rows, rows_sparse, rows_full):
        q_chunk = q[:, :, start:stop] * scale  # [B, H, c, bs, D]
        if has_full:
            if dense_block_mask is None:
                dense_block_mask = mask.to_dense()
            allowed = dense_block_mask[:, :, start:stop, :, None] & key_valid[:, None, None]  # [B, H, c, nk, bs]
            allowed = allowed.flatten(-2).unsqueeze(-2)  # [B, H, c, 1, nk*bs]
            scores = q_chunk @ k.unsqueeze(2).transpose(-1, -2)
            out[:, :, start:stop] = _softmax_weighted_sum(scores, allowed, v.unsqueeze(2))
            continue
        if width == 0:  # every row here lists no block
            out[:, :, start:stop] = 0.0
            continue
        listed = slot < counts[:, :, start:stop, None]  # [B, H, c, W]
        idx = torch.where(listed, mask.indices[:, :, start:stop].long(), 0)
        flat = idx.flatten(2)  # [B, H, c*W]
        gather = flat[..., None, None].expand(-1, -1, -1, bs, d)
        k_sel = torch.gather(k_blocks, 2, gather).unflatten(2, idx.shape[2:])  # [B, H, c, W, bs, D]
        v_sel = torch.gather(v_blocks, 2, gather).unflatten(2, idx.shape[2:])
        allowed = (listed[..., None] & key_valid[item, idx]).flatten(-2).unsqueeze(-2)  # [B, H, c, 1, W*bs]
        scores = q_chunk @ k_sel.flatten(3, 4).transpose(-1, -2)
        out[:, :, start:stop] = _softmax_weighted_sum(scores, allowed, v_sel.flatten(3, 4))

    return out.flatten(2, 3)[:, :, :n_q].to(query.dtype)
