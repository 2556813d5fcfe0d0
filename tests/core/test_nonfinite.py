"""One non-finite token (NaN, +inf, -inf) changes only the outputs that dense SDPA changes.

x' differs from x only in a few elements of token i: non-finite in x', 0 in x. A query token:
dense SDPA changes row i alone, and so must sparse attention, which needs the predicted mask
(v2's block means, v1's ARM on its samples) to read the non-finite elements as 0. A key or
value token changes every dense row, so there the mask must equal the one predicted with zeros
and the rows whose mask skips the token's block must stay finite.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rainfusion import AttentionState, RainFusion2Config, RainFusionConfig, VideoLayout, sparse_attention
from rainfusion.arm import _samples, arm_fractions
from rainfusion.config import AnyConfig
from rainfusion.backends import gather_tokens
from rainfusion.reference import token_mask
from rainfusion.steps import MaskCache
from rainfusion.tools.synthetic import synthetic_attention

LAYOUTS = [  # N = 1200, 1240, 1181: none a multiple of 128; frames of 12 x 20 and 16 x 24
    VideoLayout(frames=5, height=12, width=20),
    VideoLayout(frames=5, height=12, width=20, text_len=40, text_position="before"),
    VideoLayout(frames=3, height=16, width=24, text_len=29, text_position="after"),
]
CONFIGS = {
    "v2": RainFusion2Config.video(),
    "v2-no-sink": RainFusion2Config.video(sink_first_frame=False),
    "v1": RainFusionConfig(),
    "v1+": RainFusionConfig.rainfusion_plus(),
}
NON_FINITE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def _planted(layout: VideoLayout, config: AnyConfig, seed: int) -> tuple[list[torch.Tensor], int, torch.Tensor]:
    """(q, k, v [1, 3, N, 32] float32, token i, dims of token i to plant): a middle-frame token
    (outside the first frame) that v1's ARM samples as a query and a key, with those dims 0.
    The heads are spatial, temporal and textural (random tokens would make every head textural,
    a verdict that NaN recalls would not change)."""
    data = synthetic_attention(layout, heads=3, head_dim=32, seed=seed)
    qkv = [data.query, data.key, data.value]
    g = torch.Generator().manual_seed(seed)
    arm = config if isinstance(config, RainFusionConfig) else RainFusionConfig()
    local, _ = _samples(layout, arm_fractions(arm), arm.arm_queries, arm.sink_first_frame, torch.device("cpu"))
    token = int(local.queries[torch.randint(local.queries.numel(), (1,), generator=g)])
    assert token >= layout.video_start + layout.frame_tokens  # outside the first frame
    dims = torch.randperm(32, generator=g)[:3]
    for x in qkv:
        x[:, :, token, dims] = 0.0
    return qkv, token, dims


def _with(x: torch.Tensor, token: int, dims: torch.Tensor, value: float) -> torch.Tensor:
    out = x.clone()
    out[:, :, token, dims] = value
    return out


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool [B, H, N]: rows of a, b [B, H, N, D] that differ (NaN equals NaN)."""
    same = (a == b) | (a.isnan() & b.isnan())
    return ~same.all(-1)


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout,
            config: AnyConfig) -> tuple[torch.Tensor, MaskCache]:
    """(output [B, H, N, D] of the portable backend, the mask and token order it used)."""
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state, backend="portable")
    return out, state.cache


def _assert_same_prediction(cache: MaskCache, want: MaskCache) -> None:
    assert torch.equal(cache.plan.mask.counts, want.plan.mask.counts) and torch.equal(cache.plan.mask.indices, want.plan.mask.indices)
    assert torch.equal(cache.plan.order, want.plan.order)


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"n{layout.num_tokens}")
def test_a_non_finite_query_token_changes_only_the_rows_dense_sdpa_changes(layout, config, value):
    (q, k, v), token, dims = _planted(layout, config, seed=layout.num_tokens)
    q_bad = _with(q, token, dims, value)
    dense_changed = _changed_rows(F.scaled_dot_product_attention(q_bad, k, v), F.scaled_dot_product_attention(q, k, v))
    only_token = torch.zeros_like(dense_changed)
    only_token[:, :, token] = True
    assert torch.equal(dense_changed, only_token)  # SDPA: row i of every head, nothing else
    out_bad, cache_bad = _sparse(q_bad, k, v, layout, config)
    out, cache = _sparse(q, k, v, layout, config)
    _assert_same_prediction(cache_bad, cache)
    assert torch.equal(_changed_rows(out_bad, out), dense_changed)


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("tensor", ["key", "value"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda layout: f"n{layout.num_tokens}")
def test_a_non_finite_key_or_value_token_keeps_the_mask_and_the_rows_that_skip_it(layout, tensor, config, value):
    (q, k, v), token, dims = _planted(layout, config, seed=layout.num_tokens + 1)
    k_bad, v_bad = (_with(x, token, dims, value) if tensor == name else x for x, name in ((k, "key"), (v, "value")))
    out_bad, cache_bad = _sparse(q, k_bad, v_bad, layout, config)
    _, cache = _sparse(q, k, v, layout, config)
    _assert_same_prediction(cache_bad, cache)
    inverse = cache.plan.inverse.expand(*q.shape[:2], -1)  # position of each token in its head's order
    sees_permuted = token_mask(cache.plan.mask).gather(3, inverse[..., token, None, None].expand(-1, -1, q.shape[2], 1))
    sees = gather_tokens(sees_permuted, cache.plan.inverse).squeeze(-1)  # [B, H, N] in token order
    assert (~sees).any() and sees.any()
    assert out_bad[~sees].isfinite().all()
