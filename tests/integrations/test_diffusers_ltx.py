"""apply_rainfusion on diffusers' real LTXVideoTransformer3DModel (tokens arrive packed; text only in
cross-attention, so attn1 is video-only self-attention)."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion._logging import log_once  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

CHANNELS, TEXT = 8, 12


def tiny_ltx() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=64,
        cross_attention_dim=128, num_layers=2, caption_channels=32,
    ).eval()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C], exactly as diffusers' LTX pipeline does (patch size 1)."""
    return diffusers.LTXPipeline._pack_latents(latents, 1, 1)


def inputs(seed: int = 1, frames: int = 5, height: int = 16, width: int = 16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, CHANNELS, frames, height, width, generator=g)
    return latents, torch.randn(1, TEXT, 32, generator=g)


def run(model, latents, text, timestep):
    _, _, frames, height, width = latents.shape
    with torch.no_grad():
        return model(pack(latents), text, torch.tensor([timestep]), torch.ones(1, TEXT), num_frames=frames,
                     height=height, width=width, return_dict=False)[0]


def test_sparsity_zero_equals_the_untouched_model_and_layout_is_the_token_grid():
    model = tiny_ltx()
    latents, text = inputs(frames=5, height=16, width=12)
    dense = run(model, latents, text, 999)
    controller = apply_rainfusion(model, RainFusion2Config(sparsity=0.0, block_size=64))
    assert relative_l2(run(model, latents, text, 999), dense) < 1e-5
    assert controller.layout == VideoLayout(5, 16, 12)
    # the interception triggers through diffusers' dispatch_attention_fn (native backend -> SDPA)
    assert {layer for *_, layer, _ in controller.history} == {0, 1}


def test_remove_restores_the_model_exactly():
    model = tiny_ltx()
    latents, text = inputs()
    before = run(model, latents, text, 500)
    processors = [block.attn1.processor for block in model.transformer_blocks]
    cross = [block.attn2.processor for block in model.transformer_blocks]
    apply_rainfusion(model, RainFusion2Config(block_size=64))
    assert [block.attn2.processor for block in model.transformer_blocks] == cross  # cross-attention untouched
    assert not torch.equal(run(model, latents, text, 500), before)
    remove_rainfusion(model)
    assert all(a is b for a, b in zip([block.attn1.processor for block in model.transformer_blocks], processors))
    assert not model._forward_pre_hooks
    assert torch.equal(run(model, latents, text, 500), before)


# random weights, 5x16x16 tokens, both layers sparse: measured over seeds 1-3 relative L2
# v2 0.0054-0.0054 (density 0.56), v1 0.0027-0.0031 (density 0.68); bounds ~3x the max
@pytest.mark.parametrize("config, bound", [(RainFusion2Config(block_size=64), 0.016),
                                           (RainFusionConfig(block_size=64), 0.0095)])
def test_sparse_steps_fill_statistics_and_stay_close_to_dense(config, bound):
    model = tiny_ltx()
    latents, text = inputs()
    dense = run(model, latents, text, 700)
    controller = apply_rainfusion(model, config)
    sparse = run(model, latents, text, 700)
    assert [layer for *_, layer, _ in controller.history] == [0, 1]
    assert all(not s.dense and s.mean_density < 1 for *_, s in controller.history)
    assert 0 < relative_l2(sparse, dense) < bound


def test_video_coords_give_the_same_layout():
    model = tiny_ltx()
    controller = apply_rainfusion(model, RainFusion2Config())
    latents, text = inputs(frames=3, height=8, width=6)
    grid = torch.meshgrid(torch.arange(3) * 8.0, torch.arange(8) * 32.0, torch.arange(6) * 32.0, indexing="ij")
    coords = torch.stack(grid).flatten(1)[None]  # [B, 3, N], scaled as the pipelines do
    with torch.no_grad():
        model(pack(latents), text, torch.tensor([900]), torch.ones(1, TEXT), video_coords=coords)
    assert controller.layout == VideoLayout(3, 8, 6)


def test_video_coords_off_the_grid_run_dense_and_say_so(caplog):
    """Tokens that are not one raster grid (LTXConditionPipeline's conditioning tokens): that
    forward's attention runs dense, exactly the untouched model, with one warning."""
    model = tiny_ltx()
    latents, text = inputs(frames=3, height=8, width=6)
    grid = torch.meshgrid(torch.arange(3) * 8.0, torch.arange(8) * 32.0, torch.arange(6) * 32.0, indexing="ij")
    coords = torch.stack(grid).flatten(1)[None].flip(-1)  # reversed: not raster order

    def forward():
        with torch.no_grad():
            return model(pack(latents), text, torch.tensor([900]), torch.ones(1, TEXT), video_coords=coords,
                         return_dict=False)[0]

    untouched = forward()
    controller = apply_rainfusion(model, RainFusion2Config(sparsity=0.9))
    log_once.cache_clear()
    with caplog.at_level("WARNING", logger="rainfusion"):
        assert relative_l2(forward(), untouched) < 1e-6
        forward()
    assert controller.layout is None and not controller.history
    warnings = [r.message for r in caplog.records if "do not span one full (t, h, w) grid" in r.message]
    assert len(warnings) == 1 and warnings[0].endswith("attention of such forwards runs dense")  # logged once


class _FirstQuery(TorchFunctionMode):
    """Records the query of the first scaled_dot_product_attention call (attn1 of block 0)."""

    def __init__(self):
        super().__init__()
        self.query = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.query is None:
            self.query = kwargs["query"] if "query" in kwargs else args[0]
        return func(*args, **kwargs)


def test_marker_lands_on_the_token_the_layout_says():
    """A marker planted at latent voxel (t, h, w), packed as the pipeline packs, changes exactly the
    self-attention query row that the layout's raster (t, h, w) index names."""
    model = tiny_ltx()
    latents, text = inputs(frames=3, height=8, width=6)
    marked = latents.clone()
    marked[:, :, 2, 5, 4] += 100.0
    queries = []
    for lat in (latents, marked):  # the untouched model: its own attention sequence
        with _FirstQuery() as mode:
            run(model, lat, text, 900)
        queries.append(mode.query)
    changed = (queries[1] - queries[0]).abs().sum((1, 3))[0]  # [B, heads, N, D] -> per token
    controller = apply_rainfusion(model, RainFusion2Config())
    run(model, latents, text, 900)
    layout = controller.layout
    assert layout == VideoLayout(3, 8, 6) and queries[0].shape[2] == layout.num_tokens
    assert int(changed.argmax()) == layout.video_start + (2 * layout.height + 5) * layout.width + 4
    assert int((changed > 0).sum()) == 1
