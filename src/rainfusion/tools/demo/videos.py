"""A procedural video data set, made in code: textured shapes that move, bounce or spin over a
textured background that the camera pans across, each clip with a caption of its objects,
colours, motions and pan.

A caption is a fixed-length row of word ids (``VOCAB``): the camera pan, then (shape, colour,
motion) for each object slot, ``<none>`` for empty slots. ``sample_videos`` renders a batch on any
device, vectorised over clips, objects, frames and pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._validation import check_int

SHAPES = ("square", "disc", "triangle", "ring")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
MOTIONS = ("left", "right", "up", "down", "bounce", "spin")
PANS = ("still", "pan-left", "pan-right", "pan-up", "pan-down")
VOCAB = ("<none>", *SHAPES, *COLOURS, *MOTIONS, *PANS)
_RGB = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
        "magenta": (0.85, 0.15, 0.8), "cyan": (0.1, 0.85, 0.9), "white": (0.95, 0.95, 0.95)}
# per motion: direction of travel (x right, y down) over the clip, in units of the [-1, 1] frame
_TRAVEL = {"left": (-0.9, 0.0), "right": (0.9, 0.0), "up": (0.0, -0.9), "down": (0.0, 0.9)}
_PAN = {"still": (0.0, 0.0), "pan-left": (-0.6, 0.0), "pan-right": (0.6, 0.0), "pan-up": (0.0, -0.6),
        "pan-down": (0.0, 0.6)}


@dataclass(frozen=True)
class VideoSpec:
    """Clip size: ``frames`` RGB frames of ``size`` x ``size`` pixels, up to ``max_objects`` objects."""

    frames: int = 16
    size: int = 128
    max_objects: int = 2

    def __post_init__(self) -> None:
        check_int("frames", self.frames, 1)
        check_int("size", self.size, 8)
        check_int("max_objects", self.max_objects, 1)

    @property
    def caption_length(self) -> int:
        return 1 + 3 * self.max_objects


def caption_text(tokens: torch.Tensor) -> str:
    """The words of one caption row (int64 [L]), e.g. 'red disc moving left; camera pans right'."""
    words = [VOCAB[int(i)] for i in tokens]
    objects = []
    for shape, colour, motion in zip(words[1::3], words[2::3], words[3::3]):
        if shape != "<none>":
            objects.append(f"{colour} {shape} " + ("spinning" if motion == "spin" else
                                                     "bouncing" if motion == "bounce" else f"moving {motion}"))
    camera = "camera still" if words[0] == "still" else f"camera pans {words[0].split('-')[1]}"
    return " and ".join(objects) + "; " + camera


def _word_ids(words: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([VOCAB.index(w) for w in words])


def sample_captions(batch: int, spec: VideoSpec, generator: torch.Generator) -> torch.Tensor:
    """int64 [batch, caption_length] random captions; every clip has at least one object."""
    n_objects = torch.randint(1, spec.max_objects + 1, (batch,), generator=generator)
    pick = lambda words: _word_ids(words)[torch.randint(len(words), (batch, spec.max_objects), generator=generator)]
    shapes, colours, motions = pick(SHAPES), pick(COLOURS), pick(MOTIONS)
    present = torch.arange(spec.max_objects) < n_objects[:, None]
    slots = torch.stack([shapes, colours, motions], dim=-1).where(present[..., None], 0)
    pans = _word_ids(PANS)[torch.randint(len(PANS), (batch,), generator=generator)]
    return torch.cat([pans[:, None], slots.flatten(1)], dim=1)


def _table(words: tuple[str, ...], values: dict, device: torch.device) -> torch.Tensor:
    """[len(VOCAB), len(value)] lookup from word id to the word's value (zeros for other words)."""
    width = len(next(iter(values.values())))
    table = torch.zeros(len(VOCAB), width)
    for word in words:
        table[VOCAB.index(word)] = torch.tensor(values[word])
    return table.to(device)


def _shape_alpha(local: torch.Tensor, shape_id: torch.Tensor, edge: float) -> torch.Tensor:
    """Coverage in [0, 1] of each shape at object-local points ``local`` [..., 2] (radius 1)."""
    x, y = local.unbind(-1)
    radius = local.norm(dim=-1)
    inside = torch.stack([
        1 - torch.maximum(x.abs(), y.abs()),                             # square
        1 - radius,                                                       # disc
        0.5 - torch.maximum(x.abs() * 0.866 + y * 0.5, -y),               # triangle
        0.3 - (radius - 0.7).abs(),                                       # ring
    ], dim=-1)
    which = (shape_id - VOCAB.index(SHAPES[0])).clamp(0, len(SHAPES) - 1).expand(inside.shape[:-1])
    chosen = torch.gather(inside, -1, which[..., None]).squeeze(-1)
    return torch.sigmoid(chosen / edge)


def render(captions: torch.Tensor, spec: VideoSpec, generator: torch.Generator) -> torch.Tensor:
    """Videos float32 [B, 3, T, S, S] in [-1, 1] for captions int64 [B, L] (on captions' device);
    positions, sizes, speeds and textures are drawn from ``generator`` (a CPU generator)."""
    device = captions.device
    b, t, s, k = captions.shape[0], spec.frames, spec.size, spec.max_objects

    def uniform(*shape, low=0.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=generator)).to(device)

    time = torch.linspace(0, 1, t, device=device).view(1, t, 1, 1)
    axis = (torch.arange(s, device=device) + 0.5) / s * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")  # [S, S], y down

    # background: two dark colours in a blend of two stripe families, shifted by the pan
    pan = _table(PANS, _PAN, device)[captions[:, 0]].view(b, 1, 1, 1, 2)
    shift = pan * time[..., None]
    angles = uniform(b, 2, high=math.pi).view(b, 2, 1, 1, 1)
    freqs = uniform(b, 2, low=4.0, high=12.0).view(b, 2, 1, 1, 1)
    px, py = (gx + shift[..., 0]).unsqueeze(1), (gy + shift[..., 1]).unsqueeze(1)  # [B, 1, T, S, S]
    waves = torch.sin(freqs * (px * angles.cos() + py * angles.sin()) + uniform(b, 2, 1, 1, 1, high=6.3))
    pattern = (0.5 + 0.25 * waves.sum(1)).unsqueeze(1)  # [B, 1, T, S, S]
    colours = uniform(b, 2, 3, high=0.45).view(b, 2, 3, 1, 1, 1)
    frames = colours[:, 0] * (1 - pattern) + colours[:, 1] * pattern  # [B, 3, T, S, S]

    slots = captions[:, 1:].view(b, k, 3)
    shape_id, rgb = slots[..., 0], _table(COLOURS, _RGB, device)[slots[..., 1]]  # [B, K], [B, K, 3]
    motion = slots[..., 2]
    radius = uniform(b, k, low=0.16, high=0.3)
    travel = _table(MOTIONS, {**_TRAVEL, "bounce": (0.0, 0.0), "spin": (0.0, 0.0)}, device)[motion]  # [B, K, 2]
    bounce = (motion == VOCAB.index("bounce"))[..., None]
    heading = uniform(b, k, high=2 * math.pi)
    velocity = torch.where(bounce, 2.2 * torch.stack([heading.cos(), heading.sin()], -1), travel)
    # start where the travel stays inside the frame: opposite the direction of travel
    start = uniform(b, k, 2, low=-0.35, high=0.35) - 0.5 * travel
    limit = (1 - radius)[..., None]
    path = start[:, :, None] + velocity[:, :, None] * time.view(1, 1, t, 1)  # [B, K, T, 2]
    folded = torch.remainder(path + limit[:, :, None], 4 * limit[:, :, None])  # reflect off the walls
    centre = (2 * limit[:, :, None] - (folded - 2 * limit[:, :, None]).abs()) - limit[:, :, None]
    spin = torch.where(motion == VOCAB.index("spin"), uniform(b, k, low=2.0, high=4.0), uniform(b, k, high=0.15))
    angle = uniform(b, k, high=2 * math.pi)[:, :, None] + spin[:, :, None] * 2 * math.pi * time.view(1, 1, t)
    stripes = uniform(b, k, low=3.0, high=7.0)

    for obj in range(k):  # painter's order
        dx = gx - centre[:, obj, :, 0, None, None]  # [B, T, S, S]
        dy = gy - centre[:, obj, :, 1, None, None]
        cos, sin = angle[:, obj, :, None, None].cos(), angle[:, obj, :, None, None].sin()
        local = torch.stack([cos * dx + sin * dy, -sin * dx + cos * dy], -1) / radius[:, obj, None, None, None, None]
        alpha = _shape_alpha(local, shape_id[:, obj, None, None, None], edge=2.0 / (s * radius[:, obj, None, None, None]))
        alpha = alpha * (shape_id[:, obj] != 0).view(b, 1, 1, 1)
        texture = 0.8 + 0.2 * torch.sign(torch.sin(stripes[:, obj, None, None, None] * local[..., 0]))
        paint = rgb[:, obj].view(b, 3, 1, 1, 1) * texture.unsqueeze(1)
        frames = frames * (1 - alpha.unsqueeze(1)) + paint * alpha.unsqueeze(1)
    return frames.clamp(0, 1) * 2 - 1


def sample_videos(batch: int, spec: VideoSpec, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(videos float32 [batch, 3, T, S, S] in [-1, 1], captions int64 [batch, caption_length])."""
    captions = sample_captions(batch, spec, generator).to(device)
    return render(captions, spec, generator), captions


def contact_sheet(videos: torch.Tensor, frames: int = 8) -> torch.Tensor:
    """uint8 [B * S, frames * S, 3] image: one row per clip of ``videos`` [B, 3, T, S, S] in
    [-1, 1], ``frames`` evenly spaced frames across."""
    b, _, t, s, _ = videos.shape
    picked = videos[:, :, torch.linspace(0, t - 1, frames).round().long()]
    pixels = ((picked.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return pixels.permute(0, 3, 2, 4, 1).reshape(b * s, frames * s, 3)
