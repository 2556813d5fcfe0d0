"""apply_rainfusion / remove_rainfusion on diffusers' real WanTransformer3DModel (tiny random config)."""

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402
from tiny_pipelines import build_tiny_wan_pipeline, needs_pipeline  # noqa: E402


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    )
    return model.eval()


def inputs(seed: int = 1, frames: int = 9, size: int = 32, width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size if width is None else width, generator=g)
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
    forwards = [module.forward for module in (model, *(block.attn1 for block in model.blocks))]
    apply_rainfusion(model, RainFusionConfig())
    assert [block.attn1.processor for block in model.blocks] == processors  # never replaced
    assert not torch.equal(run(model, latents, text, 500), before)
    remove_rainfusion(model)
    assert [block.attn1.processor for block in model.blocks] == processors
    assert not model._forward_pre_hooks and not model._diffusers_hook.hooks
    assert [module.forward for module in (model, *(block.attn1 for block in model.blocks))] == forwards
    assert torch.equal(run(model, latents, text, 500), before)


def _sparse_layers(controller) -> set[int]:
    return {layer for *_, layer, stats in controller.history if not stats.dense}


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


@pytest.mark.parametrize("by_name", [False, True], ids=["positional", "keywords"])
def test_layout_matches_the_model_token_order(by_name):
    """A marker planted at latent voxel (t, h, w) of a non-square latent (8 x 12) lands on token
    index of raster (t, h/2, w/2); the forward's arguments are read by name however they come."""
    model = tiny_wan()
    controller = apply_rainfusion(model, RainFusion2Config())
    latents, text = inputs(frames=3, size=8, width=12)
    seen = {}
    hook = model.patch_embedding.register_forward_hook(lambda m, a, out: seen.setdefault("tokens", out))

    def call(x):
        with torch.no_grad():
            if by_name:
                return model(encoder_hidden_states=text, timestep=torch.tensor([900]), hidden_states=x)
            return model(x, torch.tensor([900]), text)

    call(latents)
    base = seen.pop("tokens").flatten(2).transpose(1, 2)
    marked = latents.clone()
    marked[:, :, 2, 5, 10] += 100.0
    call(marked)
    changed = (seen["tokens"].flatten(2).transpose(1, 2) - base).abs().sum(-1)[0]
    layout = controller.layout
    assert layout == VideoLayout(3, 4, 6)
    assert int(changed.argmax()) == (2 * layout.height + 5 // 2) * layout.width + 10 // 2
    hook.remove()


def test_a_subclass_of_a_supported_transformer_takes_its_geometry():
    class MyWan(diffusers.WanTransformer3DModel):
        pass

    torch.manual_seed(0)
    model = MyWan(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64).eval()
    controller = apply_rainfusion(model, RainFusion2Config())
    run(model, *inputs(frames=3, size=8, width=12), 900)
    assert controller.layout == VideoLayout(3, 4, 6) and len(controller.history) == 2
    remove_rainfusion(model)


def test_errors_for_unsupported_models_and_bad_arguments():
    supported = ("CogVideoXTransformer3DModel", "FluxTransformer2DModel", "HunyuanVideoTransformer3DModel",
                 "LTXVideoTransformer3DModel", "WanTransformer3DModel")
    with pytest.raises(ValueError, match=re.escape("does not support Linear; supported transformers (diffusers "
                                                   f"classes and their subclasses): {list(supported)}")):
        apply_rainfusion(torch.nn.Linear(2, 2), RainFusion2Config())
    impostor = type("WanTransformer3DModel", (torch.nn.Module,), {})()  # the name alone is not the class
    with pytest.raises(ValueError, match="does not support WanTransformer3DModel"):
        apply_rainfusion(impostor, RainFusion2Config())
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


@needs_pipeline
def test_wan22_pipeline_with_two_transformers_shares_one_step_count():
    """Wan2.2 A14B: the high-noise steps run ``transformer``, the rest ``transformer_2``. Both get
    rainfusion from one apply on the pipeline; the warm-up counts the generation's steps, not each
    transformer's; sparsity 0 reproduces the dense pipeline; remove restores both."""
    pipe = build_tiny_wan_pipeline(seed=4, boundary_ratio=0.7)
    which = []
    hooks = [t.register_forward_pre_hook(lambda m, a, k, i=i: which.append(i), with_kwargs=True)
             for i, t in enumerate((pipe.transformer, pipe.transformer_2))]

    def run():
        return pipe(prompt="a red car", num_frames=9, height=128, width=128, num_inference_steps=4,
                    guidance_scale=1.0, guidance_scale_2=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    dense = run()
    assert which == [0, 0, 1, 1]  # timesteps 1000, 858 on transformer; 602, 9 on transformer_2
    processors = [m.processor for t in (pipe.transformer, pipe.transformer_2) for m in (b.attn1 for b in t.blocks)]
    controller = apply_rainfusion(pipe, RainFusion2Config(sparsity=0.0, block_size=64, warmup_fraction=0.25))
    sparse = run()
    assert relative_l2(sparse, dense) < 2e-3  # 6e-4 measured: float32 sums in another order, over 4 steps
    assert controller.num_steps == 4
    # one dense warm-up step for the whole generation (not one per transformer)
    assert sorted({step for step, *_, stats in controller.history if stats.dense}) == [0]
    # steps 0-1 on transformer's layers 0-1; steps 2-3 on transformer_2's, numbered after them
    assert sorted({(step, layer) for step, _cfg, layer, _stats in controller.history}) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    remove_rainfusion(pipe)
    assert [m.processor for t in (pipe.transformer, pipe.transformer_2) for m in (b.attn1 for b in t.blocks)] == processors
    assert not pipe.transformer_2._diffusers_hook.hooks
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("per_token_timesteps", [False, True])
def test_wan_i2v_and_per_token_timesteps(per_token_timesteps):
    """Wan2.1 I2V (image tokens reach the cross-attention through added K/V projections; the
    self-attention stays video-only) and Wan2.2 TI2V's per-token timesteps (0 on the conditioning
    frame: the step is read from the largest)."""
    torch.manual_seed(2)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=8, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64, image_dim=24,
        added_kv_proj_dim=128,
    ).eval()
    g = torch.Generator().manual_seed(5)
    latents, text, image = torch.randn(1, 8, 5, 32, 32, generator=g), torch.randn(1, 12, 32, generator=g), \
        torch.randn(1, 7, 24, generator=g)
    tokens = 5 * 16 * 16

    def step(t):
        timestep = torch.full((1, tokens), float(t)) if per_token_timesteps else torch.tensor([t])
        if per_token_timesteps:
            timestep[:, : 16 * 16] = 0.0  # the conditioning first frame
        with torch.no_grad():
            return model(latents, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]

    dense = step(900)
    config = RainFusion2Config(sparsity=0.0, block_size=64, warmup_fraction=0.25)  # 1 dense step of 4
    controller = apply_rainfusion(model, config, num_steps=4)
    assert relative_l2(step(900), dense) < 1e-5
    for t in (700, 400):
        step(t)
    assert controller.step == 2 and controller.layout == VideoLayout(5, 16, 16)
    assert [stats.dense for step_, *_, stats in controller.history if step_ == 0] == [True, True]  # warm-up
    assert not any(stats.dense for step_, *_, stats in controller.history if step_ > 0)


def _refusal(backend: str) -> str:
    return rf"self-attention layer 0 dispatches to diffusers' attention backend '{backend}'.*use the 'native' backend"


def test_the_active_attention_backend_is_checked_at_forward():
    from diffusers import attention_backend

    model = tiny_wan()
    latents, text = inputs(frames=3, size=16)
    controller = apply_rainfusion(model, RainFusion2Config(warmup_fraction=0.0))
    with attention_backend("flex"), pytest.raises(ValueError, match=_refusal("flex")):
        run(model, latents, text, 500)
    with attention_backend("native"):  # diffusers' SDPA backend: rainfusion takes its calls
        run(model, latents, text, 500)
    assert _sparse_layers(controller) == {0, 1}


@pytest.mark.parametrize("backend", ["flex", "flash", "sage", "xformers"])
def test_a_layer_backend_rainfusion_cannot_see_is_refused_at_apply_and_at_forward(backend):
    model = tiny_wan()
    latents, text = inputs(frames=3, size=16)
    for block in model.blocks:  # what set_attention_backend(backend) writes, where the package is installed
        block.attn1.processor._attention_backend = backend
    with pytest.raises(ValueError, match=_refusal(backend)):
        apply_rainfusion(model, RainFusion2Config())
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks  # nothing installed
    for block in model.blocks:
        block.attn1.processor._attention_backend = None
    apply_rainfusion(model, RainFusion2Config())
    model.blocks[0].attn1.processor._attention_backend = backend  # changed after apply
    with pytest.raises(ValueError, match=_refusal(backend)):
        run(model, latents, text, 500)


def test_a_layer_whose_processor_makes_no_sdpa_call_is_said_to_run_dense(caplog):
    class ManualAttention:
        """Attention written out by hand: no F.scaled_dot_product_attention call to take over."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                       for proj in (attn.to_q, attn.to_k, attn.to_v))
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))

    model = tiny_wan()
    model.blocks[1].attn1.set_processor(ManualAttention())
    controller = apply_rainfusion(model, RainFusion2Config(warmup_fraction=0.0))
    with caplog.at_level("WARNING", logger="rainfusion"):
        run(model, *inputs(frames=3, size=16), 500)
    assert _sparse_layers(controller) == {0}
    assert "self-attention layer 1 made no scaled_dot_product_attention call (its processor ManualAttention" in caplog.text


def test_steps_come_from_the_cache_context_and_survive_a_heun_style_scheduler(monkeypatch):
    """Inside `cache_context(name, step_index=i, num_inference_steps=n)` the step is the pipeline's:
    two model calls per step at different timesteps (a second-order scheduler) stay one step, each
    context name is one CFG pass, the warm-up counts n steps, and no timestep is read on the host."""
    from rainfusion.integrations.diffusers import _model_hooks

    model = tiny_wan()
    latents, text = inputs(frames=3, size=16)
    controller = apply_rainfusion(model, RainFusion2Config(warmup_fraction=0.25))
    monkeypatch.setattr(_model_hooks, "_timestep", lambda arguments: pytest.fail("timestep read on the host"))
    timesteps = [900, 800, 700, 600, 500, 400, 300, 200]  # 4 steps, two evaluations each
    for call, t in enumerate(timesteps):
        for name in ("cond", "uncond"):
            with model.cache_context(name, step_index=call // 2, num_inference_steps=4):
                run(model, latents, text, t)
    steps = [(step, cfg) for step, cfg, layer, _ in controller.history if layer == 0]
    assert steps == [(s, c) for s in range(4) for _ in range(2) for c in (0, 1)]
    assert {step for step, _c, _l, stats in controller.history if stats.dense} == {0}  # ceil(0.25 * 4) = 1
    assert controller.num_steps == 4
    monkeypatch.undo()
    run(model, latents, text, 900)  # a plain call falls back to the timestep rule: a new generation
    assert controller.step == 0 and len(controller.history) == 2


@needs_pipeline
def test_a_pipeline_run_counts_its_steps_and_cfg_passes_from_its_cache_context():
    pipe = build_tiny_wan_pipeline(seed=5)
    controller = apply_rainfusion(pipe, RainFusion2Config(warmup_fraction=0.25))
    pipe(prompt="a red car", negative_prompt="snow", num_frames=9, height=128, width=128, num_inference_steps=4,
         guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert sorted({(step, cfg) for step, cfg, layer, _ in controller.history if layer == 0}) == [
        (s, c) for s in range(4) for c in (0, 1)]
    assert {step for step, _c, _l, stats in controller.history if stats.dense} == {0}
    remove_rainfusion(pipe)
