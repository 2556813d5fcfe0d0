import pytest
import torch

from rainfusion.config import SPATIAL, TEMPORAL, TEXTURAL
from rainfusion.head_patterns import band_keep, band_window, head_pattern_table
from rainfusion.layout import VideoLayout
from rainfusion.permutation import checkerboard_keep
from rainfusion.reference import token_mask

LAYOUTS = [
    VideoLayout(9, 8, 16),
    VideoLayout(6, 7, 9, text_len=20, text_position="before"),
    VideoLayout(5, 10, 13, text_len=30, text_position="after"),
]


def test_band_window_keeps_the_count_and_stays_inside():
    centers = torch.arange(10)
    lo, hi = band_window(centers, 10, 4)
    assert ((hi - lo) == 4).all() and (lo >= 0).all() and (hi <= 10).all()
    assert ((centers >= lo) & (centers < hi)).all()
    assert band_keep(0.5, 7) == 4 and band_keep(0.01, 7) == 1 and band_keep(1.0, 7) == 7


def dense_ends(layout, block_size=64):
    """(head, tail): the sink and text-before tokens lead, text-after tokens trail; the tokens of
    blocks holding any of them are [0, head) and [tail, N)."""
    head = layout.frame_tokens + (layout.text_len if layout.text_position == "before" else 0)
    tail_len = layout.text_len if layout.text_position == "after" else 0
    n = layout.num_tokens
    return -(-head // block_size) * block_size, ((n - tail_len) // block_size * block_size if tail_len else n)


def band_oracle(layout, pattern, fraction, block_size=64):
    """bool [N, N] token mask of a pattern in its own order, built token by token; the blocks
    that hold dense-region tokens are dense in full."""
    n = layout.num_tokens
    frames = layout.frames - 1  # sink on
    hw = layout.frame_tokens
    head = hw + (layout.text_len if layout.text_position == "before" else 0)
    end = n - (layout.text_len if layout.text_position == "after" else 0)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    video = torch.arange(end - head)
    unit, units = (hw, frames) if pattern == SPATIAL else (frames, hw)
    lo, hi = band_window(video // unit, units, band_keep(fraction, units))
    key_unit = video // unit
    allowed[head:end, head:end] = (key_unit >= lo[:, None]) & (key_unit < hi[:, None])
    dense_head, dense_tail = dense_ends(layout, block_size)
    for rows in (slice(0, dense_head), slice(dense_tail, n)):
        allowed[rows] = True
        allowed[:, rows] = True
    return allowed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", [SPATIAL, TEMPORAL])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_band_block_masks_cover_the_token_band_tightly(layout, pattern, fraction):
    table = head_pattern_table(layout, (fraction,), 2, True, 64, torch.device("cpu"))
    mask = table.block_mask(torch.tensor([[pattern]]))
    got = token_mask(mask)[0, 0]
    want = band_oracle(layout, pattern, fraction)
    assert not (want & ~got).any(), "a token pair of the band is missing"
    # block granularity: a query block spans up to 64 tokens + one unit of bands, and the key
    # range is rounded out to whole blocks on both sides
    unit = layout.frame_tokens if pattern == SPATIAL else layout.frames - 1
    extra = (got & ~want).sum(1).float()
    assert extra.max() <= 3 * 64 + unit


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tau", [2, 3])
def test_textural_mask_keeps_the_checkerboard_subset_for_every_query(layout, tau):
    table = head_pattern_table(layout, (0.5,), tau, True, 64, torch.device("cpu"))
    mask = table.block_mask(torch.tensor([[TEXTURAL]]))
    got = token_mask(mask)[0, 0]
    head = layout.frame_tokens + (layout.text_len if layout.text_position == "before" else 0)
    kept = int(checkerboard_keep(layout.height, layout.width, tau).sum()) * (layout.frames - 1)
    dense_head, dense_tail = dense_ends(layout)  # rows and columns of blocks with dense tokens are full
    assert got[:, : head + kept].all() and got[:, dense_tail:].all()
    assert got[:dense_head].all() and got[dense_tail:].all()
    last_kept_block_end = -(-(head + kept) // 64) * 64
    assert not got[dense_head:dense_tail, last_kept_block_end:dense_tail].any()


def test_dense_rows_are_full_and_density_follows_the_fraction():
    layout = VideoLayout(17, 16, 16)
    table = head_pattern_table(layout, (0.5, 0.25), 2, True, 128, torch.device("cpu"))
    candidates = torch.tensor([[SPATIAL * 2, SPATIAL * 2 + 1, TEMPORAL * 2, TEMPORAL * 2 + 1]])
    mask = table.block_mask(candidates)
    assert (mask.counts[..., :2] == mask.kv_blocks).all()  # first frame: 256 tokens = 2 blocks
    density = mask.density()[0]
    dense_share = 2 / mask.kv_blocks
    for got, fraction in zip(density.tolist(), [0.5, 0.25, 0.5, 0.25]):
        # dense rows and columns plus at most one partial block per row on top of the band
        expected = dense_share + (1 - dense_share) * (dense_share + (1 - dense_share) * fraction)
        assert expected - 0.02 <= got <= expected + 1.5 / mask.kv_blocks
