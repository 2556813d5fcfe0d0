import math

import pytest
import torch

from rainfusion import backends
from rainfusion.config import RainFusion2Config
from rainfusion.predictor import block_means, keep_count, predict_block_mask, token_mean

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_block_means_average_real_tokens_of_the_tail():
    x = torch.randn(2, 3, 300, 8)
    means = block_means(x, 128)
    assert means.shape == (2, 3, 3, 8)
    assert torch.allclose(means[:, :, 0], x[:, :, :128].mean(2), atol=1e-6)
    assert torch.allclose(means[:, :, 2], x[:, :, 256:].mean(2), atol=1e-6)


def reference_block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 [B, H, ceil(N / block_size), D]: each block's mean over its tokens, non-finite as 0."""
    x = x.double()
    x = torch.where(x.isfinite(), x, 0.0)
    return torch.stack([block.mean(2) for block in x.split(block_size, dim=2)], dim=2)


def with_non_finite(shape: tuple[int, int, int, int], generator: torch.Generator, bnhd: bool = False) -> torch.Tensor:
    """Normal x [B, H, N, D] (a transpose of [B, N, H, D] memory when ``bnhd``) with NaN, +inf and
    -inf each planted at 8 random elements and at 3 dims of one token in every head."""
    b, h, n, d = shape
    x = torch.randn((b, n, h, d) if bnhd else shape, generator=generator)
    x = x.transpose(1, 2) if bnhd else x
    for value in (math.nan, math.inf, -math.inf):
        x[tuple(torch.randint(size, (8,), generator=generator) for size in shape)] = value
        x[:, :, int(torch.randint(n, (1,), generator=generator)), torch.randperm(d, generator=generator)[:3]] = value
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,bs", [(300, 128), (1000, 64)])
def test_block_means_count_non_finite_elements_as_zero(n, bs, dtype):
    x = with_non_finite((2, 3, n, 16), torch.Generator().manual_seed(n)).to(dtype)
    means = block_means(x, bs)
    assert means.dtype == torch.float32 and means.isfinite().all()
    torch.testing.assert_close(means.double(), reference_block_means(x, bs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,d,bs,bnhd", [(300, 64, 128, False), (200, 128, 64, True), (128, 64, 128, True),
                                         (65, 128, 64, False)])
@pytest.mark.parametrize("ordered", [False, True], ids=["as-is", "through-an-order"])
def test_block_means_kernel_matches_a_float64_reference_and_the_torch_path(n, d, bs, bnhd, ordered):
    """The Triton kernel (under the interpreter on CPU) on float32, tails and strided inputs; with
    a token order, the means of x[:, :, order] read in place."""
    kernel = pytest.importorskip("rainfusion.kernels.block_means")
    g = torch.Generator().manual_seed(n + d)
    x = with_non_finite((1, 2, n, d), g, bnhd)
    order = torch.randperm(n, generator=g) if ordered else None
    permuted = x[:, :, order] if ordered else x
    means = kernel.block_means_triton(x.to(DEVICE), bs, None if order is None else order.to(DEVICE)).cpu()
    assert means.dtype == torch.float32 and means.shape == (1, 2, -(-n // bs), d)
    torch.testing.assert_close(means.double(), reference_block_means(permuted, bs), rtol=0, atol=1e-6)
    torch.testing.assert_close(means, block_means(permuted, bs), rtol=0, atol=1e-6)
    torch.testing.assert_close(backends.block_means(x, bs, order), block_means(permuted, bs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n, bs", [(128 * 3, 128), (128 * 3 + 77, 128), (200, 64), (50, 128)])
def test_token_mean_of_block_means_is_the_mean_of_the_tokens_in_any_order(n, bs):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, 16, generator=g) + torch.randn(2, 3, 1, 16, generator=g) * 4
    order = torch.randperm(n, generator=g)
    want = x.double().mean(2)
    for means in (block_means(x, bs), backends.block_means(x, bs, order)):  # a tail block of its own tokens
        torch.testing.assert_close(token_mean(means, n, bs).double(), want, rtol=0, atol=1e-5)


def test_block_means_kernel_is_a_custom_op():
    kernel = pytest.importorskip("rainfusion.kernels.block_means")
    x = with_non_finite((1, 2, 130, 64), torch.Generator().manual_seed(1)).to(DEVICE)
    torch.library.opcheck(torch.ops.rainfusion.block_means.default, (x, 64))
    assert kernel.block_means_triton(x, 64).isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,bs", [(64, 64), (96, 128), (128, 128)])
def test_gpu_block_means_kernel_matches_a_float64_reference(dtype, d, bs):
    """backends.block_means on CUDA runs the kernel: bf16 / fp16 [B, N, H, D] memory, 4111 tokens,
    as they are and through a token order."""
    from rainfusion.kernels.block_means import block_means_triton

    x = with_non_finite((2, 4, 4111, d), torch.Generator().manual_seed(d), bnhd=True).to(dtype)
    order = torch.randperm(4111, generator=torch.Generator().manual_seed(d))
    for index, permuted in ((None, x), (order.cuda(), x[:, :, order])):
        means = backends.block_means(x.cuda(), bs, index)
        assert torch.equal(means, block_means_triton(x.cuda(), bs, index))
        torch.testing.assert_close(means.cpu().double(), reference_block_means(permuted, bs), rtol=0, atol=1e-5)


def pooled_probs(q, k, bs):
    qm, km = block_means(q.double(), bs), block_means(k.double(), bs)
    return torch.softmax(qm @ km.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)


@pytest.mark.parametrize("forced_in_budget", [False, True])
@pytest.mark.parametrize("n,num_dense,bs,sparsity", [(1000, 150, 64, 0.8), (1500, 0, 128, 0.5), (777, 300, 64, 0.9)])
def test_topk_keeps_forced_blocks_then_the_highest_pooled_scores(n, num_dense, bs, sparsity, forced_in_budget):
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 3, n, 16, generator=g) for _ in range(2))
    config = RainFusion2Config(sparsity=sparsity, block_size=bs, forced_in_budget=forced_in_budget)
    mask = predict_block_mask(q, k, num_dense=num_dense, config=config, scale=16**-0.5)
    blocks = mask.kv_blocks
    dense_blocks = -(-num_dense // bs)
    kept = mask.to_dense()
    probs = pooled_probs(q, k, bs)
    forced_count = dense_blocks + 1
    if forced_in_budget:  # the forced blocks are part of the top-N budget
        budget = min(blocks, max(keep_count(blocks, sparsity), forced_count))
    else:  # they come on top of it
        budget = min(blocks, keep_count(blocks, sparsity) + forced_count)
    assert kept[:, :, :dense_blocks].all(), "dense-region rows must be full"
    assert kept[..., :dense_blocks].all(), "dense-region columns must be kept"
    assert kept.diagonal(dim1=-2, dim2=-1).all(), "diagonal must be kept"
    for b in range(2):
        for h in range(3):
            for row in range(dense_blocks, blocks):
                forced = set(range(dense_blocks)) | {row}
                others = [c for c in torch.argsort(probs[b, h, row], descending=True).tolist() if c not in forced]
                want = forced | set(others[: budget - len(forced)])
                assert set(torch.nonzero(kept[b, h, row]).flatten().tolist()) == want
    # realized density: the budget on every sparse row, within one block of the target (plus the
    # forced blocks when they come on top)
    assert (mask.counts[:, :, dense_blocks:] == budget).all()
    if budget < blocks and (not forced_in_budget or keep_count(blocks, sparsity) > forced_count):
        assert 0 <= budget - (0 if forced_in_budget else forced_count) - blocks * (1 - sparsity) < 1


def test_topp_keeps_the_fewest_blocks_reaching_the_mass_and_at_most_topk():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 2048, 32, generator=g) * 2 for _ in range(2))
    config = RainFusion2Config(sparsity=0.5, block_size=64, selection="topp", top_p=0.6, force_diagonal=False)
    mask = predict_block_mask(q, k, num_dense=0, config=config, scale=32**-0.5)
    probs = pooled_probs(q, k, 64)
    kept = mask.to_dense()
    budget = keep_count(32, 0.5)  # nothing forced here
    for h in range(2):
        for row in range(32):
            ordered = torch.sort(probs[0, h, row], descending=True).values
            fewest = int((torch.cumsum(ordered, 0) < 0.6).sum()) + 1
            assert mask.counts[0, h, row] == min(fewest, budget)
            assert kept[0, h, row].sum() == min(fewest, budget)
            mass = probs[0, h, row][kept[0, h, row]].sum()
            assert mass >= 0.6 - 1e-6 or kept[0, h, row].sum() == budget


def test_mask_is_per_batch_item_and_head():
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(2, 2, 1024, 16, generator=g) for _ in range(2))
    mask = predict_block_mask(q, k, num_dense=0, config=RainFusion2Config(block_size=64), scale=0.25)
    dense = mask.to_dense()
    assert not torch.equal(dense[0], dense[1]) and not torch.equal(dense[:, 0], dense[:, 1])
