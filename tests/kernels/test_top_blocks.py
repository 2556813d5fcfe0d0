"""The Triton top-N block selection (CUDA path of v2's mask) against a stable sort and against
the torch predictor: forced blocks first, ties to the lower block, tails and dense rows."""

import pytest
import torch

pytest.importorskip("triton")
from _helpers import DEVICE  # noqa: E402
from rainfusion import backends  # noqa: E402
from rainfusion.config import RainFusion2Config  # noqa: E402
from rainfusion.kernels.top_blocks import top_blocks_triton  # noqa: E402
from rainfusion.permutation import dense_block_range  # noqa: E402
from rainfusion.predictor import block_budget, predict_from_means  # noqa: E402


def reference_top_blocks(scores: torch.Tensor, width: int, head: int, tail_start: int, force_diagonal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) by a stable descending sort of scale * scores with the forced blocks
    raised above every score: the ``width`` first in ascending order."""
    b, h, rows, blocks = scores.shape
    column = torch.arange(blocks)
    forced = ((column < head) | (column >= tail_start)).expand(rows, blocks)
    if force_diagonal:
        forced = forced | torch.eye(rows, blocks, dtype=torch.bool)
    ranked = torch.where(forced, torch.inf, scores.float() * scale)  # float32, as the kernel ranks
    kept = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :width]
    row = torch.arange(rows)
    counts = torch.where((row < head) | (row >= tail_start), blocks, width).expand(b, h, rows)
    return counts.int(), torch.sort(kept, dim=-1).values.int()


@pytest.mark.parametrize("batch,heads,blocks,width,head,tail_start,force_diagonal", [
    (2, 3, 37, 9, 2, 35, True), (1, 2, 130, 30, 0, 130, False), (2, 2, 5, 5, 1, 5, True),
    (1, 2, 200, 41, 3, 197, True), (1, 1, 1, 1, 0, 1, True),
])
def test_top_blocks_match_a_stable_sort(batch, heads, blocks, width, head, tail_start, force_diagonal):
    """Random scores, half the rows of one head small integers (ties); tails of the power of 2."""
    g = torch.Generator().manual_seed(blocks)
    scores = torch.randn(batch, heads, blocks, blocks, generator=g)
    scores[0, -1, : blocks // 2] = torch.randint(-2, 3, (blocks // 2, blocks), generator=g).float()
    counts, indices = top_blocks_triton(scores.to(DEVICE), width, head, tail_start, force_diagonal, 0.3)
    want_counts, want_indices = reference_top_blocks(scores, width, head, tail_start, force_diagonal, 0.3)
    assert torch.equal(counts.cpu(), want_counts)
    assert torch.equal(indices.cpu(), want_indices)


@pytest.mark.parametrize("n,num_dense,num_dense_tail,sparsity,force_diagonal,forced_in_budget", [
    (200 * 64, 64, 0, 0.8, True, False), (4000, 0, 0, 0.5, False, False), (130 * 64 + 17, 100, 70, 0.8, True, True),
])
def test_top_blocks_give_the_torch_predictors_mask(n, num_dense, num_dense_tail, sparsity, force_diagonal,
                                                    forced_in_budget):
    """With backends' width and dense range, on random block means (no ties): the mask of
    predictor.predict_from_means (softmax and sorts), counts and indices."""
    config = RainFusion2Config(block_size=64, sparsity=sparsity, force_diagonal=force_diagonal,
                               forced_in_budget=forced_in_budget)
    g = torch.Generator().manual_seed(n)
    blocks = -(-n // 64)
    q_mean, k_mean = (torch.randn(1, 2, blocks, 32, generator=g) for _ in range(2))
    scale = 32**-0.5
    want = predict_from_means(q_mean, k_mean, seq_len=n, num_dense=num_dense, num_dense_tail=num_dense_tail,
                              config=config, scale=scale)
    head, tail_start = dense_block_range(n, num_dense, num_dense_tail, 64)
    width = block_budget(blocks, head, tail_start, config)[2]
    counts, indices = top_blocks_triton((q_mean @ k_mean.transpose(-1, -2)).to(DEVICE), width, head, tail_start,
                                        force_diagonal, scale)
    assert torch.equal(counts.cpu(), want.counts)
    assert torch.equal(indices.cpu(), want.indices)


def test_top_blocks_is_a_custom_op():
    scores = torch.randn(1, 2, 20, 20, device=DEVICE)
    torch.library.opcheck(torch.ops.rainfusion.top_blocks.default, (scores, 6, 1, 19, True, 0.5))


@pytest.mark.gpu
def test_gpu_v2_masks_come_from_the_selection_kernel():
    """backends.predict_from_means on CUDA at a real size (929 key blocks): the stable sort's
    mask of its scores exactly, and torch's predictor's but where float32 probabilities tie (in
    every row the kept blocks hold the same probability; the counts equal)."""
    config = RainFusion2Config()
    g = torch.Generator().manual_seed(3)
    n, num_dense, scale = 118_800, 128 * 5, 128**-0.5
    blocks = -(-n // 128)
    q_mean, k_mean = (torch.randn(1, 4, blocks, 128, generator=g).cuda() * 0.1 for _ in range(2))
    kwargs = dict(seq_len=n, num_dense=num_dense, num_dense_tail=0, config=config, scale=scale)
    got = backends.predict_from_means(q_mean, k_mean, **kwargs)
    scores = q_mean @ k_mean.transpose(-1, -2)
    head, tail_start = dense_block_range(n, num_dense, 0, 128)
    want_counts, want_indices = reference_top_blocks(scores.cpu(), got.indices.shape[-1], head, tail_start, True, scale)
    assert torch.equal(got.counts.cpu(), want_counts)
    assert torch.equal(got.indices.cpu(), want_indices)
    torch_mask = predict_from_means(q_mean, k_mean, **kwargs)
    assert torch.equal(torch_mask.counts, got.counts)
    probs = torch.softmax(scores * scale, dim=-1)
    held = [probs.gather(-1, mask.indices.long()).sum(-1) for mask in (got, torch_mask)]
    torch.testing.assert_close(held[0], held[1], rtol=1e-6, atol=0.0)
    assert (got.indices == torch_mask.indices).all(-1).float().mean() > 0.99
