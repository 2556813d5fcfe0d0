"""The demo model: a small video DiT made of diffusers' own ``WanTransformer3DModel`` (3D rotary
embeddings, cross-attention to the caption), trained here with flow matching on the procedural
videos of ``videos.py``.

Latents are pixels folded by a fixed, exactly invertible space-to-depth (4 x 4 pixels per latent
cell: [B, 3, T, S, S] <-> [B, 48, T, S/4, S/4]); no pretrained VAE. Captions (word ids) become the
text tokens through a learned embedding per word plus one per caption slot.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
from torch import nn

from ...layout import VideoLayout
from .videos import VOCAB, VideoSpec

PIXELS_PER_CELL = 4  # space-to-depth factor along height and width
# a few million parameters; 128-pixel clips of 16 frames give 16 x 16 x 16 = 4,096 tokens (32 blocks)
TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64,
                          in_channels=3 * PIXELS_PER_CELL**2, out_channels=3 * PIXELS_PER_CELL**2, text_dim=128,
                          freq_dim=64, ffn_dim=768, num_layers=6, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256)


def to_latents(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, S, S] -> [B, 48, T, S/4, S/4] (space-to-depth)."""
    b, c, t, h, w = videos.shape
    p = PIXELS_PER_CELL
    if h % p or w % p:
        raise ValueError(f"videos' height and width must be multiples of {p}, got {h} x {w}")
    cells = videos.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return cells.reshape(b, c * p * p, t, h // p, w // p)


def from_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, 48, T, S/4, S/4] -> [B, 3, T, S, S], the inverse of ``to_latents``."""
    b, cpp, t, h, w = latents.shape
    p = PIXELS_PER_CELL
    cells = latents.reshape(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return cells.reshape(b, cpp // (p * p), t, h * p, w * p)


class DemoVideoModel(nn.Module):
    """Caption-conditioned velocity model: forward(latents [B, 48, T, h, w], timestep [B] in
    [0, 1000] (the noise level x 1000), captions int64 [B, L]) -> velocity [B, 48, T, h, w]."""

    def __init__(self, spec: VideoSpec, transformer_config: dict | None = None):
        super().__init__()
        import diffusers

        self.spec = spec
        self.transformer_config = dict(TRANSFORMER_CONFIG, **(transformer_config or {}))
        self.transformer = diffusers.WanTransformer3DModel(**self.transformer_config)
        width = self.transformer_config["text_dim"]
        self.words = nn.Embedding(len(VOCAB), width)
        self.slots = nn.Parameter(0.02 * torch.randn(spec.caption_length, width))

    @property
    def layout(self) -> VideoLayout:
        """The video tokens of its self-attention: frames x cells x cells."""
        cells = self.spec.size // PIXELS_PER_CELL // self.transformer_config["patch_size"][1]
        return VideoLayout(self.spec.frames, cells, cells)

    def text(self, captions: torch.Tensor) -> torch.Tensor:
        """Text tokens [B, L, text_dim] of captions int64 [B, L]."""
        return self.words(captions) + self.slots

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return self.transformer(latents, timestep, self.text(captions).to(latents.dtype), return_dict=False)[0]


def save_checkpoint(model: DemoVideoModel, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """The weights (in ``dtype``) and the configuration, as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    metadata = {"spec": json.dumps(asdict(model.spec)), "transformer": json.dumps(model.transformer_config)}
    save_file(tensors, path, metadata=metadata)


def checkpoint_config(path: str) -> tuple[VideoSpec, dict]:
    """The clip spec and transformer configuration of ``save_checkpoint``'s file (no weights read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    transformer = json.loads(metadata["transformer"])
    transformer["patch_size"] = tuple(transformer["patch_size"])
    return VideoSpec(**json.loads(metadata["spec"])), transformer


def load_checkpoint(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DemoVideoModel:
    """A DemoVideoModel from ``save_checkpoint``'s file, in ``dtype`` on ``device``, in eval mode."""
    from safetensors.torch import load_file

    model = DemoVideoModel(*checkpoint_config(path))
    model.load_state_dict(load_file(path))
    return model.to(device, dtype).eval()
