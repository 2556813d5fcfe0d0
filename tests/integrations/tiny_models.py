"""The five supported diffusers transformers as tiny random models, one table for the tests that run
a user path on each (built from the per-model test files' helpers, non-square latents)."""

from dataclasses import dataclass
from typing import Callable

import torch

import test_diffusers_cogvideox as cogvideox
import test_diffusers_flux as flux
import test_diffusers_hunyuan as hunyuan
import test_diffusers_ltx as ltx
import test_diffusers_wan as wan
from rainfusion import RainFusion2Config

SEED = 7  # inputs none of the per-model files use


@dataclass(frozen=True)
class Model:
    """One supported transformer: how to build it, feed it and find its self-attention."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]  # fresh random inputs with a non-square latent
    run: Callable[[torch.nn.Module, tuple, float], torch.Tensor]
    timestep: float
    config: RainFusion2Config  # sparse from the first step (the sizes leave blocks to skip past the forced ones)
    blocks: str  # the block stack whose block 0 holds self-attention layer 0
    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]  # in rainfusion's layer order
    dispatches: bool  # its processors call diffusers' attention dispatch (they have `_attention_backend`)


VIDEO = RainFusion2Config(warmup_fraction=0.0, block_size=64)


def _double_then_single(model):
    return [block.attn for block in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]


MODELS = {
    "wan": Model(wan.tiny_wan, lambda: wan.inputs(seed=SEED, frames=3, size=16, width=24),
                 lambda m, x, t: wan.run(m, *x, t), 500, VIDEO, "blocks", lambda m: [b.attn1 for b in m.blocks],
                 dispatches=True),
    # CogVideoXAttnProcessor2_0 calls F.scaled_dot_product_attention itself: no backend to set
    "cogvideox": Model(cogvideox.tiny_cogvideox, lambda: cogvideox.inputs(seed=SEED, frames=3, size=16, width=24),
                       lambda m, x, t: cogvideox.run(m, *x, t), 500, VIDEO, "transformer_blocks",
                       lambda m: [b.attn1 for b in m.transformer_blocks], dispatches=False),
    "flux": Model(flux.tiny_flux, lambda: flux.inputs(seed=SEED, height=48, width=32),
                  lambda m, x, t: flux.run(m, *x, t), 0.5, RainFusion2Config.image(warmup_fraction=0.0, block_size=64),
                  "transformer_blocks", _double_then_single, dispatches=True),
    "hunyuan": Model(hunyuan.tiny_hunyuan, lambda: hunyuan.inputs(seed=SEED, frames=3, size=32, width=24),
                     lambda m, x, t: hunyuan.run(m, *x, t), 500, VIDEO, "transformer_blocks", _double_then_single,
                     dispatches=True),
    "ltx": Model(ltx.tiny_ltx, lambda: ltx.inputs(seed=SEED, frames=3, height=8, width=12),
                 lambda m, x, t: ltx.run(m, *x, t), 500, VIDEO, "transformer_blocks",
                 lambda m: [b.attn1 for b in m.transformer_blocks], dispatches=True),
}


def sparse_layers(controller) -> set[int]:
    return {layer for *_, layer, stats in controller.history if not stats.dense}


def all_sparse(controller, layers: set[int]) -> bool:
    """Exactly ``layers`` ran sparse, each with fewer than all blocks computed."""
    return (sparse_layers(controller) == layers and {layer for *_, layer, _ in controller.history} == layers
            and all(stats.mean_density < 1 for *_, stats in controller.history))
