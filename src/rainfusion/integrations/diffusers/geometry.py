"""Per-model knowledge, and nothing else: the latent grid after patching, where text tokens sit
in joint attention, and which attention modules are self-attention over the video tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...layout import VideoLayout


class LayoutUnknown(ValueError):
    """A forward whose tokens do not form the grid rainfusion maps (e.g. LTX-Video conditioning
    tokens, Flux Kontext reference-image tokens): that forward's attention runs dense."""


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


def _raster_grid(coords: torch.Tensor) -> tuple[int, int, int] | None:
    """(frames, height, width) when ``coords`` [S, 3] (t, h, w) positions, in any scale, are a full
    grid in raster (t, h, w) order; None otherwise."""
    axes = [torch.unique(coords[:, axis], return_inverse=True) for axis in range(3)]
    (frames, t), (height, h), (width, w) = ((len(values), index) for values, index in axes)
    if frames * height * width != coords.shape[0]:
        return None
    if not torch.equal((t * height + h) * width + w, torch.arange(coords.shape[0], device=coords.device)):
        return None
    return frames, height, width


def _ltx_layout(model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """LTX-Video: latents arrive packed as tokens [B, N, C] (the pipeline patchifies them); the
    model's RoPE grid is ``num_frames x height x width`` in raster (t, h, w) order, or, when the
    caller gives ``video_coords`` [B, 3, N] (which then take precedence), the grid those span.
    Text only in cross-attention (attn2)."""
    coords = kwargs.get("video_coords", args[8] if len(args) > 8 else None)
    if coords is not None:
        found = _raster_grid(coords[0].transpose(0, 1).float())
        if found is None:
            raise LayoutUnknown("LTXVideoTransformer3DModel video_coords that do not span one full (t, h, w) "
                                "grid in raster order")
        return VideoLayout(*found)
    names = ("num_frames", "height", "width")
    grid = [kwargs.get(name, args[4 + i] if len(args) > 4 + i else None) for i, name in enumerate(names)]
    if any(size is None for size in grid):
        raise LayoutUnknown("LTXVideoTransformer3DModel called without num_frames, height and width "
                            "(or video_coords)")
    return VideoLayout(*(int(size) for size in grid))


def _flux_layout(model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """Flux: latents packed as tokens [B, N, C] with ``img_ids`` [N, 3] (or [B, N, 3]) giving each
    token's (index, row, column); joint attention with the text tokens before the image, in both
    the double-stream and the single-stream blocks. One image: a one-frame video."""
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    ids = kwargs["img_ids"] if "img_ids" in kwargs else args[4]
    ids = ids[0] if ids.ndim == 3 else ids
    found = _raster_grid(ids.float())
    if found is None:
        raise LayoutUnknown("FluxTransformer2DModel img_ids that do not span one full (row, column) grid in "
                            "raster order")
    return VideoLayout(*found, text_len=text.shape[1], text_position="before")


def _hunyuan_video_layout(model: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """HunyuanVideo: latents [B, C, T, H, W] patched by (p_t, p, p); joint attention over
    [video, text] (text after the video, padded at its end: the model passes a key mask)."""
    _, _, frames, height, width = _hidden_states(args, kwargs).shape
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
    p, p_t = model.config.patch_size, model.config.patch_size_t
    return VideoLayout(frames // p_t, height // p, width // p, text_len=text.shape[1], text_position="after")


def _double_then_single_stream(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The joint attention of the double-stream blocks, then of the single-stream blocks."""
    return [block.attn for block in model.transformer_blocks] + [block.attn for block in model.single_transformer_blocks]


GEOMETRIES: dict[str, ModelGeometry] = {
    # forward(hidden_states, timestep, encoder_hidden_states, ...)
    "WanTransformer3DModel": ModelGeometry(_wan_layout, lambda model: [block.attn1 for block in model.blocks], 1),
    # forward(hidden_states, encoder_hidden_states, timestep, ...)
    "CogVideoXTransformer3DModel": ModelGeometry(
        _cogvideox_layout, lambda model: [block.attn1 for block in model.transformer_blocks], 2),
    # forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, ...); double-stream
    # then single-stream blocks, all over [video, text]
    "HunyuanVideoTransformer3DModel": ModelGeometry(_hunyuan_video_layout, _double_then_single_stream, 1),
    # forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames, ...);
    # attn2 is cross-attention to the text
    "LTXVideoTransformer3DModel": ModelGeometry(
        _ltx_layout, lambda model: [block.attn1 for block in model.transformer_blocks], 2),
    # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, ...);
    # double-stream blocks then single-stream blocks, all over [text, image]
    "FluxTransformer2DModel": ModelGeometry(_flux_layout, _double_then_single_stream, 3),
}


def geometry_of(model: torch.nn.Module) -> ModelGeometry:
    """The geometry of a supported transformer; ``ValueError`` listing the supported classes."""
    name = type(model).__name__
    if name not in GEOMETRIES:
        raise ValueError(f"rainfusion does not support {name}; supported transformers: {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]
