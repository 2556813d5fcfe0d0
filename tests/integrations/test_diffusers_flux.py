"""apply_rainfusion on diffusers' real FluxTransformer2DModel (an image DiT: joint attention with the
text tokens before the image in both the double-stream and the single-stream blocks)."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

CHANNELS, TEXT = 4, 16  # packed tokens carry CHANNELS * 2 * 2 features


def tiny_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        in_channels=CHANNELS * 4, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24),
    ).eval()


def inputs(seed: int = 1, height: int = 64, width: int = 48):
    """Unpacked latents [B, C, height, width] (the pipeline packs 2x2 patches), text, pooled text."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, CHANNELS, height, width, generator=g)
    return latents, torch.randn(1, TEXT, 32, generator=g), torch.randn(1, 32, generator=g)


def run(model, latents, text, pooled, timestep):
    """Packs and positions the latents exactly as diffusers' Flux pipeline does."""
    batch, channels, height, width = latents.shape
    tokens = diffusers.FluxPipeline._pack_latents(latents, batch, channels, height, width)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    with torch.no_grad():
        return model(tokens, text, pooled, torch.tensor([timestep]), img_ids, torch.zeros(TEXT, 3),
                     return_dict=False)[0]


def self_attention(model):
    return [block.attn for block in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]


def test_sparsity_zero_equals_the_untouched_model_and_layout_has_text_before():
    model = tiny_flux()
    latents, text, pooled = inputs()
    dense = run(model, latents, text, pooled, 1.0)
    controller = apply_rainfusion(model, RainFusion2Config.image(sparsity=0.0, block_size=64))
    assert relative_l2(run(model, latents, text, pooled, 1.0), dense) < 1e-5
    assert controller.layout == VideoLayout(1, 32, 24, text_len=TEXT, text_position="before")
    # both the double-stream and the single-stream attention are intercepted (via dispatch_attention_fn)
    assert [layer for *_, layer, _ in controller.history] == [0, 1]


def test_remove_restores_the_model_exactly():
    model = tiny_flux()
    latents, text, pooled = inputs()
    before = run(model, latents, text, pooled, 0.5)
    processors = [attn.processor for attn in self_attention(model)]
    apply_rainfusion(model, RainFusion2Config.image(block_size=64))
    assert not torch.equal(run(model, latents, text, pooled, 0.5), before)
    remove_rainfusion(model)
    assert all(a is b for a, b in zip([attn.processor for attn in self_attention(model)], processors))
    assert not model._forward_pre_hooks
    assert torch.equal(run(model, latents, text, pooled, 0.5), before)


# v2 only: v1's head patterns are video bands (a one-frame "spatial" band is the whole image), so
# v1 on an image picks full density. Random weights, 32x24 image tokens + 16 text, both layers
# sparse (density 0.64): measured relative L2 0.0020-0.0028 over seeds 1-3; 0.0085 is ~3x the max
def test_sparse_steps_fill_statistics_and_stay_close_to_dense():
    model = tiny_flux()
    latents, text, pooled = inputs()
    dense = run(model, latents, text, pooled, 0.7)
    controller = apply_rainfusion(model, RainFusion2Config.image(block_size=64))
    sparse = run(model, latents, text, pooled, 0.7)
    assert [layer for *_, layer, _ in controller.history] == [0, 1]
    assert all(not s.dense and s.mean_density < 1 for *_, s in controller.history)
    assert 0 < relative_l2(sparse, dense) < 0.0085


def test_img_ids_that_are_not_a_raster_grid_run_dense():
    """Image tokens that are not one raster grid (Flux Kontext appends its reference image's):
    that forward's attention runs dense, exactly the untouched model."""
    model = tiny_flux()
    latents, text, pooled = inputs(height=8, width=8)
    tokens = diffusers.FluxPipeline._pack_latents(latents, 1, CHANNELS, 8, 8)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32).flip(0)

    def forward():
        with torch.no_grad():
            return model(tokens, text, pooled, torch.tensor([1.0]), img_ids, torch.zeros(TEXT, 3), return_dict=False)[0]

    untouched = forward()
    controller = apply_rainfusion(model, RainFusion2Config.image(sparsity=0.9))
    assert relative_l2(forward(), untouched) < 1e-6
    assert controller.layout is None and not controller.history


class _Queries(TorchFunctionMode):
    """Records the query of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.queries = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.queries.append(kwargs["query"] if "query" in kwargs else args[0])
        return func(*args, **kwargs)


def test_marker_lands_on_the_token_the_layout_says():
    """A marker planted at latent pixel (y, x), packed as the pipeline packs, changes exactly the
    joint-attention query row that the layout names: text first, then raster (y/2, x/2)."""
    model = tiny_flux()
    latents, text, pooled = inputs(height=16, width=12)
    marked = latents.clone()
    marked[:, :, 11, 5] += 100.0
    seen = []
    for lat in (latents, marked):  # the untouched model: its own attention sequence
        with _Queries() as mode:
            run(model, lat, text, pooled, 0.9)
        seen.append(mode.queries)
    controller = apply_rainfusion(model, RainFusion2Config.image())
    run(model, latents, text, pooled, 0.9)
    layout = controller.layout
    assert layout == VideoLayout(1, 8, 6, text_len=TEXT, text_position="before")
    want = layout.video_start + (11 // 2) * layout.width + 5 // 2
    # the double-stream block's attention: only the marked image token's query changes
    changed = (seen[1][0] - seen[0][0]).abs().sum((1, 3))[0]  # [B, heads, N, D] -> per token
    assert seen[0][0].shape[2] == layout.num_tokens
    assert int(changed.argmax()) == want and int((changed > 0).sum()) == 1
    # the single-stream block's sequence: text first too (the marker is now the largest change there)
    changed = (seen[1][1] - seen[0][1]).abs().sum((1, 3))[0]
    assert seen[0][1].shape[2] == layout.num_tokens and int(changed.argmax()) == want
