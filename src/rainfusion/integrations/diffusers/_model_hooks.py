"""The two diffusers ``ModelHook``s that carry rainfusion (imported with diffusers, on apply).

``TransformerHook`` on the transformer reads each forward's layout and timestep before it runs;
``SelfAttentionHook`` on each self-attention module runs the module's own forward (its processor
untouched) with the interception of ``F.scaled_dot_product_attention`` active.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..._logging import log_once
from .geometry import LayoutUnknown, ModelGeometry, forward_arguments
from .hooks import RainFusionController, _AttentionInterceptor

HOOK_NAME = "rainfusion"


def _timestep(arguments: dict) -> float:
    """The step's noise level: the largest entry of the forward's ``timestep`` (Wan2.2 TI2V passes
    per-token timesteps, 0 on the conditioning frame)."""
    timestep = arguments.get("timestep")
    if timestep is None:
        raise ValueError("the transformer was called without a timestep; rainfusion needs it to count steps")
    return float(torch.as_tensor(timestep).max())


class TransformerHook(ModelHook):
    """Before each transformer forward: its layout (None, so dense, when its tokens are not a grid
    rainfusion maps) and the step's timestep, from the arguments bound by name."""

    def __init__(self, controller: RainFusionController, geometry: ModelGeometry):
        super().__init__()
        self.controller, self.geometry = controller, geometry

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        arguments = forward_arguments(module, args, kwargs)
        try:
            layout = self.geometry.layout(module, arguments)
        except LayoutUnknown as unknown:
            log_once(f"rainfusion: {unknown}; attention of such forwards runs dense")
            layout = None
        self.controller.begin_forward(layout, _timestep(arguments))
        return args, kwargs


class SelfAttentionHook(ModelHook):
    """Runs one self-attention module's forward with its SDPA call routed to rainfusion; ``layer``
    numbers it across the controller's transformers, ``dense`` keeps it dense (skip_layers)."""

    def __init__(self, controller: RainFusionController, layer: int, dense: bool):
        super().__init__()
        self.controller, self.layer, self.dense = controller, layer, dense

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        with _AttentionInterceptor(self.controller, self.layer, self.dense):
            return self.fn_ref.original_forward(*args, **kwargs)


def register(module: torch.nn.Module, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)


def registered(module: torch.nn.Module) -> ModelHook | None:
    """The rainfusion hook of ``module``, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def unregister(module: torch.nn.Module) -> None:
    module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
