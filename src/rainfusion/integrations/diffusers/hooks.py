"""Instance-scoped state and the interception: the controller (layout, step, CFG pass, per-layer
states, history), one ``AttentionSite`` per managed self-attention layer, and the
``TorchFunctionMode`` that sends the ``F.scaled_dot_product_attention`` call of the layer running
now to ``sparse_attention``. The hooks (``_model_hooks``) feed the controller, activate the mode
for the transformer's forward and mark which layer runs; no class, module or processor is
replaced."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...attention import sparse_attention
from ..._logging import log_once
from ..._validation import check_scale
from ...backends import dense_attention
from ...config import AnyConfig
from ...layout import VideoLayout
from ...steps import AttentionState, AttentionStats


@dataclass
class RainFusionController:
    """What one ``apply_rainfusion`` installed, and the run's context and statistics.

    models: the transformers it was applied to (a pipeline's ``transformer`` and ``transformer_2``).
    num_steps: denoising steps of a generation (for the dense warm-up); read from the pipeline's
        scheduler when applied to a pipeline, else given by the user.
    """

    models: list[torch.nn.Module]
    config: AnyConfig
    num_steps: int | None
    scheduler: object | None = None
    layout: VideoLayout | None = None
    step: int = -1
    call_in_step: int = 0
    states: dict[tuple[int, int], AttentionState] = field(default_factory=dict)
    history: list[tuple[int, int, int, AttentionStats]] = field(default_factory=list)
    _last_timestep: float | None = None
    _context_step: int | None = None
    _passes: dict[str, int] = field(default_factory=dict)  # CFG pass of each cache-context name in the step
    _padding: tuple[torch.Tensor, torch.Tensor | None] | None = None
    interceptor: _AttentionInterceptor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.interceptor = _AttentionInterceptor()

    def begin_forward(self, layout: VideoLayout | None, timestep: float) -> None:
        """Called before each transformer forward: a new timestep is a new step, a higher one
        (or a new layout) a new generation; calls at the same timestep are CFG passes. A None
        layout (tokens rainfusion cannot map) makes the forward's attention dense."""
        new_generation = (self._last_timestep is None or timestep > self._last_timestep or layout != self.layout)
        if new_generation:
            self.step, self.states, self.history = 0, {}, []
            if self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
                self.num_steps = len(self.scheduler.timesteps)
        elif timestep != self._last_timestep:
            self.step += 1
        self.call_in_step = 0 if new_generation or timestep != self._last_timestep else self.call_in_step + 1
        self.layout, self._last_timestep, self._context_step, self._padding = layout, timestep, None, None

    def begin_context_forward(self, layout: VideoLayout | None, step: int, num_steps: int | None,
                              name: str) -> None:
        """Called before a transformer forward inside a pipeline's ``cache_context(name,
        step_index=..., num_inference_steps=...)``: the step and the step count are the pipeline's
        (a scheduler that calls the model twice per step, Heun-style, stays one step); a lower step
        index than the last, or a new layout, starts a new generation; each context name ("cond",
        "uncond") is a CFG pass, numbered in order of first use within the step."""
        new_generation = self._context_step is None or step < self._context_step or layout != self.layout
        if new_generation:
            self.states, self.history = {}, []
        if new_generation or step != self._context_step:
            self._passes = {}
        if num_steps is not None:
            self.num_steps = num_steps
        elif new_generation and self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            self.num_steps = len(self.scheduler.timesteps)
        self.step, self.call_in_step = step, self._passes.setdefault(name, len(self._passes))
        self.layout, self._context_step, self._last_timestep, self._padding = layout, step, None, None

    def key_padding(self, attn_mask: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """int32 [B] valid key counts when ``attn_mask`` is a boolean key padding of the trailing
        text ([B, 1, 1, N], True = keep, the kept keys a prefix: HunyuanVideo's), else None.
        Checked once per forward (the model passes one mask tensor to every layer)."""
        if self._padding is not None and self._padding[0] is attn_mask:
            return self._padding[1]
        valid = None
        n = key.shape[2]
        layout = self.layout
        if (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[1:3] == (1, 1)
                and attn_mask.shape[3] == n and layout is not None and layout.text_position == "after"):
            counts = attn_mask.flatten(1).sum(-1)
            prefix = torch.arange(n, device=attn_mask.device) < counts[:, None]
            first_text = layout.text_start
            if torch.equal(prefix, attn_mask.flatten(1)) and bool((counts >= first_text).all()):
                valid = counts.to(torch.int32)
        self._padding = (attn_mask, valid)
        return valid

    def state_for(self, layer: int) -> AttentionState:
        state = self.states.setdefault((layer, self.call_in_step), AttentionState(num_steps=self.num_steps))
        state.num_steps, state.step = self.num_steps, self.step
        return state


class AttentionSite:
    """One managed self-attention layer: its controller, its index across the controller's
    transformers, whether it stays dense (skip_layers), and ``index``, a CPU int64 scalar naming
    it in the site registry. Under torch.compile the layer's attention is the opaque op
    ``rainfusion::diffusers_self_attention`` with ``index`` as a graph input (data, not a
    constant: one graph serves every layer and every step). A copy (``copy.deepcopy`` of the
    model) is a new site. ``called``: whether the layer's last forward made an SDPA call."""

    def __init__(self, controller: RainFusionController, layer: int, dense: bool):
        self.controller, self.layer, self.dense = controller, layer, dense
        self.called = False
        self._register()

    def _register(self) -> None:
        number = next(_SITE_NUMBERS)
        _SITES[number] = self
        self.index = torch.tensor(number, dtype=torch.int64)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """The layer's attention for a plain SDPA call (no dropout, causality or GQA; ``attn_mask``
        None or a boolean trailing-text key padding): sparse, or dense on warm-up steps, for
        skip_layers and for forwards rainfusion cannot map; a general mask runs SDPA."""
        c = self.controller
        kv_valid_len = None if attn_mask is None else c.key_padding(attn_mask, key)
        if attn_mask is not None and kv_valid_len is None:
            log_once("rainfusion: an attention call with a general mask runs dense (SDPA)")
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        if (c.layout is None or self.dense or query.shape[2] != c.layout.num_tokens
                or key.shape[2] != c.layout.num_tokens):
            return dense_attention(query, key, value, check_scale(scale, query.shape[-1]), kv_valid_len)[0]
        state = c.state_for(self.layer)
        out = sparse_attention(query, key, value, layout=c.layout, config=c.config, state=state, scale=scale,
                               kv_valid_len=kv_valid_len)
        c.history.append((c.step, c.call_in_step, self.layer, state.stats))
        return out


_SITES: weakref.WeakValueDictionary[int, AttentionSite] = weakref.WeakValueDictionary()
_SITE_NUMBERS = itertools.count()


def _output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An empty SDPA output [B, H, Nq, Dv] laid out as the query (as SDPA lays it out)."""
    shape = (*query.shape[:-1], value.shape[-1])
    return torch.empty_like(query) if shape == tuple(query.shape) else query.new_empty(shape)


# cudagraph_unsafe: the op decides on the host at every call (warm-up, mask refresh), so Inductor
# must keep it out of CUDA graphs (mode="reduce-overhead"), where a replay would skip those decisions
# (older torch releases lack the tag; there, do not combine rainfusion with reduce-overhead)
_OP_TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("rainfusion::diffusers_self_attention", mutates_args=(), **_OP_TAGS)
def _site_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                    site: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``AttentionSite.attention`` of the site numbered ``site``, the output in the query's
    layout (what the compiled graph was traced with)."""
    out = _SITES[int(site)].attention(query, key, value, attn_mask, scale)
    want = _output_like(query, value)
    if out.stride() == want.stride():
        return out
    return want.copy_(out)


@_site_attention.register_fake
def _(query, key, value, attn_mask, site, scale):
    return _output_like(query, value)


class _AttentionInterceptor(TorchFunctionMode):
    """Active during a transformer's forward: routes ``F.scaled_dot_product_attention`` calls made
    while a managed self-attention layer runs (``site``, set by the layer's hooks) to that layer,
    through ``site.attention`` when eager (differentiable on the portable backend) or the opaque
    op when Dynamo traces it; every other call (cross-attention, text refiners) passes through.
    Calls with dropout, causality or GQA run SDPA."""

    def __init__(self):
        super().__init__()
        self.site: AttentionSite | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.site is not None:
            self.site.called = True
            return _route(self.site, *args, **kwargs)
        if func is torch.Tensor.unflatten and torch.compiler.is_compiling():
            # Dynamo cannot trace Tensor.unflatten's super() call from inside a mode (Wan's
            # processors use it); torch.unflatten is the same operation
            func = torch.unflatten
        return func(*args, **kwargs)


def _route(site: AttentionSite, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False):
    """One SDPA call of ``site``'s layer (SDPA's arguments): to rainfusion, or SDPA itself."""
    if is_causal or dropout_p != 0 or enable_gqa:
        log_once("rainfusion: an attention call with causality, dropout or GQA runs dense (SDPA)")
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.compiler.is_compiling():
        return torch.ops.rainfusion.diffusers_self_attention(query, key, value, attn_mask, site.index, scale)
    return site.attention(query, key, value, attn_mask, scale)
