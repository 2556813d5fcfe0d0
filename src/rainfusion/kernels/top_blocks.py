"""Launcher of the Triton top-N block selection (RainFusion2.0's mask on CUDA), a torch custom op.

Selects each query block's key blocks from its pooled scores without sorting them: torch's path
(softmax, a full sort of every row, a second sort of the kept indices) becomes one pass per row.
"""

import torch
import triton

from . import _top_blocks
from .memory import on_device

MAX_BLOCKS = 16384  # one row in registers per program (64 keys per thread at 8 warps)


@torch.library.custom_op("rainfusion::top_blocks", mutates_args=())
def top_blocks_triton(scores: torch.Tensor, width: int, head: int, tail_start: int, force_diagonal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores float32 [B, H, blocks, blocks] (q_mean k_mean^T, unit column stride), blocks <=
    MAX_BLOCKS -> (counts int32 [B, H, blocks], indices int32 [B, H, blocks, width]): each
    row's ``width`` key blocks of the highest ``scale * score`` in ascending order, the forced
    ones (< ``head``, >= ``tail_start``, the diagonal with ``force_diagonal``) first and ties to
    the lower block; counts ``width``, or ``blocks`` in the forced rows (< head, >= tail_start)."""
    b, h, rows, blocks = scores.shape
    counts = scores.new_empty(b, h, rows, dtype=torch.int32)
    indices = scores.new_empty(b, h, rows, width, dtype=torch.int32)
    blocks_p2 = triton.next_power_of_2(blocks)
    with on_device(scores):
        _top_blocks.top_blocks_kernel[(rows, b * h)](
            scores, counts, indices, *scores.stride()[:3], *counts.stride()[:2], *indices.stride()[:3],
            h, blocks, width, head, tail_start, scale,
            FORCE_DIAGONAL=force_diagonal, BLOCKS_P2=blocks_p2, num_warps=4 if blocks_p2 <= 2048 else 8,
        )
    return counts, indices


@top_blocks_triton.register_fake
def _(scores, width, head, tail_start, force_diagonal, scale):
    b, h, rows, _ = scores.shape
    return (scores.new_empty(b, h, rows, dtype=torch.int32), scores.new_empty(b, h, rows, width, dtype=torch.int32))
