"""Output allocation that keeps the input's memory layout, and the device a launch runs on."""

import contextlib

import torch


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, D] tensor in the memory layout of ``x``: [B, N, H, D] memory (returned as
    a transposed view) when ``x`` is such a view (heads inner to tokens), else contiguous."""
    b, h, n, d = x.shape
    if x.stride(1) < x.stride(2):
        return x.new_empty(b, n, h, d).transpose(1, 2)
    return x.new_empty(b, h, n, d)


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the device of ``x`` (a tensor on the second GPU never launches on the first);
    CPU tensors (Triton's interpreter) need no context."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
