"""Which implementation runs a block-sparse attention call.

- ``triton``: our Triton kernel (CUDA GPUs; CPU only under ``TRITON_INTERPRET=1``);
- ``portable``: plain PyTorch, any device;
- ``reference``: float64 masked dense attention, for tests on small inputs;
- ``auto``: ``triton`` on CUDA when Triton imports, else ``portable`` (logged once when a GPU
  falls back).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .mask import BlockSparseMask
from .portable import block_sparse_attention_portable
from .reference import masked_attention

BACKENDS = ("auto", "triton", "portable", "reference")
logger = logging.getLogger("rainfusion")


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    logger.warning(message)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, query: torch.Tensor) -> str:
    """The backend name that will run ``query`` [B, H, N, D] for the requested ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = query.device
    if backend == "auto":
        if device.type != "cuda":
            return "portable"
        if not triton_available():
            log_once("rainfusion: Triton is not installed; using the slower portable backend on CUDA")
            return "portable"
        from .kernels.block_sparse import DTYPES, HEAD_DIMS

        if query.dtype not in DTYPES or query.shape[-1] not in HEAD_DIMS:
            log_once(f"rainfusion: the Triton kernel takes {DTYPES} and head dims {HEAD_DIMS}; "
                     f"{query.dtype} with head dim {query.shape[-1]} runs on the slower portable backend")
            return "portable"
        return "triton"
    if backend == "triton" and not (triton_available() and _triton_runs_on(device)):
        raise ValueError(
            f"backend='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1), got tensors on "
            f"{device}; use backend='portable' or 'auto'"
        )
    return backend


def run_block_sparse(backend: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: BlockSparseMask, scale: float) -> torch.Tensor:
    """Dispatch to a resolved backend; tensors [B, H, N, D], output in the input dtype."""
    if backend == "triton":
        from .kernels.block_sparse import block_sparse_attention_triton

        return block_sparse_attention_triton(query, key, value, mask, scale=scale)
    if backend == "portable":
        return block_sparse_attention_portable(query, key, value, mask, scale=scale)
    return masked_attention(query, key, value, mask, scale=scale).to(query.dtype)
