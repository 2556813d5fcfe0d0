"""Input checks shared by the public entry points and the kernel launchers (imports nothing of
rainfusion).

Each raises ``TypeError`` / ``ValueError`` naming the argument, what was expected and what was
given (``require``: an ``ImportError`` naming the extra that installs a missing package).
"""

from __future__ import annotations

import importlib
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the precisions of block-sparse attention's products: "native" (the inputs' dtype) or "fp8"
# (int8 q, k with per-block scales and e4m3 P, v, on Hopper's Gluon kernel)
PRECISIONS = ("native", "fp8")


def check_precision(precision: object) -> None:
    """One of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_int(name: str, value: object, minimum: int) -> None:
    """An int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_qkv(query: object, key: object, value: object) -> None:
    """query [B, H, Nq, D], key and value [B, H, Nk, D]: one float dtype, one device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but query has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, but query is on {query.device}")
        if t.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"{name} has batch x heads {tuple(t.shape[:2])}, but query has {tuple(query.shape[:2])}"
            )
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise ValueError(f"key/value have head dims {key.shape[-1]}/{value.shape[-1]}, but query has "
                         f"{query.shape[-1]}")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value has {value.shape[2]} tokens, but key has {key.shape[2]}")


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: ``scale`` if a finite positive number, 1/sqrt(head_dim) if None."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive float or None (1/sqrt(head dim)), got {scale!r}")
    return float(scale)


def check_kv_valid_len(kv_valid_len: object, query: torch.Tensor,
                       valid_range: tuple[int, int] | None = None, why: str = "") -> torch.Tensor | None:
    """Per-item valid key counts as int32 [B] on the query's device (None stays None).

    With ``valid_range`` (low, high), as the public entry points pass it, every count must lie in
    [low, high] (else a ValueError ending with ``why``): that reads their range on the host (one
    device synchronisation). The kernels take any count in [0, Nk] unchecked (rows with no key
    give 0).
    """
    if kv_valid_len is None:
        return None
    if not isinstance(kv_valid_len, torch.Tensor) or kv_valid_len.dtype not in (torch.int32, torch.int64):
        got = kv_valid_len.dtype if isinstance(kv_valid_len, torch.Tensor) else type(kv_valid_len).__name__
        raise TypeError(f"kv_valid_len must be an int32 or int64 tensor, got {got}")
    if kv_valid_len.shape != (query.shape[0],):
        raise ValueError(f"kv_valid_len must have shape [{query.shape[0]}], got {tuple(kv_valid_len.shape)}")
    if kv_valid_len.device != query.device:
        raise ValueError(f"kv_valid_len is on {kv_valid_len.device}, but query is on {query.device}")
    if valid_range is not None:
        low, high = (int(x) for x in torch.aminmax(kv_valid_len))
        if low < valid_range[0] or high > valid_range[1]:
            raise ValueError(
                f"kv_valid_len must be in [{valid_range[0]}, {valid_range[1]}], got values in [{low}, {high}]{why}"
            )
    return kv_valid_len.to(torch.int32)


def require(module: str, needed_by: str, extra: str) -> None:
    """Import ``module``, or raise a one-line ImportError naming the extra that installs it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(f'{needed_by} needs {module}: pip install "rainfusion[{extra}]"') from None
