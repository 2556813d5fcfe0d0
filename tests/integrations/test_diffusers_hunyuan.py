"""apply_rainfusion on diffusers' real HunyuanVideoTransformer3DModel: joint attention with the
text after the video, and a key mask for the padded end of the prompt."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

TEXT, PADDED = 12, 5


def tiny_hunyuan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24),
    ).eval()


def inputs(seed: int = 1, frames: int = 5, size: int = 32, width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size if width is None else width, generator=g)
    text = torch.randn(1, TEXT, 32, generator=g)
    text_mask = torch.ones(1, TEXT, dtype=torch.long)
    text_mask[:, TEXT - PADDED:] = 0  # the prompt is padded: its last tokens are masked out
    pooled = torch.randn(1, 16, generator=g)
    return latents, text, text_mask, pooled


def run(model, latents, text, text_mask, pooled, timestep):
    with torch.no_grad():
        return model(latents, torch.tensor([timestep]), text, text_mask, pooled, return_dict=False)[0]


def test_padded_prompt_runs_sparse_and_equals_the_stock_model_at_sparsity_zero():
    model = tiny_hunyuan()
    args = inputs()
    dense = run(model, *args, 999)
    processors = [block.attn.processor for block in model.transformer_blocks]
    controller = apply_rainfusion(model, RainFusion2Config(sparsity=0.0, block_size=64))
    assert relative_l2(run(model, *args, 999), dense) < 1e-5
    assert controller.layout == VideoLayout(5, 16, 16, text_len=TEXT, text_position="after")
    assert len(controller.history) == 2 and not any(s.dense for *_, s in controller.history)  # not a dense fallback
    remove_rainfusion(model)
    assert [block.attn.processor for block in model.transformer_blocks] == processors
    assert torch.equal(run(model, *args, 999), dense)


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64), RainFusionConfig(block_size=64)])
def test_sparse_steps_are_close_to_dense(config):
    model = tiny_hunyuan()
    args = inputs()
    dense = run(model, *args, 500)
    controller = apply_rainfusion(model, config)
    sparse = run(model, *args, 500)
    assert all(s.mean_density < 1 for *_, s in controller.history)
    assert 0 < relative_l2(sparse, dense) < BOUND[type(config)]


# random weights: measured 0.0024-0.0038 (v2) and 0.0015-0.0021 (v1) over 3 inputs; 3x headroom
BOUND = {RainFusion2Config: 0.012, RainFusionConfig: 0.0065}


def test_only_a_trailing_text_padding_is_taken_as_kv_valid_len():
    """HunyuanVideo builds its key mask from the prompt length (a prefix); any other mask stays
    a mask and the call runs dense."""
    model = tiny_hunyuan()
    controller = apply_rainfusion(model, RainFusion2Config(block_size=64))
    run(model, *inputs(), 300)  # sets the layout: 320 video + 12 text tokens
    n = controller.layout.num_tokens
    key = torch.zeros(2, 2, n, 64)
    keep = torch.arange(n) < torch.tensor([[n], [n - PADDED]])
    assert controller.key_padding(keep.view(2, 1, 1, n), key).tolist() == [n, n - PADDED]
    hole = keep.clone()
    hole[:, 10] = False  # inside the video: not a padding of the trailing text
    assert controller.key_padding(hole.view(2, 1, 1, n), key) is None
    into_video = torch.arange(n) < n - TEXT - 1  # cuts into the video
    assert controller.key_padding(into_video.view(1, 1, 1, n), key[:1]) is None
    assert controller.key_padding(keep.view(2, 1, 1, n).float(), key) is None  # additive masks stay masks


def test_marker_lands_on_the_token_the_layout_says():
    """On a non-square latent (8 x 12): the marker at (t, h, w) lands on raster (t, h/2, w/2),
    the video first and the text after it."""
    model = tiny_hunyuan()
    controller = apply_rainfusion(model, RainFusion2Config())
    latents, text, text_mask, pooled = inputs(frames=3, size=8, width=12)
    seen = []
    hook = model.x_embedder.register_forward_hook(lambda m, a, out: seen.append(out))
    run(model, latents, text, text_mask, pooled, 900)
    marked = latents.clone()
    marked[:, :, 2, 5, 10] += 100.0
    run(model, marked, text, text_mask, pooled, 900)
    hook.remove()
    changed = (seen[1] - seen[0]).abs().sum(-1)[0]
    layout = controller.layout
    assert layout == VideoLayout(3, 4, 6, text_len=TEXT, text_position="after")
    assert int(changed.argmax()) == (2 * layout.height + 5 // 2) * layout.width + 10 // 2
