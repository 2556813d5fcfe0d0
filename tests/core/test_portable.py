import pytest
import torch

from _helpers import random_block_mask
from rainfusion import block_sparse_attention
from rainfusion.portable import block_sparse_attention_portable
from rainfusion.reference import masked_attention, relative_l2


@pytest.mark.parametrize(
    "b,h,n_q,n_k,d,block_size",
    [(1, 2, 300, 300, 32, 64), (2, 3, 257, 257, 16, 128), (1, 1, 129, 700, 64, 64), (2, 2, 512, 512, 8, 128)],
)
def test_portable_matches_masked_reference(b, h, n_q, n_k, d, block_size):
    g = torch.Generator().manual_seed(n_q * 7 + n_k + d)
    q = torch.randn(b, h, n_q, d, generator=g)
    k, v = (torch.randn(b, h, n_k, d, generator=g) for _ in range(2))
    mask = random_block_mask(b, h, n_q, n_k, block_size, generator=g)
    out = block_sparse_attention_portable(q, k, v, mask, scale=d**-0.5)
    ref = masked_attention(q, k, v, mask)
    # float32 math on both sides of a float64 oracle: far under 1e-5
    assert relative_l2(out, ref) < 1e-5
    empty = (mask.counts == 0).repeat_interleave(block_size, -1)[..., :n_q]
    assert torch.all(out[empty] == 0)


def test_full_mask_equals_dense_sdpa_and_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 333, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    full = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    from rainfusion import BlockSparseMask

    mask = BlockSparseMask.from_dense(full, q_len=333, kv_len=333, block_size=128)
    out = block_sparse_attention(q, k, v, mask, backend="portable")
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert relative_l2(out, ref) < 1e-2  # bf16 rounding of the output only


def test_heads_with_different_masks_in_one_call():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 256, 16, generator=g) for _ in range(3))
    mask = random_block_mask(1, 4, 256, 256, 64, density=0.3, generator=g)
    out = block_sparse_attention(q, k, v, mask, backend="portable")
    for head in range(4):
        single = block_sparse_attention(q[:, head:head + 1], k[:, head:head + 1], v[:, head:head + 1],
                                        type(mask).from_dense(mask.to_dense()[:, head:head + 1], q_len=256,
                                                              kv_len=256, block_size=64), backend="portable")
        assert torch.allclose(out[:, head:head + 1], single, atol=1e-6)


@pytest.mark.parametrize("backend", ["portable", "triton"])
def test_kv_valid_len_ignores_padded_keys(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 2, 300, 64, generator=g).to(device, dtype) for _ in range(3))
    m = random_block_mask(3, 2, 300, 300, 64, density=0.6, generator=g)
    mask = type(m)(m.counts.to(device), m.indices.to(device), 300, 300, 64)
    valid = torch.tensor([300, 170, 1], device=device)
    out = block_sparse_attention(q, k, v, mask, kv_valid_len=valid, backend=backend)
    keys = torch.arange(300, device=device)
    from rainfusion.reference import token_mask

    allowed = token_mask(mask) & (keys < valid.view(-1, 1, 1, 1))
    ref = masked_attention(q, k, v, allowed)
    assert relative_l2(out, ref) < (2e-3 if dtype == torch.float16 else 1e-5)


def test_kv_valid_len_is_checked():
    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    mask = random_block_mask(1, 2, 200, 200, 64)
    with pytest.raises(TypeError, match="kv_valid_len must be an int32 or int64 tensor, got torch.float32"):
        block_sparse_attention(q, k, v, mask, kv_valid_len=torch.ones(2))
    with pytest.raises(ValueError, match=r"kv_valid_len must have shape \[2\], got \(3,\)"):
        block_sparse_attention(q, k, v, mask, kv_valid_len=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend='fa4' does not take kv_valid_len"):
        block_sparse_attention(q, k, v, mask, kv_valid_len=torch.ones(2, dtype=torch.int64), backend="fa4")
    for bad, seen in (([0, 200], r"\[0, 200\]"), ([-3, 5], r"\[-3, 5\]"), ([5, 201], r"\[5, 201\]")):
        with pytest.raises(ValueError, match=rf"kv_valid_len must be in \[1, 200\], got values in {seen} "
                                             r"\(at least one valid key"):
            block_sparse_attention(q, k, v, mask, kv_valid_len=torch.tensor(bad))


def test_rows_full_for_some_heads_only_and_empty_rows():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 330, 32, generator=g) for _ in range(3))
    dense = torch.rand(2, 3, 6, 6, generator=g) < 0.4
    dense[0, 1, 2] = True  # row 2 is full for one (batch, head) only
    dense[1, :, 2] = False
    dense[:, 2, 4] = False  # an empty row for head 2
    from rainfusion import BlockSparseMask

    mask = BlockSparseMask.from_dense(dense, q_len=330, kv_len=330, block_size=64)
    full = mask.counts == mask.kv_blocks
    assert full[:, :, 2].any() and not full[:, :, 2].all()
    out = block_sparse_attention_portable(q, k, v, mask, scale=32**-0.5)
    assert relative_l2(out, masked_attention(q, k, v, mask)) < 1e-5
    assert torch.equal(out[:, 2, 256:320], torch.zeros_like(out[:, 2, 256:320]))
