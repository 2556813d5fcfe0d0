"""The hooks that carry rainfusion (imported with diffusers, on apply).

``TransformerHook``, a diffusers ``ModelHook`` on the transformer, reads each forward's layout
and step before it runs and runs the forward with the interception of
``F.scaled_dot_product_attention`` active. Each managed self-attention module gets a torch
forward pre-hook and forward hook that mark it as the layer running (its processor untouched).
Why torch's module hooks there rather than diffusers' registry: the registry replaces a module's
``forward`` by a ``functools.partial``, which Dynamo guards by identity, so with one on every
attention module ``compile_repeated_blocks()`` would compile each block anew (and stop with
"recompile limit exceeded" after 8 under ``fullgraph=True``, as it does for any diffusers hook on a
block's submodule); module hooks are guarded by structure, and one graph serves every block.
"""

from __future__ import annotations

import functools

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from ..._logging import log_once
from .geometry import LayoutUnknown, ModelGeometry, forward_arguments
from .hooks import AttentionSite, RainFusionController

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
    # a member or its string value (no Enum construction: torch 2.11's Dynamo cannot trace it)
    return backend.value if isinstance(backend, AttentionBackendName) else str(backend)


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
    forward's timestep. The forward runs with the controller's interceptor active."""

    _is_stateful = True

    def __init__(self, controller: RainFusionController, geometry: ModelGeometry):
        super().__init__()
        self.controller, self.geometry = controller, geometry
        self.state_manager = StateManager(_NoState)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.transformer = module
        return module

    @torch.compiler.disable  # host-side bookkeeping: under torch.compile one graph break, no guard on the step
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if module is not self.transformer:
            # diffusers' registry chains hooks in closures that copy.deepcopy shares: a copy's
            # forward would run the original's modules (the original's weights, its state)
            raise ValueError(
                "this transformer is a copy.deepcopy of one rainfusion was applied to, and diffusers' hooks do not "
                "survive deepcopy (the copy's forward would run the original model); call remove_rainfusion(copy) "
                "and apply_rainfusion(copy, config), or copy the model before applying rainfusion"
            )
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
        self.controller.interceptor.site = None
        return args, kwargs

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        with self.controller.interceptor:
            return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def _enter_layer(site: AttentionSite, module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a managed self-attention module: check its backend, mark it running."""
    check_backend(module, site.layer)
    site.called = False
    site.controller.interceptor.site = site


def _leave_layer(site: AttentionSite, module: torch.nn.Module, args: tuple, output: object) -> None:
    """Forward hook of a managed self-attention module: unmark it; say if it made no SDPA call."""
    site.controller.interceptor.site = None
    if not site.called:
        _said_no_call(module, site)


@torch.compiler.disable
def _said_no_call(module: torch.nn.Module, site: AttentionSite) -> None:
    """Log once that a sparse-eligible layer's forward made no SDPA call (it ran dense)."""
    if not site.dense and site.controller.layout is not None:
        log_once(f"rainfusion: self-attention layer {site.layer} made no scaled_dot_product_attention call "
                 f"(its processor {type(module.processor).__name__} computes attention another way): it ran dense")


def register(transformer: torch.nn.Module, hook: TransformerHook) -> None:
    """Add ``hook`` to the transformer's diffusers hook registry under rainfusion's name."""
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)


def attach(module: torch.nn.Module, site: AttentionSite) -> None:
    """Mark ``module`` (a self-attention module) as ``site`` while its forward runs."""
    module.register_forward_pre_hook(functools.partial(_enter_layer, site))
    module.register_forward_hook(functools.partial(_leave_layer, site))


def registered(transformer: torch.nn.Module) -> TransformerHook | None:
    """The rainfusion hook of ``transformer``, or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def unregister(transformer: torch.nn.Module) -> None:
    """Remove rainfusion's hooks from ``transformer`` and its modules (a deep copy's too: ours are
    found by their function, in torch's hook dicts, not by handles kept from the original)."""
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=True)
    for module in transformer.modules():
        for hooks, ours in ((module._forward_pre_hooks, _enter_layer), (module._forward_hooks, _leave_layer)):
            for key in [key for key, hook in hooks.items() if getattr(hook, "func", None) is ours]:
                del hooks[key]
