import pytest
import torch

from rainfusion.layout import VideoLayout
from rainfusion.backends import gather_tokens
from rainfusion.permutation import ORDERS, checkerboard_keep, token_order

LAYOUTS = [
    VideoLayout(5, 16, 16),
    VideoLayout(7, 9, 11, text_len=13, text_position="before"),
    VideoLayout(4, 10, 17, text_len=6, text_position="after"),
    VideoLayout(1, 8, 12),
]


def coords(layout, token):
    v = token - layout.video_start
    return v // layout.frame_tokens, (v // layout.width) % layout.height, v % layout.width


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sink", [True, False])
def test_order_is_a_permutation_with_the_dense_region_at_the_ends(layout, order, sink):
    o = token_order(layout, order, sink_first_frame=sink, tau=3)
    n = layout.num_tokens
    assert torch.equal(torch.sort(o.index).values, torch.arange(n))
    assert torch.equal(o.index[o.inverse], torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    assert torch.equal(gather_tokens(gather_tokens(x, o.index), o.inverse), x)
    text = set(range(layout.text_start, layout.text_start + layout.text_len))
    sink_tokens = set(range(layout.video_start, layout.video_start + layout.frame_tokens)) if sink else set()
    leading = (text if layout.text_position == "before" else set()) | sink_tokens
    trailing = text if layout.text_position == "after" else set()
    assert (o.num_dense, o.num_dense_tail) == (len(leading), len(trailing))
    assert set(o.index[: o.num_dense].tolist()) == leading
    # trailing text keeps its place at the very end, so a padding of its last tokens stays a suffix
    assert o.index[n - o.num_dense_tail:].tolist() == sorted(trailing)


def test_window3d_blocks_are_compact_2x8x8_regions():
    layout = VideoLayout(9, 16, 24, text_len=128, text_position="after")  # 8 non-sink frames
    o = token_order(layout, "window3d")
    assert o.num_dense == 16 * 24 and o.num_dense_tail == 128  # windows start on block boundaries
    rest = o.index[o.num_dense: layout.num_tokens - o.num_dense_tail]
    for block in rest.split(128):
        t, h, w = coords(layout, block)
        assert len(set(t.tolist())) == 2 and t.max() - t.min() == 1
        assert h.max() - h.min() == 7 and w.max() - w.min() == 7
        assert len(block) == 128


def test_tile2d_blocks_are_8x8_tiles_of_one_frame_and_awkward_grids_work():
    layout = VideoLayout(3, 16, 16)
    o = token_order(layout, "tile2d", sink_first_frame=False)
    for block in o.index.split(64):
        t, h, w = coords(layout, block)
        assert t.unique().numel() == 1 and h.max() - h.min() == 7 and w.max() - w.min() == 7
    awkward = VideoLayout(6, 10, 13)
    o = token_order(awkward, "window3d")
    t, h, w = coords(awkward, o.index[o.num_dense:])
    # edge windows are smaller: window ids never decrease along the order
    window = ((t - 1) // 2 * 2 + h // 8) * 2 + w // 8
    assert torch.all(window[1:] >= window[:-1])


def test_time_major_puts_the_frames_of_a_position_together():
    layout = VideoLayout(5, 4, 6)
    o = token_order(layout, "time_major")
    t, h, w = coords(layout, o.index[o.num_dense:])
    assert t[:4].tolist() == [1, 2, 3, 4] and (h[:4] == 0).all() and (w[:4] == 0).all()


def test_checkerboard_puts_the_kept_subset_first():
    layout = VideoLayout(3, 6, 6)
    for tau in (2, 3, 4):
        keep = checkerboard_keep(6, 6, tau)
        o = token_order(layout, "checkerboard", tau=tau)
        kept = int(keep.sum()) * 2
        _, h, w = coords(layout, o.index[o.num_dense:])
        assert ((h - w) % tau == 0)[:kept].all() and not ((h - w) % tau == 0)[kept:].any()
        assert abs(keep.float().mean().item() - 1 / tau) < 0.1


def test_orders_are_cached_and_unknown_order_is_rejected():
    layout = VideoLayout(3, 8, 8)
    assert token_order(layout, "window3d") is token_order(layout, "window3d")
    with pytest.raises(ValueError, match="order must be one of"):
        token_order(layout, "spiral")
