"""The Gluon (Hopper) block-sparse forward: compiled for sm_90 on any machine (no spills), and
against the float64 oracle on an H100, where it is the default path; each GPU case checks that
the Gluon path was taken."""

import pytest
import torch

triton = pytest.importorskip("triton")
from test_kernel_triton import _allowed, _assert_lse_close, _mask, _qkv, _reference, _sdpa_error, kernel_report  # noqa: E402
from rainfusion.kernels import block_sparse  # noqa: E402
from rainfusion.kernels.block_sparse import block_sparse_attention_triton  # noqa: E402
from rainfusion.mask import BlockSparseMask  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.parametrize("version,tested", [("3.6.0", True), ("3.6.1+git1234", True), ("3.7.1", False),
                                            ("3.9.0", False), ("3.10.0", False), ("4.6.0", False)])
def test_gluon_runs_only_on_the_triton_releases_it_was_tested_on(version, tested):
    assert block_sparse.gluon_tested_on(version) == tested


@pytest.mark.skipif(not block_sparse.gluon_tested_on(triton.__version__),
                    reason=f"the Gluon kernel is not enabled on Triton {triton.__version__}")
def test_gluon_kernel_compiles_for_sm90_without_spills():
    _, stack, shared, report = kernel_report(["--gluon"])
    assert stack == 0 and "LDL 0, STL 0" in report and shared <= 227 * 1024, report


def _check(q, k, v, mask, kv_valid_len=None, lse_atol=2e-3):
    """Gluon path taken, output within 2x SDPA's error of the float64 oracle, lse within lse_atol."""
    d = q.shape[-1]
    assert block_sparse._use_gluon(q, k, v, mask.block_size)
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kv_valid_len=kv_valid_len,
                                             return_lse=True)
    want, want_lse = _reference(q, k, v, mask, d**-0.5, kv_valid_len)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, _allowed(q, k, mask, kv_valid_len), d**-0.5, want) + 1e-3
    _assert_lse_close(lse, want_lse, atol=lse_atol)
    return out


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, density, bnhd", [(4000, 0.3, False), (4096, 1.0, True), (1000, 0.5, False),
                                              (130, 1.0, True)])
def test_gluon_matches_reference(dtype, n, density, bnhd):
    q, k, v = _qkv(2, 3, n, n, 128, dtype, seed=n, bnhd=bnhd)
    _check(q, k, v, _mask(2, 3, n, n, 128, density=density, seed=n))


@pytest.mark.gpu
@hopper_only
def test_gluon_kv_valid_len():
    """Per-item valid key counts: inside a block, on a block edge, past the listed blocks, none."""
    n, d = 1500, 128
    q, k, v = _qkv(4, 2, n, n, d, torch.bfloat16, seed=d, bnhd=True)
    kv_valid_len = torch.tensor([1300, 1024, 100, 0], dtype=torch.int32, device="cuda")
    for density in (1.0, 0.4):
        out = _check(q, k, v, _mask(4, 2, n, n, 128, density=density, seed=d), kv_valid_len)
        assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("q_len, kv_len", [(700, 2000), (2000, 333)])
def test_gluon_query_and_key_lengths_differ(q_len, kv_len):
    q, k, v = _qkv(1, 2, q_len, kv_len, 128, torch.bfloat16, seed=q_len)
    _check(q, k, v, _mask(1, 2, q_len, kv_len, 128, density=0.5, seed=kv_len))


@pytest.mark.gpu
@hopper_only
def test_gluon_large_logits_determinism_and_compile():
    b, h, n, d = 1, 2, 4000, 128
    q, k, v = _qkv(b, h, n, n, d, torch.float16, seed=6)
    q, k = q * 100, k * 100
    mask = _mask(b, h, n, n, 128, density=0.5, seed=6)
    out = _check(q, k, v, mask, lse_atol=0.05)  # |lse| ~ 1e4 here: fp32 rounding alone is ~1e-3
    assert torch.isfinite(out).all()
    assert torch.equal(out, block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5))
    compiled = torch.compile(lambda q, k, v: block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5),
                             fullgraph=True)
    assert torch.equal(compiled(q, k, v), out)


@pytest.mark.gpu
@hopper_only
def test_gluon_full_and_empty_rows_with_an_empty_table():
    """Rows all full or empty: the index table has width 0 and must not be read."""
    n, d = 600, 128
    q, k, v = _qkv(1, 2, n, n, d, torch.bfloat16, seed=3)
    counts = torch.tensor([5, 0, 5, 0, 5], dtype=torch.int32, device="cuda").expand(1, 2, 5)
    mask = BlockSparseMask(counts, torch.empty(1, 2, 5, 0, dtype=torch.int32, device="cuda"), n, n, 128)
    out = _check(q, k, v, mask)
    assert torch.equal(out[:, :, 128:256], torch.zeros_like(out[:, :, 128:256]))
