"""Per-model knowledge, and nothing else: the latent grid after patching, where text tokens sit
in joint attention, and which attention modules are self-attention over the video tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...layout import VideoLayout


@dataclass(frozen=True)
class ModelGeometry:
    """How to read one transformer class.

    layout: (transformer, forward args, forward kwargs) -> VideoLayout of its self-attention.
    self_attention: transformer -> the attention modules over video tokens, in layer order.
    timestep_position: index of ``timestep`` among the forward's positional arguments.
    """

    layout: Callable[[torch.nn.Module, tuple, dict], VideoLayout]
    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]
    timestep_position: int


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _wan_layout(model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """Wan: latents [B, C, T, H, W] patched by (p_t, p_h, p_w); text only in cross-attention."""
    _, _, frames, height, width = _hidden_states(args, kwargs).shape
    p_t, p_h, p_w = model.config.patch_size
    return VideoLayout(frames // p_t, height // p_h, width // p_w)


def _cogvideox_layout(model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """CogVideoX: latents [B, F, C, H, W] patched by (p_t or 1, p, p); joint attention with the
    text tokens before the video."""
    _, frames, _, height, width = _hidden_states(args, kwargs).shape
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    return VideoLayout(frames // p_t, height // p, width // p, text_len=text.shape[1], text_position="before")


GEOMETRIES: dict[str, ModelGeometry] = {
    # forward(hidden_states, timestep, encoder_hidden_states, ...)
    "WanTransformer3DModel": ModelGeometry(_wan_layout, lambda model: [block.attn1 for block in model.blocks], 1),
    # forward(hidden_states, encoder_hidden_states, timestep, ...)
    "CogVideoXTransformer3DModel": ModelGeometry(
        _cogvideox_layout, lambda model: [block.attn1 for block in model.transformer_blocks], 2),
}


def geometry_of(model: torch.nn.Module) -> ModelGeometry:
    """The geometry of a supported transformer; ``ValueError`` listing the supported classes."""
    name = type(model).__name__
    if name not in GEOMETRIES:
        raise ValueError(f"rainfusion does not support {name}; supported transformers: {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]
