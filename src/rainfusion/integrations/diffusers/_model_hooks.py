"""The two diffusers ``ModelHook``s that carry rainfusion (imported with diffusers, on apply).

``TransformerHook`` on the transformer reads each forward's layout and timestep before it runs;
``SelfAttentionHook`` on each self-attention module runs the module's own forward (its processor
untouched) with the interception of ``F.scaled_dot_product_attention`` active.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from ..._logging import log_once
from .geometry import LayoutUnknown, ModelGeometry, forward_arguments
from .hooks import RainFusionController, _AttentionInterceptor

HOOK_NAME = "rainfusion"
# diffusers' attention backends that call torch's scaled_dot_product_attention: the calls
# rainfusion receives (the others call their own kernels, which it cannot see)
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def effective_backend(module: torch.nn.Module) -> str | None:
    """The diffusers attention backend ``module``'s processor dispatches to now: its own
    (``set_attention_backend``), else the active one (``attention_backend()``,
    ``DIFFUSERS_ATTN_BACKEND``); None for a processor that calls torch directly (no dispatch)."""
    if not hasattr(module.processor, "_attention_backend"):
        return None
    backend = module.processor._attention_backend or _AttentionBackendRegistry._active_backend
    return AttentionBackendName(backend).value


def check_backend(module: torch.nn.Module, layer: int) -> None:
    """``ValueError`` when the layer's attention would not reach rainfusion whole (it would run
    dense without a word, or on key shards): another kernel backend, or ring context parallelism.
    Ulysses is fine: each rank attends over the full sequence for its heads."""
    context_parallel = getattr(getattr(module.processor, "_parallel_config", None), "context_parallel_config", None)
    if context_parallel is not None and (context_parallel.ring_degree or 1) > 1:
        raise ValueError(
            f"self-attention layer {layer} runs ring context parallelism (ring_degree="
            f"{context_parallel.ring_degree}): each rank would see a shard of the keys, and rainfusion predicts masks "
            "over the whole sequence; use Ulysses (ContextParallelConfig(ulysses_degree=...)), whose ranks attend "
            "over the full sequence for their heads"
        )
    name = effective_backend(module)
    if name is not None and name not in SDPA_BACKENDS:
        raise ValueError(
            f"self-attention layer {layer} dispatches to diffusers' attention backend {name!r}, whose kernel "
            f"rainfusion cannot take over (it takes the calls of torch's scaled_dot_product_attention: backends "
            f"{', '.join(SDPA_BACKENDS)}); with rainfusion use the 'native' backend (set_attention_backend('native'), "
            f"no attention_backend() context, DIFFUSERS_ATTN_BACKEND unset), or remove_rainfusion to run {name!r}"
        )


def _timestep(arguments: dict) -> float:
    """The step's noise level: the largest entry of the forward's ``timestep`` (Wan2.2 TI2V passes
    per-token timesteps, 0 on the conditioning frame)."""
    timestep = arguments.get("timestep")
    if timestep is None:
        raise ValueError("the transformer was called without a timestep; rainfusion needs it to count steps")
    return float(torch.as_tensor(timestep).max())


class _NoState(BaseState):
    """The controller keeps rainfusion's state; the StateManager is only how diffusers hands a
    stateful hook the pipeline's cache context."""

    def reset(self, *args, **kwargs) -> None:
        pass


class TransformerHook(ModelHook):
    """Before each transformer forward: its layout (None, so dense, when its tokens are not a grid
    rainfusion maps) and the step, from the pipeline's cache context (``cache_context(name,
    step_index=..., num_inference_steps=...)``, no host read) when it gives one, else from the
    forward's timestep."""

    _is_stateful = True

    def __init__(self, controller: RainFusionController, geometry: ModelGeometry):
        super().__init__()
        self.controller, self.geometry = controller, geometry
        self.state_manager = StateManager(_NoState)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        arguments = forward_arguments(module, args, kwargs)
        try:
            layout = self.geometry.layout(module, arguments)
        except LayoutUnknown as unknown:
            log_once(f"rainfusion: {unknown}; attention of such forwards runs dense")
            layout = None
        context = self.state_manager._context
        if context is not None and context.step_index is not None:
            self.controller.begin_context_forward(layout, context.step_index, context.num_inference_steps,
                                                  context.name)
        else:
            self.controller.begin_forward(layout, _timestep(arguments))
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class SelfAttentionHook(ModelHook):
    """Runs one self-attention module's forward with its SDPA call routed to rainfusion; ``layer``
    numbers it across the controller's transformers, ``dense`` keeps it dense (skip_layers)."""

    def __init__(self, controller: RainFusionController, layer: int, dense: bool):
        super().__init__()
        self.controller, self.layer, self.dense = controller, layer, dense

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        check_backend(module, self.layer)
        interceptor = _AttentionInterceptor(self.controller, self.layer, self.dense)
        with interceptor:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0 and not self.dense and self.controller.layout is not None:
            log_once(f"rainfusion: self-attention layer {self.layer} made no scaled_dot_product_attention call "
                     f"(its processor {type(module.processor).__name__} computes attention another way): it ran dense")
        return output


def register(module: torch.nn.Module, hook: ModelHook) -> None:
    """Add ``hook`` to ``module``'s diffusers hook registry under rainfusion's name."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)


def registered(module: torch.nn.Module) -> ModelHook | None:
    """The rainfusion hook of ``module``, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def unregister(transformer: torch.nn.Module) -> None:
    """Remove the rainfusion hooks of ``transformer`` and of its submodules (the registry recurses)."""
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=True)
