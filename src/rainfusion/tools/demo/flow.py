"""Flow matching for the demo model (the convention of diffusers' flow-matching schedulers):
x_sigma = (1 - sigma) x_data + sigma noise, the model predicts the velocity noise - x_data at
timestep sigma x 1000; sampling integrates it from sigma = 1 to 0 with Euler steps, with
classifier-free guidance against the empty caption. Training and sampling both shift their noise
levels towards sigma = 1 by ``NOISE_SHIFT``: a 16-frame 128-pixel clip has ~800k values, and where
its objects go is decided at very high noise (the resolution-dependent shift of SD3); without the
shift in training, samples came out as scattered fragments of the right colours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import PIXELS_PER_CELL, DemoVideoModel

NOISE_SHIFT = 6.0


def shifted(sigma: torch.Tensor, shift: float = NOISE_SHIFT) -> torch.Tensor:
    """Noise levels in [0, 1] moved towards 1 (``shift`` > 1); 0 and 1 stay put."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_loss(model: DemoVideoModel, latents: torch.Tensor, captions: torch.Tensor, generator: torch.Generator,
                  drop_caption: float = 0.1, shift: float = NOISE_SHIFT) -> torch.Tensor:
    """Mean squared velocity error at shifted logit-normal noise levels; a fraction ``drop_caption`` of
    the captions is emptied (all ``<none>``) so that the model also learns the unconditional flow.
    ``generator`` lives on the latents' device (noise is drawn where it is used)."""
    b = latents.shape[0]
    device = latents.device
    sigma = shifted(torch.sigmoid(torch.randn(b, generator=generator, device=device)), shift)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    s = sigma.view(b, 1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    keep = torch.rand(b, generator=generator, device=device) >= drop_caption
    captions = captions * keep[:, None]
    velocity = model(noisy, sigma * 1000, captions)
    return F.mse_loss(velocity.float(), (noise - latents).float())


def noise_levels(steps: int, shift: float = NOISE_SHIFT) -> torch.Tensor:
    """float32 [steps + 1] from 1 to 0, evenly spaced before the shift."""
    return shifted(torch.linspace(1, 0, steps + 1), shift)


@torch.no_grad()
def sample(model: DemoVideoModel, captions: torch.Tensor, generator: torch.Generator, *, steps: int = 30,
           guidance: float = 3.0, shift: float = NOISE_SHIFT, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents [B, 48, T, S/4, S/4] for captions int64 [B, L] (on the model's device; so is
    ``generator``). The conditional and unconditional passes go through the transformer as one
    batch of 2B."""
    spec = model.spec
    b = captions.shape[0]
    cells = spec.size // PIXELS_PER_CELL
    device = captions.device
    x = torch.randn(b, model.transformer_config["in_channels"], spec.frames, cells, cells, generator=generator,
                    device=device, dtype=dtype)
    both = torch.cat([captions, torch.zeros_like(captions)])
    sigmas = noise_levels(steps, shift)
    for i in range(steps):
        timestep = torch.full((2 * b,), float(sigmas[i]) * 1000, device=device)
        cond, uncond = model(torch.cat([x, x]), timestep, both).chunk(2)
        velocity = uncond + guidance * (cond - uncond)
        x = x + float(sigmas[i + 1] - sigmas[i]) * velocity
    return x
