"""``apply_rainfusion`` / ``remove_rainfusion`` for diffusers transformers and pipelines."""

from __future__ import annotations

import torch

from ...config import AnyConfig, RainFusion2Config, RainFusionConfig
from .geometry import GEOMETRIES, geometry_of
from .hooks import RainFusionController, _InterceptingProcessor

_ATTRIBUTE = "_rainfusion_controller"


def _transformer_of(model_or_pipeline: object) -> tuple[torch.nn.Module, object | None]:
    """(transformer, scheduler or None) of a transformer or a pipeline holding one."""
    if isinstance(model_or_pipeline, torch.nn.Module):
        return model_or_pipeline, None
    transformer = getattr(model_or_pipeline, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"model_or_pipeline must be a diffusers transformer or a pipeline with a .transformer, got "
            f"{type(model_or_pipeline).__name__}"
        )
    return transformer, getattr(model_or_pipeline, "scheduler", None)


def _timestep(args: tuple, kwargs: dict, position: int) -> float:
    timestep = kwargs.get("timestep", args[position] if len(args) > position else None)
    if timestep is None:
        raise ValueError("the transformer was called without a timestep; rainfusion needs it to count steps")
    return float(torch.as_tensor(timestep).flatten()[0])


def apply_rainfusion(model_or_pipeline: object, config: AnyConfig, *, num_steps: int | None = None,
                     skip_layers: tuple[int, ...] = ()) -> RainFusionController:
    """Turn sparse attention on for one transformer instance (or a pipeline's transformer).

    config: RainFusionConfig (v1) or RainFusion2Config (v2); its warm-up fraction and refresh
        interval apply per generation. num_steps: denoising steps (read from the pipeline's
        scheduler when a pipeline is given). skip_layers: self-attention layers kept dense.
    Returns the controller, whose ``history`` holds (step, CFG pass, layer, stats) of the last
    generation. Exactly reversible with ``remove_rainfusion``.
    """
    if not isinstance(config, (RainFusionConfig, RainFusion2Config)):
        raise TypeError(f"config must be a RainFusionConfig or RainFusion2Config, got {type(config).__name__}")
    transformer, scheduler = _transformer_of(model_or_pipeline)
    geometry = geometry_of(transformer)
    if getattr(transformer, _ATTRIBUTE, None) is not None:
        raise ValueError("rainfusion is already applied to this transformer; call remove_rainfusion first")
    modules = geometry.self_attention(transformer)
    bad = sorted(i for i in skip_layers if not 0 <= i < len(modules))
    if bad:
        raise ValueError(f"skip_layers must be in [0, {len(modules)}), got {bad}")
    controller = RainFusionController(transformer, config, num_steps, frozenset(skip_layers), scheduler)

    def before_forward(module, args, kwargs):
        controller.begin_forward(geometry.layout(module, args, kwargs),
                                 _timestep(args, kwargs, geometry.timestep_position))

    controller._hook = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)
    for layer, module in enumerate(modules):
        controller._originals.append((module, module.processor))
        module.processor = _InterceptingProcessor(module.processor, controller, layer)
    setattr(transformer, _ATTRIBUTE, controller)
    return controller


def remove_rainfusion(model_or_pipeline: object) -> None:
    """Undo ``apply_rainfusion``: the original processors and no hook."""
    transformer, _ = _transformer_of(model_or_pipeline)
    controller = getattr(transformer, _ATTRIBUTE, None)
    if controller is None:
        raise ValueError("rainfusion is not applied to this transformer")
    controller._hook.remove()
    for module, processor in controller._originals:
        module.processor = processor
    delattr(transformer, _ATTRIBUTE)


__all__ = ["GEOMETRIES", "RainFusionController", "apply_rainfusion", "remove_rainfusion"]
