"""rainfusion: training-free sparse attention for video and image diffusion transformers.

RainFusion (v1) classifies each head online as spatial / temporal / textural; RainFusion2.0
predicts a block mask from block-mean Q and K on spatiotemporally permuted tokens.
"""

from .attention import block_sparse_attention, sparse_attention
from .config import RainFusion2Config, RainFusionConfig
from .layout import VideoLayout
from .mask import BlockSparseMask
from .state import AttentionState, AttentionStats

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


def __getattr__(name: str):
    # the diffusers integration imports on first use, so `import rainfusion` needs no diffusers
    if name in ("apply_rainfusion", "remove_rainfusion"):
        from .integrations import diffusers as _integration

        return getattr(_integration, name)
    raise AttributeError(f"module 'rainfusion' has no attribute {name!r}")
