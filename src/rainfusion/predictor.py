"""RainFusion2.0 mask prediction: block-mean Q and K, pooled softmax, top-N / top-p blocks.

Runs on permuted tokens (dense region first, see ``permutation``). One mask per batch item and
head. The dense region's query blocks are full rows, its key blocks are always kept, and so is
the diagonal block (``force_diagonal``). The top-N budget is spent on the other blocks, so every
non-full row keeps its forced blocks plus N more (the realized density is the nominal one plus
the forced blocks, reported by ``BlockSparseMask.density``). No host synchronisation.
A non-finite element of Q or K counts as 0 in its block mean, so one NaN or inf token cannot
change the mask (dense attention confines a non-finite query to its own output row).
"""

from __future__ import annotations

import math

import torch

from .config import RainFusion2Config
from .mask import BlockSparseMask, block_lengths, num_blocks
from .permutation import dense_block_range


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, H, N, D] -> float32 (float64 for float64 x) [B, H, ceil(N / block_size), D]; a tail
    block averages its real tokens, and a non-finite element counts as 0 (``backends.block_means``
    runs the same on a Triton kernel on CUDA)."""
    x = x.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    n = x.shape[2]
    whole = n // block_size
    # sum with an fp32 (fp64) accumulator straight from the (finite) input: no copy of x
    accumulate = torch.promote_types(x.dtype, torch.float32)
    sums = x[:, :, : whole * block_size].unflatten(2, (whole, block_size)).sum(3, dtype=accumulate)
    if whole * block_size < n:
        tail = x[:, :, whole * block_size:].sum(2, keepdim=True, dtype=accumulate)
        sums = torch.cat([sums, tail], dim=2)
    return sums / block_lengths(n, block_size, dtype=accumulate, device=x.device)[:, None]


def token_mean(means: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """The mean over all ``num_tokens`` tokens [B, H, D] from their block means [B, H, blocks, D]
    (``block_means``, in any token order: a tail block weighs its real tokens). Three torch ops
    (on the FP8 path's host, where seven took 0.35 ms after a synchronisation on an H200)."""
    tail = num_tokens - (means.shape[2] - 1) * block_size  # tokens of the last block
    total = means.sum(2).mul_(block_size / num_tokens)
    return total if tail == block_size else total.add_(means[:, :, -1], alpha=(tail - block_size) / num_tokens)


def keep_count(kv_blocks: int, sparsity: float) -> int:
    """Top-N budget per query block: ceil(kv_blocks * (1 - sparsity)), at least 1."""
    return max(1, math.ceil(kv_blocks * (1.0 - sparsity) - 1e-9))


def block_budget(blocks: int, head: int, tail_start: int, config: RainFusion2Config) -> tuple[int, int, int]:
    """(forced blocks per row, the top-N budget ``keep_count``, the widest row's count) for
    ``blocks`` key blocks of which those < head and >= tail_start are forced (``dense_block_range``),
    and the diagonal with ``force_diagonal``."""
    forced_count = min(blocks, head + blocks - tail_start + int(config.force_diagonal))
    keep = keep_count(blocks, config.sparsity)
    return forced_count, keep, min(blocks, max(keep, forced_count) if config.forced_in_budget else keep + forced_count)


def predict_block_mask(query: torch.Tensor, key: torch.Tensor, *, num_dense: int, num_dense_tail: int = 0,
                       config: RainFusion2Config, scale: float) -> BlockSparseMask:
    """BlockSparseMask [B, H] for permuted query/key [B, H, N, D] whose first ``num_dense`` and
    last ``num_dense_tail`` tokens are the dense region (text, first-frame sink)."""
    bs = config.block_size
    return predict_from_means(block_means(query, bs), block_means(key, bs), seq_len=query.shape[2],
                              num_dense=num_dense, num_dense_tail=num_dense_tail, config=config, scale=scale)


def predict_from_means(q_mean: torch.Tensor, k_mean: torch.Tensor, *, seq_len: int, num_dense: int,
                       num_dense_tail: int = 0, config: RainFusion2Config, scale: float) -> BlockSparseMask:
    """``predict_block_mask`` from the block means (float32 [B, H, blocks, D]) of the permuted
    query and key of ``seq_len`` tokens."""
    bs, n = config.block_size, seq_len
    blocks = num_blocks(n, bs)
    head, tail_start = dense_block_range(n, num_dense, num_dense_tail, bs)
    device = q_mean.device
    block = torch.arange(blocks, device=device)
    dense = (block < head) | (block >= tail_start)
    probs = torch.softmax((q_mean @ k_mean.transpose(-1, -2)) * scale, dim=-1)  # [B, H, nb, nb]

    forced = dense.expand(blocks, blocks)
    if config.force_diagonal:
        forced = forced | torch.eye(blocks, dtype=torch.bool, device=device)
    forced_count, keep, width = block_budget(blocks, head, tail_start, config)

    # probabilities are <= 1, so +2 ranks every forced block first; a full sort is faster than
    # topk for widths this large on GPUs (0.75 vs 1.19 ms at hunyuan-720p on an H100)
    rank_score, ranked = torch.sort(probs + 2.0 * forced, dim=-1, descending=True)
    if config.selection == "adaptive":
        budget = keep - forced_count if config.forced_in_budget else keep
        extra, most = _adaptive_counts(rank_score[..., forced_count:], dense, budget, config.adaptive_range)
        width, counts = forced_count + most, forced_count + extra
    rank_score, ranked = rank_score[..., :width], ranked[..., :width]
    if config.selection == "topk":
        counts = torch.full(ranked.shape[:-1], width, device=device)
    elif config.selection == "topp":
        mass = torch.cumsum(rank_score - 2.0 * (rank_score > 1.0), dim=-1)
        reach = (mass < config.top_p).sum(-1) + 1
        counts = reach.clamp(forced_count, width)
    counts = torch.where(dense, blocks, counts)

    slot = torch.arange(width, device=device)
    ranked = torch.where(slot < counts.unsqueeze(-1), ranked, blocks)
    indices = torch.sort(ranked, dim=-1).values
    return BlockSparseMask(counts.to(torch.int32), indices.to(torch.int32), n, n, bs, check=False)


def _adaptive_counts(free_probs: torch.Tensor, dense_rows: torch.Tensor, budget: int,
                     bounds: tuple[float, float], iterations: int = 24) -> tuple[torch.Tensor, int]:
    """(non-forced blocks to keep per (batch, head, query block), int64 [B, H, q_blocks]; the
    most any may keep). From the pooled probabilities of the non-forced blocks sorted in
    descending order (float32 [B, H, q_blocks, free]): the blocks at or above one probability
    threshold per batch item, shared by all its heads and query blocks, found by bisection on its
    logarithm (a fixed number of steps: no host synchronisation) so that the mean count over the
    sparse rows (``dense_rows`` bool [q_blocks] excluded) is at most ``budget``; each count within
    ``bounds`` times the budget. The blocks kept are thus those of the highest pooled probability
    across heads: a concentrated head keeps its few likely blocks, a diffuse one more."""
    b, h, rows, free = free_probs.shape
    budget = max(0, budget)
    low_count = min(free, math.floor(budget * bounds[0]))
    high_count = min(free, math.ceil(budget * bounds[1]))
    if free == 0 or budget == 0:
        return free_probs.new_zeros((b, h, rows), dtype=torch.long), 0
    ascending = -free_probs.contiguous()  # count of p >= t = position of -t in -p (ascending)
    sparse = (~dense_rows).expand(b, h, rows)
    sparse_rows = sparse.sum((1, 2)).clamp_min(1)

    def counts_at(log_threshold: torch.Tensor) -> torch.Tensor:  # [B]
        target = (-log_threshold.exp()).view(b, 1, 1, 1).expand(b, h, rows, 1).contiguous()
        return torch.searchsorted(ascending, target, right=True).squeeze(-1).clamp(low_count, high_count)

    # log-probabilities of float32 softmax outputs lie above log(tiny) ~ -87.3
    low = torch.full((b,), math.log(torch.finfo(torch.float32).tiny), device=free_probs.device)
    high = torch.zeros(b, device=free_probs.device)
    for _ in range(iterations):
        middle = (low + high) / 2
        fits = (counts_at(middle) * sparse).sum((1, 2)) / sparse_rows <= budget
        high, low = torch.where(fits, middle, high), torch.where(fits, low, middle)
    return counts_at(high), high_count
