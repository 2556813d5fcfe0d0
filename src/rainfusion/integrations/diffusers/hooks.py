"""Instance-scoped state and the interception: the controller (layout, step, CFG pass, per-layer
states, history) and the ``TorchFunctionMode`` that sends a self-attention module's
``F.scaled_dot_product_attention`` call to ``sparse_attention``. diffusers' hooks
(``_model_hooks``) feed the controller and activate the mode; no class, module or processor is
replaced."""

from __future__ import annotations

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


class _AttentionInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to rainfusion for one self-attention layer."""

    def __init__(self, controller: RainFusionController, layer: int, dense: bool):
        super().__init__()
        self.controller, self.layer, self.dense = controller, layer, dense
        self.calls = 0  # SDPA calls received while active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return self._attention(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        c = self.controller
        kv_valid_len = None if attn_mask is None else c.key_padding(attn_mask, key)
        plain = (attn_mask is None or kv_valid_len is not None) and not is_causal and dropout_p == 0 and not enable_gqa
        if not plain:
            log_once("rainfusion: an attention call with a general mask, causality or dropout runs dense (SDPA)")
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if (c.layout is None or self.dense or query.shape[2] != c.layout.num_tokens
                or key.shape[2] != c.layout.num_tokens):
            return dense_attention(query, key, value, check_scale(scale, query.shape[-1]), kv_valid_len)[0]
        state = c.state_for(self.layer)
        out = sparse_attention(query, key, value, layout=c.layout, config=c.config, state=state, scale=scale,
                               kv_valid_len=kv_valid_len)
        c.history.append((c.step, c.call_in_step, self.layer, state.stats))
        return out
