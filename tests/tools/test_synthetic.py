import math

import pytest
import torch

from rainfusion.layout import VideoLayout
from rainfusion.tools.synthetic import HEAD_KINDS, SyntheticAttention, synthetic_attention

SPATIAL, TEMPORAL, TEXTURAL = (list(range(i, 6, 3)) for i in range(3))  # default kinds of 6 heads


def _band(center: torch.Tensor, units: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi) of the round(fraction * units) units centred on ``center``, shifted inside [0, units)."""
    keep = min(units, max(1, round(fraction * units)))
    lo = (center - keep // 2).clamp(0, units - keep)
    return lo, lo + keep


def _probs(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) of query [..., Q, D], key [..., K, D]."""
    logits = query.double() @ key.double().transpose(-1, -2) / math.sqrt(query.shape[-1])
    return torch.softmax(logits, dim=-1)


def frame_masses(data: SyntheticAttention, layout: VideoLayout,
                 max_queries: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [B, H] (frame-band mass, own-frame mass): softmax over all video keys of evenly spread
    video queries; mass on keys whose frame lies in the band of round(T / 2) frames around the
    query's frame, and on keys of the query's own frame."""
    n, hw = layout.video_tokens, layout.frame_tokens
    video = slice(layout.video_start, layout.video_start + n)
    count = min(max_queries, n)
    queries = torch.arange(count) * n // count
    query_frame = queries // hw
    key_frame = torch.arange(n) // hw
    lo, hi = _band(query_frame, layout.frames, 0.5)
    in_band = ((key_frame >= lo[:, None]) & (key_frame < hi[:, None])).double()
    own = (key_frame == query_frame[:, None]).double()
    band_mass, own_mass = [], []
    for head in range(data.query.shape[1]):  # one head at a time keeps memory small
        probs = _probs(data.query[:, head, video][:, queries], data.key[:, head, video])
        band_mass.append((probs * in_band).sum(-1).mean(-1))
        own_mass.append((probs * own).sum(-1).mean(-1))
    return torch.stack(band_mass, 1), torch.stack(own_mass, 1)


def in_frame_band_mass(data: SyntheticAttention, layout: VideoLayout) -> torch.Tensor:
    """float64 [B, H]: queries and keys of the middle frame only; mass on keys whose raster
    position lies in the band of round(H * W / 2) positions around the query's."""
    hw = layout.frame_tokens
    start = layout.video_start + (layout.frames // 2) * hw
    frame = slice(start, start + hw)
    position = torch.arange(hw)
    lo, hi = _band(position, hw, 0.5)
    in_band = ((position >= lo[:, None]) & (position < hi[:, None])).double()
    probs = _probs(data.query[:, :, frame], data.key[:, :, frame])
    return (probs * in_band).sum(-1).mean(-1)


CASES = [  # (layout, seed, head_dim)
    (VideoLayout(5, 8, 8), 0, 64),
    (VideoLayout(5, 8, 8), 1, 64),
    (VideoLayout(5, 8, 8), 2, 32),
    (VideoLayout(7, 9, 11), 0, 64),
    (VideoLayout(7, 9, 11), 1, 64),
    (VideoLayout(7, 9, 11), 2, 128),
    (VideoLayout(9, 16, 24, text_len=64, text_position="before"), 0, 64),
    (VideoLayout(9, 16, 24, text_len=64, text_position="before"), 3, 128),
    (VideoLayout(6, 12, 10, text_len=17, text_position="after"), 1, 64),
    (VideoLayout(6, 12, 10, text_len=17, text_position="after"), 4, 64),
    (VideoLayout(21, 30, 52), 0, 64),
    (VideoLayout(1, 16, 16), 0, 64),
    (VideoLayout(1, 16, 16), 5, 64),
    (VideoLayout(1, 12, 20, text_len=8, text_position="after"), 2, 128),
]


def _case_id(case: tuple[VideoLayout, int, int]) -> str:
    layout, seed, head_dim = case
    text = f"+{layout.text_len}{layout.text_position}" if layout.text_len else ""
    return f"{layout.frames}x{layout.height}x{layout.width}{text}-s{seed}-d{head_dim}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_heads_lean_as_their_kind(case):
    layout, seed, head_dim = case
    data = synthetic_attention(layout, batch=2, heads=6, head_dim=head_dim, seed=seed)
    assert data.head_kinds == HEAD_KINDS * 2 == ("spatial", "temporal", "textural") * 2

    in_frame = in_frame_band_mass(data, layout)
    assert in_frame[:, TEMPORAL].min() >= 0.9, in_frame
    assert in_frame[:, SPATIAL].max() < 0.75, in_frame
    assert in_frame[:, TEXTURAL].max() < 0.75, in_frame

    if layout.frames > 1:
        band, own = frame_masses(data, layout)
        assert band[:, SPATIAL].min() >= 0.9, band
        assert band[:, TEXTURAL].max() < 0.75, band
        if layout.frames >= 5:  # temporal heads reach the other frames
            assert (1 - own[:, TEMPORAL]).min() >= 0.5, own


def test_shapes_dtype_kinds_and_scale():
    layout = VideoLayout(3, 4, 6, text_len=5, text_position="before")
    data = synthetic_attention(layout, batch=2, heads=4, head_dim=16, seed=7)
    for tensor in (data.query, data.key, data.value):
        assert tensor.shape == (2, 4, layout.num_tokens, 16)
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    assert data.head_kinds == ("spatial", "temporal", "textural", "spatial")

    kinds = ("textural", "textural", "temporal")
    half = synthetic_attention(layout, heads=3, head_kinds=list(kinds), dtype=torch.bfloat16, device="cpu")
    assert half.head_kinds == kinds
    for tensor in (half.query, half.key, half.value):
        assert tensor.dtype == torch.bfloat16
        assert torch.isfinite(tensor).all()
        rms = tensor.float().pow(2).mean().sqrt()
        assert 0.3 < rms < 3 and tensor.abs().max() < 16


def test_deterministic_per_seed_and_batch_items_differ():
    layout = VideoLayout(4, 6, 5, text_len=3, text_position="after")
    first = synthetic_attention(layout, batch=2, seed=11)
    again = synthetic_attention(layout, batch=2, seed=11)
    other = synthetic_attention(layout, batch=2, seed=12)
    for name in ("query", "key", "value"):
        a, b, c = getattr(first, name), getattr(again, name), getattr(other, name)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c, atol=1e-2)
        assert not torch.allclose(a[0], a[1], atol=1e-2)


@pytest.mark.parametrize("text_position", ["before", "after"])
def test_text_tokens_sit_where_the_layout_says(text_position):
    video_only = VideoLayout(3, 5, 7)
    layout = VideoLayout(3, 5, 7, text_len=9, text_position=text_position)
    plain = synthetic_attention(video_only, batch=2, seed=3)
    data = synthetic_attention(layout, batch=2, seed=3)
    video = slice(layout.video_start, layout.video_start + layout.video_tokens)
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    assert layout.text_start == (0 if text_position == "before" else video_only.video_tokens)
    for name in ("query", "key", "value"):
        tensor, reference = getattr(data, name), getattr(plain, name)
        assert torch.equal(tensor[:, :, video], reference)  # the video does not depend on the text
        text_rms = tensor[:, :, text].pow(2).mean(dim=(-2, -1)).sqrt()  # [B, H]
        video_rms = reference.pow(2).mean(dim=(-2, -1)).sqrt()
        assert ((text_rms / video_rms - 1).abs() < 0.25).all()
        # text is noise: unlike neighbouring video tokens, neighbouring text tokens are unrelated
        assert _neighbour_cosine(tensor[:, :, text]) < 0.3 < _neighbour_cosine(reference)


def _neighbour_cosine(tokens: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive tokens of tokens [B, H, N, D]."""
    return torch.cosine_similarity(tokens[:, :, 1:], tokens[:, :, :-1], dim=-1).mean().item()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(layout=(4, 8, 8)), TypeError, "layout must be a VideoLayout, got tuple"),
        (dict(batch=0), ValueError, "batch must be >= 1, got 0"),
        (dict(heads=2.0), TypeError, "heads must be an int, got float"),
        (dict(head_dim=8), ValueError, "head_dim must be >= 16, got 8"),
        (dict(head_dim=33), ValueError, r"head_dim must be even \(rotary pairs\), got 33"),
        (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
        (dict(head_kinds="spatial"), TypeError, "head_kinds must be a sequence of str, got str"),
        (dict(head_kinds=["spatial"] * 5), ValueError, r"head_kinds must have one kind per head \(6\), got 5"),
        (dict(head_kinds=["spatial"] * 5 + ["global"]), ValueError,
         r"head_kinds\[5\] must be one of \('spatial', 'temporal', 'textural'\), got 'global'"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point torch.dtype, got torch.int32"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    args = dict(layout=VideoLayout(2, 4, 4))
    args.update(kwargs)
    layout = args.pop("layout")
    with pytest.raises(error, match=match):
        synthetic_attention(layout, **args)
