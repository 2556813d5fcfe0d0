"""Token orders: where each token goes before block-sparse attention, and back.

Every order keeps the *dense region* at the ends: text tokens that come before the video, then
(with the first-frame sink) the tokens of frame 0, first; text tokens that come after the video
last (so a key padding of trailing text stays a suffix). The video tokens in between follow an
order chosen so that a block of consecutive tokens is a compact region of the video:

- ``raster``      (t, h, w) order (``"none"`` in the v2 config);
- ``window3d``    windows of 2 x 8 x 8 tokens, windows in raster order, raster order inside;
- ``tile2d``      the same with 1 x 8 x 8 tiles;
- ``time_major``  (h, w, t) order: the frames of one spatial position are adjacent (v1 temporal);
- ``checkerboard`` the tokens with (h - w) mod tau == 0 first, then the rest (v1 textural).

Attention is equivariant under a common permutation of q, k, v, so permuting, attending and
un-permuting the output is exact. Orders are index tensors, computed once per shape and device;
``backends.gather_tokens`` applies them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from .layout import VideoLayout
from .mask import num_blocks

ORDERS = ("raster", "window3d", "tile2d", "time_major", "checkerboard")
WINDOWS = {"window3d": (2, 8, 8), "tile2d": (1, 8, 8)}


@dataclass(frozen=True)
class TokenOrder:
    """Position i of the permuted sequence holds token ``index[i]``; ``inverse`` undoes it.

    index, inverse: int64 [N]. num_dense: length of the leading dense region (text before the
    video + sink); num_dense_tail: length of the trailing one (text after the video).
    """

    index: torch.Tensor
    inverse: torch.Tensor
    num_dense: int
    num_dense_tail: int = 0


# order tensors known to hold each of their N tokens once per row (plans' orders, made so, and
# orders the kernels checked): id -> (a weak reference, the tensor's version then)
_known_permutations: dict[int, tuple[weakref.ref, int]] = {}


def _version(t: torch.Tensor) -> int:
    """The in-place change counter (inference tensors have none: -1)."""
    return -1 if t.is_inference() else t._version


def mark_permutation(order: torch.Tensor) -> torch.Tensor:
    """Record that ``order`` (int64 [..., N]) holds each of its N tokens once per row, so that
    ``is_known_permutation`` holds until it changes in place; returns it. Not while torch.compile
    traces (nothing is recorded; the kernels check nothing there either)."""
    if not torch.compiler.is_compiling():
        key = id(order)
        _known_permutations[key] = (weakref.ref(order, lambda _, key=key: _known_permutations.pop(key, None)),
                                    _version(order))
    return order


def is_known_permutation(order: torch.Tensor) -> bool:
    """``order`` was marked (``mark_permutation``) and has not changed in place since."""
    seen = _known_permutations.get(id(order))
    return seen is not None and seen[0]() is order and seen[1] == _version(order)


def dense_block_range(n: int, num_dense: int, num_dense_tail: int, block_size: int) -> tuple[int, int]:
    """(head, tail_start): blocks [0, head) and [tail_start, blocks) hold dense-region tokens."""
    blocks = num_blocks(n, block_size)
    head = num_blocks(num_dense, block_size)
    tail_start = (n - num_dense_tail) // block_size if num_dense_tail else blocks
    return head, max(head, tail_start)


def checkerboard_keep(height: int, width: int, tau: int) -> torch.Tensor:
    """bool [height, width]: the 1/tau checkerboard subset, (h - w) mod tau == 0."""
    h = torch.arange(height).unsqueeze(1)
    w = torch.arange(width).unsqueeze(0)
    return (h - w) % tau == 0


def _window_key(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor, window: tuple[int, int, int],
                grid: tuple[int, int]) -> torch.Tensor:
    """Sort key (t // ft, h // hb, w // wb, t, h, w) as one integer."""
    ft, hb, wb = window
    height, width = grid
    n_hw, n_ww = -(-height // hb), -(-width // wb)
    window_id = ((t // ft) * n_hw + h // hb) * n_ww + w // wb
    inside = ((t % ft) * hb + h % hb) * wb + w % wb
    return window_id * (ft * hb * wb) + inside


def _video_key(layout: VideoLayout, frames: int, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
               order: str, tau: int) -> torch.Tensor:
    """Sort key of the non-sink video tokens at frame t (counted from the first non-sink frame)."""
    if order == "raster":
        return (t * layout.height + h) * layout.width + w
    if order == "time_major":
        return (h * layout.width + w) * frames + t
    if order == "checkerboard":
        dropped = ~checkerboard_keep(layout.height, layout.width, tau)[h, w]
        return dropped.long() * layout.video_tokens + (t * layout.height + h) * layout.width + w
    return _window_key(t, h, w, WINDOWS[order], (layout.height, layout.width))


@lru_cache(maxsize=128)
def _token_order_cpu(layout: VideoLayout, order: str, sink_first_frame: bool, tau: int) -> TokenOrder:
    video = torch.arange(layout.video_tokens)
    t = video // layout.frame_tokens
    h = (video // layout.width) % layout.height
    w = video % layout.width
    video_index = video + layout.video_start
    text_index = torch.arange(layout.text_len) + layout.text_start

    sink = t == 0 if sink_first_frame else torch.zeros_like(t, dtype=torch.bool)
    rest = ~sink
    t_rest = t[rest] - int(sink_first_frame)
    frames = layout.frames - int(sink_first_frame)
    key = _video_key(layout, frames, t_rest, h[rest], w[rest], order, tau)
    rest_index = video_index[rest][torch.argsort(key, stable=True)]

    text_first = layout.text_position == "before"
    head = torch.cat([text_index if text_first else text_index[:0], video_index[sink]])
    tail = text_index[:0] if text_first else text_index
    index = torch.cat([head, rest_index, tail])
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel())
    return TokenOrder(index, inverse, head.numel(), tail.numel())


@lru_cache(maxsize=128)
def _token_order_on(layout: VideoLayout, order: str, sink_first_frame: bool, tau: int,
                    device: torch.device) -> TokenOrder:
    cpu = _token_order_cpu(layout, order, sink_first_frame, tau)
    return TokenOrder(cpu.index.to(device), cpu.inverse.to(device), cpu.num_dense, cpu.num_dense_tail)


def token_order(layout: VideoLayout, order: str, *, sink_first_frame: bool = True, tau: int = 2,
                device: torch.device | str = "cpu") -> TokenOrder:
    """The cached TokenOrder of ``layout`` (``tau`` only matters for "checkerboard")."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order != "checkerboard":
        tau = 1
    return _token_order_on(layout, order, sink_first_frame, tau, torch.device(device))
