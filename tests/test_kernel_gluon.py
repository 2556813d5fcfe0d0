"""The Gluon (Hopper) block-sparse forward: compiled for sm_90 on any machine (no spills, one
program per SM), and against the float64 oracle on an H100 only, forced on through
``block_sparse.USE_GLUON_ON_HOPPER``; each GPU case checks that the Gluon path was taken."""

import pytest
import torch

from test_kernel_triton import _assert_lse_close, _mask, _qkv, _reference, _sdpa_error, kernel_report
from rainfusion.kernels import block_sparse
from rainfusion.kernels.block_sparse import block_sparse_attention_triton
from rainfusion.mask import BlockSparseMask
from rainfusion.reference import relative_l2, token_mask

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("variant", [[], ["--overlap"], ["--pingpong"]])
def test_gluon_kernel_compiles_for_sm90_without_spills(variant):
    _, stack, shared, report = kernel_report(["--gluon", *variant])
    assert stack == 0 and "LDL 0, STL 0" in report and shared <= 227 * 1024, report


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["in-order", "overlapped", "pingpong"])
def gluon_on(monkeypatch, request):
    if not HOPPER:
        pytest.skip("needs an sm_90 GPU")
    monkeypatch.setattr(block_sparse, "USE_GLUON_ON_HOPPER", True)
    monkeypatch.setattr(block_sparse, "GLUON_OVERLAP", request.param[0])
    monkeypatch.setattr(block_sparse, "GLUON_PINGPONG", request.param[1])


@pytest.mark.gpu
@pytest.mark.usefixtures("gluon_on")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, density, bnhd", [(4000, 0.3, False), (4096, 1.0, True), (1000, 0.5, False),
                                              (130, 1.0, True)])
def test_gluon_matches_reference(dtype, n, density, bnhd):
    b, h, d = 2, 3, 128
    q, k, v = _qkv(b, h, n, n, d, dtype, seed=n, bnhd=bnhd)
    assert block_sparse._use_gluon(q, k, v, 128, False)
    mask = _mask(b, h, n, n, 128, density=density, seed=n)
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, return_lse=True)
    want, want_lse = _reference(q, k, v, mask, d**-0.5)
    allowed = token_mask(mask)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, allowed, d**-0.5, want) + 1e-3
    _assert_lse_close(lse, want_lse, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.usefixtures("gluon_on")
def test_gluon_large_logits_and_determinism():
    b, h, n, d = 1, 2, 4000, 128
    q, k, v = _qkv(b, h, n, n, d, torch.float16, seed=6)
    q, k = q * 100, k * 100
    mask = _mask(b, h, n, n, 128, density=0.5, seed=6)
    out = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out, block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5))
    want, _ = _reference(q, k, v, mask, d**-0.5)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, token_mask(mask), d**-0.5, want) + 1e-3


@pytest.mark.gpu
@pytest.mark.usefixtures("gluon_on")
def test_gluon_full_and_empty_rows_with_an_empty_table():
    """Rows all full or empty: the index table has width 0 and must not be read."""
    n, d = 600, 128
    q, k, v = _qkv(1, 2, n, n, d, torch.bfloat16, seed=3)
    counts = torch.tensor([5, 0, 5, 0, 5], dtype=torch.int32, device="cuda").expand(1, 2, 5)
    mask = BlockSparseMask(counts, torch.empty(1, 2, 5, 0, dtype=torch.int32, device="cuda"), n, n, 128)
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, return_lse=True)
    want, want_lse = _reference(q, k, v, mask, d**-0.5)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, token_mask(mask), d**-0.5, want) + 1e-3
    assert torch.equal(out[:, :, 128:256], torch.zeros_like(out[:, :, 128:256]))
    _assert_lse_close(lse, want_lse, atol=2e-3)
