"""``apply_rainfusion`` / ``remove_rainfusion`` for diffusers transformers and pipelines."""

from __future__ import annotations

import torch

from ...config import AnyConfig, RainFusion2Config, RainFusionConfig
from .geometry import GEOMETRIES, geometry_of
from .hooks import AttentionSite, RainFusionController


def _transformers_of(model_or_pipeline: object) -> tuple[list[torch.nn.Module], object | None]:
    """([transformer, transformer_2 if any], scheduler or None) of a transformer or a pipeline.
    Wan2.2 A14B pipelines denoise their low-noise steps with a second transformer."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return [model_or_pipeline], None
    transformer = getattr(model_or_pipeline, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"model_or_pipeline must be a diffusers transformer or a pipeline with a .transformer, got "
            f"{type(model_or_pipeline).__name__}"
        )
    second = getattr(model_or_pipeline, "transformer_2", None)
    transformers = [transformer] + ([second] if isinstance(second, torch.nn.Module) else [])
    return transformers, getattr(model_or_pipeline, "scheduler", None)


def apply_rainfusion(model_or_pipeline: object, config: AnyConfig, *, num_steps: int | None = None,
                     skip_layers: tuple[int, ...] = ()) -> RainFusionController:
    """Turn sparse attention on for one transformer instance, or for a pipeline's transformer(s).

    config: RainFusionConfig (v1) or RainFusion2Config (v2); its warm-up fraction and refresh
        interval apply per generation. num_steps: denoising steps (read from the pipeline's
        scheduler when a pipeline is given). skip_layers: self-attention layers kept dense (in
        each transformer). A pipeline with a ``transformer_2`` (Wan2.2 A14B) gets both, with one
        step count across them; in ``history`` the layers of ``transformer_2`` follow those of
        ``transformer``. Returns the controller, whose ``history`` holds (step, CFG pass, layer,
        stats) of the last generation. Exactly reversible with ``remove_rainfusion``.
    """
    if not isinstance(config, (RainFusionConfig, RainFusion2Config)):
        raise TypeError(f"config must be a RainFusionConfig or RainFusion2Config, got {type(config).__name__}")
    transformers, scheduler = _transformers_of(model_or_pipeline)
    geometries = [geometry_of(transformer) for transformer in transformers]
    from ._model_hooks import TransformerHook, attach, check_backend, register, registered

    if any(registered(transformer) is not None for transformer in transformers):
        raise ValueError("rainfusion is already applied to this transformer; call remove_rainfusion first")
    modules = [geometry.self_attention(transformer) for transformer, geometry in zip(transformers, geometries)]
    fewest = min(len(layers) for layers in modules)
    bad = sorted(i for i in skip_layers if not 0 <= i < fewest)
    if bad:
        raise ValueError(f"skip_layers must be in [0, {fewest}), got {bad}")
    for layer, module in enumerate(module for layers in modules for module in layers):
        check_backend(module, layer)  # before any hook goes in: a refusal leaves the model as it was
    controller = RainFusionController(transformers, config, num_steps, scheduler)
    first_layer = 0
    for transformer, geometry, layers in zip(transformers, geometries, modules):
        register(transformer, TransformerHook(controller, geometry))
        for layer, module in enumerate(layers):
            site = AttentionSite(controller, first_layer + layer, dense=layer in skip_layers)
            attach(module, site)
        first_layer += len(layers)
    return controller


def remove_rainfusion(model_or_pipeline: object) -> None:
    """Undo ``apply_rainfusion``: its hooks leave every transformer it was applied to and their
    self-attention modules (the processors were never touched)."""
    from ._model_hooks import registered, unregister

    transformers, _ = _transformers_of(model_or_pipeline)
    hook = registered(transformers[0])
    if hook is None:
        raise ValueError("rainfusion is not applied to this transformer")
    for transformer in hook.controller.models:
        unregister(transformer)


__all__ = ["GEOMETRIES", "RainFusionController", "apply_rainfusion", "remove_rainfusion"]
