import pytest
import torch

from _helpers import random_block_mask
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


def _mask_args(counts, indices, kv_len=512):
    return dict(counts=torch.tensor(counts, dtype=torch.int32), indices=torch.tensor(indices, dtype=torch.int32),
                q_len=128 * len(counts[0][0]), kv_len=kv_len, block_size=128)


@pytest.mark.parametrize(
    "counts,indices,match",
    [
        # (batch, head, row) of the first bad row is named, and what is wrong with it
        ([[[2, 2]], [[1, -1]]], [[[[0, 1], [1, 3]]], [[[2, 0], [0, 0]]]],
         r"counts at \(batch 1, head 0, row 1\) is -1, outside \[0, kv_blocks = 4\]"),
        ([[[5, 1]]], [[[[0, 1], [2, 0]]]], r"counts at \(batch 0, head 0, row 0\) is 5, outside \[0, kv_blocks = 4\]"),
        ([[[1, 3]]], [[[[0, 1], [0, 1]]]], r"counts at \(batch 0, head 0, row 1\) is 3, more than the index table "
                                           r"holds \(width 2\)"),
        ([[[2, 1], [1, 2]]], [[[[0, 3], [1, 0]], [[3, 0], [2, 2]]]],
         r"indices at \(batch 0, head 1, row 1\) lists key blocks \[2, 2\]: they must be strictly ascending"),
        ([[[2, 2]]], [[[[3, 1], [0, 1]]]], r"indices at \(batch 0, head 0, row 0\) lists key blocks \[3, 1\]: "
                                           "they must be strictly ascending"),
        ([[[1, 2]]], [[[[0, 9], [1, 4]]]], r"indices at \(batch 0, head 0, row 1\) lists key blocks \[1, 4\], "
                                           r"some outside \[0, kv_blocks = 4\)"),
        ([[[1, 1]]], [[[[-2, 9], [0, 0]]]], r"indices at \(batch 0, head 0, row 0\) lists key blocks \[-2\], some "
                                            "outside"),
    ],
)
def test_user_masks_that_break_the_row_contract_are_rejected(counts, indices, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseMask(**_mask_args(counts, indices))


def test_row_contract_accepts_edge_cases_and_check_false_skips_it():
    # full rows (count = kv_blocks) read no entries, even with a narrow table; slots past a count are junk
    ok = BlockSparseMask(**_mask_args([[[4, 0, 2]]], [[[[7, 7], [9, -1], [0, 3]]]]))
    assert ok.to_dense()[0, 0].tolist() == [[True] * 4, [False] * 4, [True, False, False, True]]
    bad = _mask_args([[[1, 1]]], [[[[3, 3], [5, 0]]]])
    assert BlockSparseMask(**bad, check=False).counts.shape == (1, 1, 2)  # the caller vouches for it
    with pytest.raises(ValueError, match=r"row 1\) lists key blocks \[5\]"):
        BlockSparseMask(**bad, check=False).validate()
    # what rainfusion builds itself passes the contract
    g = torch.Generator().manual_seed(3)
    for q_len, kv_len in ((300, 300), (257, 129), (64, 700)):
        random_block_mask(2, 3, q_len, kv_len, 64, generator=g).validate()
        BlockSparseMask.full(q_len, kv_len, block_size=64).expand(2, 3).validate()


def test_a_duplicate_index_would_count_a_block_twice():
    """Why the contract matters: a repeated block is a wrong answer on the portable backend."""
    from rainfusion import block_sparse_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 512, 16, generator=g, dtype=torch.float64) for _ in range(3))
    duplicated = BlockSparseMask(torch.tensor([[[3, 4, 4, 4]]], dtype=torch.int32),
                                 torch.tensor([[[[0, 0, 1]] * 4]], dtype=torch.int32), 512, 512, 128, check=False)
    right = BlockSparseMask(torch.tensor([[[2, 4, 4, 4]]], dtype=torch.int32),
                            torch.tensor([[[[0, 1, 3]] * 4]], dtype=torch.int32), 512, 512, 128)
    wrong = block_sparse_attention(q, k, v, duplicated, backend="portable")
    assert relative_l2(wrong[:, :, :128], masked_attention(q, k, v, right)[:, :, :128]) > 1e-3
    with pytest.raises(ValueError, match=r"row 0\) lists key blocks \[0, 0, 1\]: they must be strictly ascending"):
        duplicated.validate()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads,q_len,kv_len,density", [(1, 2, 3520, 3520, 0.3), (2, 3, 1000, 1700, 0.5),
                                                              (1, 4, 8192, 8192, 0.2), (2, 1, 300, 4000, 1.0)])
def test_flex_block_mask_under_compiled_flex_on_cuda(batch, heads, q_len, kv_len, density):
    """Compiled FlexAttention (its Triton kernel) with the converted mask against the exact masked
    attention: per-head masks, empty and full rows, tails that are not whole blocks."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(q_len)
    mask = random_block_mask(batch, heads, q_len, kv_len, 128, density=density, generator=g)
    mask = BlockSparseMask(mask.counts.cuda(), mask.indices.cuda(), q_len, kv_len, 128)
    q = torch.randn(batch, heads, q_len, 64, generator=g).cuda().bfloat16()
    k, v = (torch.randn(batch, heads, kv_len, 64, generator=g).cuda().bfloat16() for _ in range(2))
    flex = torch.compile(flex_attention, dynamic=False)
    out = flex(q, k, v, block_mask=mask.to_flex_block_mask())
    ref = masked_attention(q, k, v, mask)
    seen = mask.counts > 0  # flex gives 0 for a row with no block, as we do
    assert seen.any()
    assert relative_l2(out, ref) < 5e-3
