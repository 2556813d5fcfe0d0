import pytest
import torch

from masks import random_block_mask
from rainfusion.mask import BlockSparseMask
from rainfusion.reference import masked_attention, relative_l2


@pytest.mark.parametrize("q_len,kv_len,block_size", [(300, 300, 64), (257, 129, 128), (64, 500, 64)])
def test_dense_round_trip(q_len, kv_len, block_size):
    g = torch.Generator().manual_seed(q_len)
    mask = random_block_mask(2, 3, q_len, kv_len, block_size, generator=g)
    again = BlockSparseMask.from_dense(mask.to_dense(), q_len=q_len, kv_len=kv_len, block_size=block_size)
    assert torch.equal(again.to_dense(), mask.to_dense())
    assert torch.equal(again.counts, mask.counts)


def test_full_rows_store_no_indices_and_table_is_sized_to_kept_blocks():
    kb = 8
    dense = torch.zeros(1, 1, 4, kb, dtype=torch.bool)
    dense[0, 0, 0] = True  # full
    dense[0, 0, 1, [1, 5]] = True
    dense[0, 0, 2, [7]] = True
    mask = BlockSparseMask.from_dense(dense, q_len=4 * 64, kv_len=kb * 64, block_size=64)
    assert mask.indices.shape[-1] == 2  # widest non-full row, not kv_blocks
    assert mask.counts.tolist() == [[[8, 2, 1, 0]]]
    assert mask.indices[0, 0, 1].tolist() == [1, 5]
    assert torch.equal(mask.to_dense(), dense)
    assert mask.full_indices()[0, 0, 0].tolist() == list(range(kb))
    assert mask.density()[0, 0].item() == pytest.approx((8 + 2 + 1) / 32)


def test_expand_broadcasts_without_copies_and_rejects_wrong_sizes():
    mask = random_block_mask(1, 1, 256, 256, 64)
    wide = mask.expand(2, 3)
    assert wide.counts.shape == (2, 3, 4) and wide.counts.stride()[:2] == (0, 0)
    with pytest.raises(ValueError, match="batch x heads = 2 x 2, expected 3 x 2"):
        random_block_mask(2, 2, 256, 256, 64).expand(3, 2)


def test_flex_block_mask_gives_the_same_attention():
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 384, 16, generator=g) for _ in range(3))
    mask = random_block_mask(1, 2, 384, 384, 128, density=0.5, generator=g)
    mask_rows = mask.counts > 0  # flex returns 0 for empty rows too; compare all rows
    out = flex_attention(q, k, v, block_mask=mask.to_flex_block_mask())
    ref = masked_attention(q, k, v, mask)
    assert mask_rows.any()
    assert relative_l2(out, ref) < 1e-5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(counts=torch.zeros(1, 1, 2, dtype=torch.int64)), TypeError, "counts must be int32"),
        (dict(counts=torch.zeros(1, 2, dtype=torch.int32)), ValueError, r"counts must be \[B, H, q_blocks\]"),
        (dict(indices=torch.zeros(1, 1, 3, 1, dtype=torch.int32)), ValueError, "indices must be"),
        (dict(block_size=32), ValueError, "block_size must be one of"),
        (dict(q_len=300), ValueError, "needs 3"),
    ],
)
def test_bad_masks_are_rejected(kwargs, error, match):
    args = dict(counts=torch.zeros(1, 1, 2, dtype=torch.int32), indices=torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                q_len=256, kv_len=256, block_size=128)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        BlockSparseMask(**args)


def test_from_dense_rejects_wrong_shape():
    with pytest.raises(ValueError, match="needs 3"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), q_len=256, kv_len=300, block_size=128)
    with pytest.raises(TypeError, match="bool"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2), q_len=256, kv_len=256, block_size=128)


def test_full_rows_ignore_whatever_their_table_holds():
    counts = torch.tensor([[[4, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[99, -5], [2, 77]]]], dtype=torch.int32)  # row 0 is full: its entries are junk
    mask = BlockSparseMask(counts, indices, q_len=256, kv_len=512, block_size=128)
    assert mask.to_dense()[0, 0].tolist() == [[True] * 4, [False, False, True, False]]
    assert mask.full_indices()[0, 0, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("q_len,kv_len,block_size", [(300, 300, 64), (257, 129, 128)])
def test_full_mask_keeps_every_block_and_stores_no_indices(q_len, kv_len, block_size):
    mask = BlockSparseMask.full(q_len, kv_len, block_size=block_size)
    assert mask.indices.numel() == 0
    assert mask.to_dense().all() and mask.to_dense().shape == (1, 1, -(-q_len // block_size), -(-kv_len // block_size))
    g = torch.Generator().manual_seed(q_len)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (q_len, kv_len, kv_len))
    from rainfusion import block_sparse_attention

    out = block_sparse_attention(q, k, v, mask.expand(2, 3), backend="portable")
    assert relative_l2(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 1e-5
