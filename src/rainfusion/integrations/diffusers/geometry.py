"""Per-model knowledge, and nothing else: the latent grid after patching, where text tokens sit
in joint attention, and which attention modules are self-attention over the video tokens."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ...layout import VideoLayout


class LayoutUnknown(ValueError):
    """A forward whose tokens do not form the grid rainfusion maps (e.g. LTX-Video conditioning
    tokens, Flux Kontext reference-image tokens): that forward's attention runs dense."""


@dataclass(frozen=True)
class ModelGeometry:
    """How to read one transformer class.

    layout: (transformer, its forward's arguments by name) -> VideoLayout of its self-attention.
    self_attention: transformer -> the attention modules over video tokens, in layer order.
    """

    layout: Callable[[torch.nn.Module, dict], VideoLayout]
    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]


@lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def forward_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of one ``model.forward`` call by parameter name (positional ones bound by the
    forward's signature, not by position; defaults left out)."""
    return _forward_signature(type(model)).bind_partial(model, *args, **kwargs).arguments


def _wan_layout(model: torch.nn.Module, arguments: dict) -> VideoLayout:
    """Wan: latents [B, C, T, H, W] patched by (p_t, p_h, p_w); text only in cross-attention."""
    _, _, frames, height, width = arguments["hidden_states"].shape
    p_t, p_h, p_w = model.config.patch_size
    return VideoLayout(frames // p_t, height // p_h, width // p_w)


def _cogvideox_layout(model: torch.nn.Module, arguments: dict) -> VideoLayout:
    """CogVideoX: latents [B, F, C, H, W] patched by (p_t or 1, p, p); joint attention with the
    text tokens before the video."""
    _, frames, _, height, width = arguments["hidden_states"].shape
    text = arguments["encoder_hidden_states"]
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


def _ltx_layout(model: torch.nn.Module, arguments: dict) -> VideoLayout:
    """LTX-Video: latents arrive packed as tokens [B, N, C] (the pipeline patchifies them); the
    model's RoPE grid is ``num_frames x height x width`` in raster (t, h, w) order, or, when the
    caller gives ``video_coords`` [B, 3, N] (which then take precedence), the grid those span.
    Text only in cross-attention (attn2)."""
    coords = arguments.get("video_coords")
    if coords is not None:
        found = _raster_grid(coords[0].transpose(0, 1).float())
        if found is None:
            raise LayoutUnknown("LTXVideoTransformer3DModel video_coords that do not span one full (t, h, w) "
                                "grid in raster order")
        return VideoLayout(*found)
    grid = [arguments.get(name) for name in ("num_frames", "height", "width")]
    if any(size is None for size in grid):
        raise LayoutUnknown("LTXVideoTransformer3DModel called without num_frames, height and width "
                            "(or video_coords)")
    return VideoLayout(*(int(size) for size in grid))


def _flux_layout(model: torch.nn.Module, arguments: dict) -> VideoLayout:
    """Flux: latents packed as tokens [B, N, C] with ``img_ids`` [N, 3] (or [B, N, 3]) giving each
    token's (index, row, column); joint attention with the text tokens before the image, in both
    the double-stream and the single-stream blocks. One image: a one-frame video."""
    text, ids = arguments["encoder_hidden_states"], arguments["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    found = _raster_grid(ids.float())
    if found is None:
        raise LayoutUnknown("FluxTransformer2DModel img_ids that do not span one full (row, column) grid in "
                            "raster order")
    return VideoLayout(*found, text_len=text.shape[1], text_position="before")


def _hunyuan_video_layout(model: torch.nn.Module, arguments: dict) -> VideoLayout:
    """HunyuanVideo: latents [B, C, T, H, W] patched by (p_t, p, p); joint attention over
    [video, text] (text after the video, padded at its end: the model passes a key mask)."""
    _, _, frames, height, width = arguments["hidden_states"].shape
    text = arguments["encoder_hidden_states"]
    p, p_t = model.config.patch_size, model.config.patch_size_t
    return VideoLayout(frames // p_t, height // p, width // p, text_len=text.shape[1], text_position="after")


def _double_then_single_stream(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The joint attention of the double-stream blocks, then of the single-stream blocks."""
    return [block.attn for block in model.transformer_blocks] + [block.attn for block in model.single_transformer_blocks]


# keyed by the name of the diffusers class; a subclass of one takes its geometry
GEOMETRIES: dict[str, ModelGeometry] = {
    "WanTransformer3DModel": ModelGeometry(_wan_layout, lambda model: [block.attn1 for block in model.blocks]),
    "CogVideoXTransformer3DModel": ModelGeometry(
        _cogvideox_layout, lambda model: [block.attn1 for block in model.transformer_blocks]),
    # double-stream then single-stream blocks, all over [video, text]
    "HunyuanVideoTransformer3DModel": ModelGeometry(_hunyuan_video_layout, _double_then_single_stream),
    # attn2 is cross-attention to the text
    "LTXVideoTransformer3DModel": ModelGeometry(
        _ltx_layout, lambda model: [block.attn1 for block in model.transformer_blocks]),
    # double-stream blocks then single-stream blocks, all over [text, image]
    "FluxTransformer2DModel": ModelGeometry(_flux_layout, _double_then_single_stream),
}


def geometry_of(model: torch.nn.Module) -> ModelGeometry:
    """The geometry of an instance of a supported diffusers transformer class (or of a subclass);
    ``ValueError`` listing the supported classes."""
    try:
        import diffusers
    except ImportError:  # then it cannot be a diffusers transformer
        diffusers = None
    for name, geometry in GEOMETRIES.items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(model, cls):
            return geometry
    raise ValueError(f"rainfusion does not support {type(model).__name__}; supported transformers (diffusers "
                     f"classes and their subclasses): {sorted(GEOMETRIES)}")
