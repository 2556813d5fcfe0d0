"""apply_rainfusion / remove_rainfusion on diffusers' real WanTransformer3DModel (tiny random config)."""

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    )
    return model.eval()


def inputs(seed: int = 1, frames: int = 9, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size, generator=g)
    text = torch.randn(1, 12, 32, generator=g)
    return latents, text


def run(model, latents, text, timestep):
    with torch.no_grad():
        return model(latents, torch.tensor([timestep]), text, return_dict=False)[0]


def test_sparsity_zero_and_warmup_equal_the_untouched_model():
    model = tiny_wan()
    latents, text = inputs()
    dense = run(model, latents, text, 999)
    apply_rainfusion(model, RainFusion2Config(sparsity=0.0))
    assert relative_l2(run(model, latents, text, 999), dense) < 1e-5
    remove_rainfusion(model)
    controller = apply_rainfusion(model, RainFusion2Config(), num_steps=10)  # 3 warm-up steps
    assert relative_l2(run(model, latents, text, 999), dense) < 1e-6
    assert all(stats.dense for *_, stats in controller.history)


def test_remove_restores_the_model_exactly():
    model = tiny_wan()
    latents, text = inputs()
    before = run(model, latents, text, 500)
    processors = [block.attn1.processor for block in model.blocks]
    apply_rainfusion(model, RainFusionConfig())
    assert not torch.equal(run(model, latents, text, 500), before)
    remove_rainfusion(model)
    assert [block.attn1.processor for block in model.blocks] == processors
    assert not model._forward_pre_hooks
    assert torch.equal(run(model, latents, text, 500), before)


@pytest.mark.parametrize("config", [RainFusion2Config(), RainFusionConfig(), RainFusionConfig.rainfusion_plus()])
def test_sparse_steps_run_fill_statistics_and_stay_close_to_dense(config):
    model = tiny_wan()
    latents, text = inputs()
    dense = run(model, latents, text, 700)
    controller = apply_rainfusion(model, config, skip_layers=(1,))
    sparse = run(model, latents, text, 700)
    assert controller.layout == VideoLayout(9, 16, 16)
    layers = {layer for *_, layer, _ in controller.history}
    assert layers == {0}  # layer 1 is dense
    stats = controller.history[-1][-1]
    assert not stats.dense and stats.mean_density < 1.0
    # random weights, one sparse layer of two: measured 0.0016-0.0029 over 3 seeds (the residual
    # stream carries most of the output); 0.01 leaves 3x headroom
    assert relative_l2(sparse, dense) < 0.01


def test_steps_cfg_passes_and_generations_are_counted_from_timesteps():
    model = tiny_wan()
    latents, text = inputs(frames=5, size=16)
    controller = apply_rainfusion(model, RainFusion2Config(refresh_interval=1), num_steps=4)
    for timestep in (999, 999, 666, 666, 333):  # two CFG passes per step
        run(model, latents, text, timestep)
    assert controller.step == 2 and controller.call_in_step == 0
    assert {(step, cfg) for step, cfg, *_ in controller.history} == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)}
    run(model, latents, text, 999)  # timestep goes up: a new generation
    assert controller.step == 0 and len(controller.history) == 2


def test_layout_matches_the_model_token_order():
    """A marker planted at latent voxel (t, h, w) lands on token index of raster (t, h/2, w/2)."""
    model = tiny_wan()
    controller = apply_rainfusion(model, RainFusion2Config())
    latents, text = inputs(frames=3, size=8)
    seen = {}
    hook = model.patch_embedding.register_forward_hook(lambda m, a, out: seen.setdefault("tokens", out))
    run(model, latents, text, 900)
    base = seen.pop("tokens").flatten(2).transpose(1, 2)
    marked = latents.clone()
    marked[:, :, 2, 5, 6] += 100.0
    run(model, marked, text, 900)
    changed = (seen["tokens"].flatten(2).transpose(1, 2) - base).abs().sum(-1)[0]
    layout = controller.layout
    assert layout == VideoLayout(3, 4, 4)
    assert int(changed.argmax()) == (2 * layout.height + 5 // 2) * layout.width + 6 // 2
    hook.remove()


def test_errors_for_unsupported_models_and_bad_arguments():
    supported = ("CogVideoXTransformer3DModel", "FluxTransformer2DModel", "HunyuanVideoTransformer3DModel",
                 "LTXVideoTransformer3DModel", "WanTransformer3DModel")
    with pytest.raises(ValueError, match=re.escape(f"does not support Linear; supported transformers: {list(supported)}")):
        apply_rainfusion(torch.nn.Linear(2, 2), RainFusion2Config())
    with pytest.raises(TypeError, match="model_or_pipeline must be a diffusers transformer or a pipeline"):
        apply_rainfusion(object(), RainFusion2Config())
    model = tiny_wan()
    with pytest.raises(TypeError, match="config must be a RainFusionConfig or RainFusion2Config, got float"):
        apply_rainfusion(model, 0.8)
    with pytest.raises(ValueError, match=r"skip_layers must be in \[0, 2\), got \[5\]"):
        apply_rainfusion(model, RainFusion2Config(), skip_layers=(5,))
    apply_rainfusion(model, RainFusion2Config())
    with pytest.raises(ValueError, match="already applied"):
        apply_rainfusion(model, RainFusion2Config())
    remove_rainfusion(model)
    with pytest.raises(ValueError, match="not applied"):
        remove_rainfusion(model)
