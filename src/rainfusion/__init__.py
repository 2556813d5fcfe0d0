"""rainfusion: training-free sparse attention for video and image diffusion transformers.

RainFusion (v1) classifies each head online as spatial / temporal / textural; RainFusion2.0
predicts a block mask from block-mean Q and K on spatiotemporally permuted tokens.
"""

from .attention import block_sparse_attention, sparse_attention
from .config import RainFusion2Config, RainFusionConfig
from .integrations.diffusers import apply_rainfusion, remove_rainfusion
from .layout import VideoLayout
from .mask import BlockSparseMask
from .steps import AttentionState, AttentionStats

__all__ = [
    "AttentionState",
    "AttentionStats",
    "BlockSparseMask",
    "RainFusion2Config",
    "RainFusionConfig",
    "VideoLayout",
    "apply_rainfusion",
    "block_sparse_attention",
    "remove_rainfusion",
    "sparse_attention",
]
__version__ = "0.1.0"

