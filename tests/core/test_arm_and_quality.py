"""The ARM and both methods on synthetic video attention (heads built spatial / temporal / textural).

Error bounds (relative L2 of the output vs dense float32 SDPA), measured over the layouts and
seeds below on 2026-11-25: v1 at sparsity 0.5: 0.044-0.064 (RainFusion+ 0.048-0.067); v2 at 0.8:
0.24-0.42 (realized density 0.43-0.61 at these small sizes, where the forced text/sink blocks are
a large share). The bounds (0.1 and 0.6) leave ~1.5x of headroom. A control makes them
meaningful: the same per-row block counts chosen at random gave 6-20x the v1 error and
1.75-2.6x the v2 error, so the tests also require 3x (v1) and 1.5x (v2): a predictor that picks
blocks no better than chance fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rainfusion import (AttentionState, BlockSparseMask, RainFusion2Config, RainFusionConfig, VideoLayout,
                        block_sparse_attention, sparse_attention)
from rainfusion.arm import _samples, arm_fractions, recognise_heads
from rainfusion.config import PATTERN_NAMES
from rainfusion.backends import gather_tokens
from rainfusion.reference import relative_l2
from rainfusion.tools.synthetic import synthetic_attention

LAYOUTS = [
    VideoLayout(9, 16, 24, text_len=64, text_position="before"),
    VideoLayout(7, 12, 20, text_len=30, text_position="after"),
    VideoLayout(13, 8, 16),
]
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_arm_recognises_the_heads_the_data_was_built_with(layout, adaptive):
    config = RainFusionConfig(adaptive_bandwidth=adaptive)
    correct = total = 0
    for seed in SEEDS:
        data = synthetic_attention(layout, batch=2, heads=6, head_dim=64, seed=seed)
        heads = recognise_heads(data.query, data.key, layout, config, scale=64**-0.5)
        for row in heads.pattern.tolist():
            correct += sum(PATTERN_NAMES[p] == kind for p, kind in zip(row, data.head_kinds))
            total += len(row)
    assert correct / total >= 0.9


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_a_non_finite_sampled_element_counts_as_zero(value):
    """NaN / inf in 4 dims of 2 sampled tokens of each sample, in q and k, give the verdict and
    recalls of zeros there (NaN recalls would turn every head textural)."""
    layout = LAYOUTS[1]
    config = RainFusionConfig.rainfusion_plus()
    data = synthetic_attention(layout, batch=2, heads=6, head_dim=64, seed=3)
    samples = _samples(layout, arm_fractions(config), config.arm_queries, config.sink_first_frame,
                       torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    tokens = torch.cat([s.queries[torch.randint(s.queries.numel(), (2,), generator=g)] for s in samples])
    where = (slice(None), slice(None), tokens[:, None], torch.randperm(64, generator=g)[:4])
    q, k, q_bad, k_bad = data.query, data.key, data.query.clone(), data.key.clone()
    for x, planted in ((q, 0.0), (k, 0.0), (q_bad, value), (k_bad, value)):
        x[where] = planted
    want = recognise_heads(q, k, layout, config, scale=0.125)
    heads = recognise_heads(q_bad, k_bad, layout, config, scale=0.125)
    assert (want.pattern != PATTERN_NAMES.index("textural")).any()
    for field in ("pattern", "fraction_index", "local_recall", "global_recall"):
        assert torch.equal(getattr(heads, field), getattr(want, field)), field


def test_rainfusion_plus_narrows_concentrated_heads():
    layout = LAYOUTS[0]
    data = synthetic_attention(layout, heads=6, head_dim=64, seed=4)
    plus = recognise_heads(data.query, data.key, layout, RainFusionConfig.rainfusion_plus(), scale=0.125)
    fractions = (0.5, 0.5, 0.25, 0.125)  # 1 - sparsity, then the candidates
    chosen = [fractions[i] for i in plus.fraction_index[0].tolist()]
    banded = [c for c, p in zip(chosen, plus.pattern[0].tolist()) if PATTERN_NAMES[p] != "textural"]
    assert banded and min(banded) < 0.5  # a narrower band than the default for some head
    temporal = (plus.pattern == PATTERN_NAMES.index("temporal")).unsqueeze(-1)
    recall = torch.where(temporal, plus.local_recall, plus.global_recall)  # [B, H, F]
    kept = recall.gather(-1, plus.fraction_index.unsqueeze(-1)).squeeze(-1)
    assert (kept[plus.fraction_index > 0] >= 0.9).all()


def _random_control(mask: BlockSparseMask, generator: torch.Generator) -> BlockSparseMask:
    """The same per-row counts, blocks drawn at random (full rows stay full)."""
    b, h, qb, kb = mask.shape
    scores = torch.rand(b, h, qb, kb, generator=generator)
    width = mask.indices.shape[-1]
    indices = torch.topk(scores, width, -1).indices.sort(-1).values
    slot = torch.arange(width)
    indices = torch.where(slot < mask.counts.unsqueeze(-1), indices, kb).sort(-1).values
    return BlockSparseMask(mask.counts, indices.to(torch.int32), mask.q_len, mask.kv_len, mask.block_size)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config,bound,vs_chance", [(RainFusionConfig(), 0.1, 3.0),
                                                    (RainFusionConfig.rainfusion_plus(), 0.1, 3.0),
                                                    (RainFusion2Config(), 0.6, 1.5)], ids=["v1-0.5", "v1+", "v2-0.8"])
def test_error_vs_dense_stays_under_the_measured_bound_and_beats_chance(layout, config, bound, vs_chance):
    g = torch.Generator().manual_seed(0)
    for seed in SEEDS:
        data = synthetic_attention(layout, batch=1, heads=6, head_dim=64, seed=seed)
        q, k, v = data.query, data.key, data.value
        dense = F.scaled_dot_product_attention(q, k, v)
        state = AttentionState()
        error = relative_l2(sparse_attention(q, k, v, layout=layout, config=config, state=state), dense)
        assert error < bound
        cache = state.cache
        permuted = [gather_tokens(t, cache.plan.order) for t in (q, k, v)]
        control = _random_control(cache.plan.mask, g)
        chance = relative_l2(gather_tokens(block_sparse_attention(*permuted, control), cache.plan.inverse), dense)
        assert chance > vs_chance * error


def test_images_never_get_the_spatial_pattern():
    """One frame: the spatial band would be the whole image, so heads are temporal (spatially
    local) or textural, and v1 is sparse on images too."""
    layout = VideoLayout(1, 32, 32, text_len=20, text_position="before")
    data = synthetic_attention(layout, heads=6, head_dim=64, seed=0)
    config = RainFusionConfig.image(block_size=64)
    heads = recognise_heads(data.query, data.key, layout, config, scale=0.125)
    assert (heads.pattern != PATTERN_NAMES.index("spatial")).all()
    state = AttentionState()
    out = sparse_attention(data.query, data.key, data.value, layout=layout, config=config, state=state)
    assert state.stats.mean_density < 0.8
    dense = F.scaled_dot_product_attention(data.query, data.key, data.value)
    assert relative_l2(out, dense) < 0.25  # measured 0.075-0.085 over seeds 0-2 (density 0.57)


def test_without_the_textural_pattern_heads_take_the_better_band():
    layout = LAYOUTS[0]
    data = synthetic_attention(layout, batch=2, heads=6, head_dim=64, seed=7)
    full = recognise_heads(data.query, data.key, layout, RainFusionConfig(), scale=0.125)
    ablated = recognise_heads(data.query, data.key, layout, RainFusionConfig(textural=False), scale=0.125)
    textural = full.pattern == PATTERN_NAMES.index("textural")
    assert textural.any() and not (ablated.pattern == PATTERN_NAMES.index("textural")).any()
    assert torch.equal(ablated.pattern[~textural], full.pattern[~textural])  # the others keep their verdict
    spatial_better = full.global_recall[..., 0] > full.local_recall[..., 0]
    expected = torch.where(spatial_better, PATTERN_NAMES.index("spatial"), PATTERN_NAMES.index("temporal"))
    assert torch.equal(ablated.pattern[textural], expected[textural])
    with pytest.raises(TypeError, match="textural must be a bool"):
        RainFusionConfig(textural=1)
