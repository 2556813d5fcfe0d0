"""The fused skipped-block compensation kernel (CUDA path of ``backends.compensate_skipped``)
against the float64 torch estimate and merge (``compensation``): tails, full and empty mask rows,
masks shared over heads, [B, N, H, D] memory; fp32 in Triton's interpreter, bf16 on the GPU."""

import pytest
import torch

pytest.importorskip("triton")
from _helpers import DEVICE, ON_GPU, block_mask  # noqa: E402
from rainfusion import BlockSparseMask  # noqa: E402
from rainfusion.compensation import merge_with_estimate, skipped_block_estimate  # noqa: E402
from rainfusion.kernels import skipped_blocks  # noqa: E402
from rainfusion.kernels.skipped_blocks import compensate_triton  # noqa: E402
from rainfusion.portable import block_sparse_attention_portable  # noqa: E402
from rainfusion.predictor import block_means  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.mark.parametrize("n, d, block_size, shared_heads, bnhd", [
    (300, 64, 64, False, False), (257, 128, 128, True, True), (640, 64, 128, False, True)])
@pytest.mark.parametrize("setting", ["default", (16, 4, 2)])  # another launch setting: 16 means per step
def test_fused_compensation_matches_the_float64_estimate_and_merge(n, d, block_size, shared_heads, bnhd, setting,
                                                                   monkeypatch):
    if setting != "default":
        monkeypatch.setitem(skipped_blocks.CONFIGS, block_size, setting)
    g = torch.Generator().manual_seed(n)
    shape = (2, n, 3, d) if bnhd else (2, 3, n, d)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    if bnhd:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = block_mask(2, 1 if shared_heads else 3, n, n, block_size, density=0.4, seed=n, device="cpu")
    scale = d ** -0.5
    exact, lse = block_sparse_attention_portable(q, k, v, mask, scale=scale, return_lse=True)
    k_mean, v_mean = block_means(k, block_size), block_means(v, block_size)
    want = merge_with_estimate(exact, lse, *skipped_block_estimate(q, k_mean, v_mean, mask, scale))
    on = [t.to(DEVICE, DTYPE) for t in (q, exact)]
    got = compensate_triton(on[0], k_mean.to(DEVICE), v_mean.to(DEVICE), mask.to_dense().to(DEVICE), on[1],
                            lse.float().to(DEVICE), block_size, n, scale)
    assert got.dtype == DTYPE and got.shape == q.shape
    assert float(relative_l2(got.double().cpu(), want)) < (1e-2 if ON_GPU else 1e-5)
    rows_without_keys = torch.isneginf(lse)
    assert rows_without_keys.any()  # the helper's empty row: the estimate alone
    assert torch.isfinite(got.float()).all()


def test_a_full_mask_leaves_the_exact_output():
    q, k, v = (torch.randn(1, 2, 200, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = BlockSparseMask.full(200, 200, block_size=64)
    exact, lse = block_sparse_attention_portable(q, k, v, mask, scale=0.125, return_lse=True)
    got = compensate_triton(q.to(DEVICE, DTYPE), block_means(k, 64).to(DEVICE), block_means(v, 64).to(DEVICE),
                            mask.to_dense().to(DEVICE), exact.to(DEVICE, DTYPE), lse.to(DEVICE), 64, 200, 0.125)
    assert torch.equal(got, exact.to(DEVICE, DTYPE))
