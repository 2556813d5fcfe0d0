"""Random block masks for tests: every row kind (empty, sparse, full) and a narrow table."""

from __future__ import annotations

import torch

from rainfusion.mask import BlockSparseMask, num_blocks


def random_block_mask(batch: int, heads: int, q_len: int, kv_len: int, block_size: int, *,
                      density: float = 0.4, generator: torch.Generator | None = None) -> BlockSparseMask:
    """A BlockSparseMask with random kept blocks, plus one full and one empty row when possible."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    dense = torch.rand(batch, heads, qb, kb, generator=generator) < density
    if qb >= 3:
        dense[:, :, 0] = True  # full row
        dense[:, :, 1] = False  # empty row
    return BlockSparseMask.from_dense(dense, q_len=q_len, kv_len=kv_len, block_size=block_size)
