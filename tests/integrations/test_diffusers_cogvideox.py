"""apply_rainfusion on diffusers' real CogVideoXTransformer3DModel (joint attention, text before)."""

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

TEXT = 16


def tiny_cogvideox() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=32, sample_height=32, sample_frames=17,
        max_text_seq_length=TEXT,
    ).eval()


def inputs(frames: int = 5, size: int = 32, seed: int = 1, width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, frames, 4, size, size if width is None else width, generator=g)
    return latents, torch.randn(1, TEXT, 32, generator=g)


def run(model, latents, text, timestep):
    with torch.no_grad():
        return model(latents, text, torch.tensor([timestep]), return_dict=False)[0]


def test_layout_text_before_and_exact_dense_equivalence_and_removal():
    model = tiny_cogvideox()
    latents, text = inputs()
    dense = run(model, latents, text, 999)
    processors = [block.attn1.processor for block in model.transformer_blocks]
    controller = apply_rainfusion(model, RainFusion2Config(sparsity=0.0, block_size=64))
    assert relative_l2(run(model, latents, text, 999), dense) < 1e-5
    assert controller.layout == VideoLayout(5, 16, 16, text_len=TEXT, text_position="before")
    # diffusers filters processor kwargs by the processor's signature: the wrapper shows the original's
    wrapped = model.transformer_blocks[0].attn1.processor
    assert inspect.signature(wrapped.__call__) == inspect.signature(processors[0].__call__)
    remove_rainfusion(model)
    assert [block.attn1.processor for block in model.transformer_blocks] == processors
    assert torch.equal(run(model, latents, text, 999), dense)


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64), RainFusionConfig(block_size=64)])
def test_sparse_steps_are_close_to_dense(config):
    model = tiny_cogvideox()
    latents, text = inputs()
    dense = run(model, latents, text, 500)
    controller = apply_rainfusion(model, config)
    sparse = run(model, latents, text, 500)
    assert len(controller.history) == 2 and all(s.mean_density < 1 for *_, s in controller.history)
    # random weights: measured 0.0016-0.0037 over 3 inputs; 0.012 leaves 3x headroom
    assert 0 < relative_l2(sparse, dense) < 0.012


def test_marker_lands_on_the_token_the_layout_says():
    """On a non-square latent (8 x 12): the marker at (t, h, w) lands on text + raster (t, h/2, w/2)."""
    model = tiny_cogvideox()
    controller = apply_rainfusion(model, RainFusion2Config())
    latents, text = inputs(frames=3, size=8, width=12)
    seen = []
    hook = model.patch_embed.register_forward_hook(lambda m, a, out: seen.append(out))
    run(model, latents, text, 900)
    marked = latents.clone()
    marked[:, 2, :, 5, 10] += 100.0
    run(model, marked, text, 900)
    hook.remove()
    changed = (seen[1] - seen[0]).abs().sum(-1)[0]
    layout = controller.layout
    assert (layout.frames, layout.height, layout.width) == (3, 4, 6)
    want = layout.video_start + (2 * layout.height + 5 // 2) * layout.width + 10 // 2
    assert int(changed.argmax()) == want


def test_its_processor_calls_torch_directly_so_any_active_backend_still_reaches_rainfusion():
    """CogVideoX's processor calls F.scaled_dot_product_attention itself (no diffusers dispatch):
    an active `attention_backend("flex")` does not change what rainfusion receives."""
    from diffusers import attention_backend

    model = tiny_cogvideox()
    controller = apply_rainfusion(model, RainFusion2Config(warmup_fraction=0.0))
    with attention_backend("flex"):
        run(model, *inputs(frames=3, size=16), 900)
    assert controller.history and all(not stats.dense for *_, stats in controller.history)
