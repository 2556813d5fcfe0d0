"""The public entry points: ``sparse_attention`` (drop-in for SDPA) and ``block_sparse_attention``."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .arm import arm_fractions, recognise_heads
from .backends import resolve_backend, run_block_sparse
from .config import AnyConfig, RainFusion2Config, RainFusionConfig
from .head_patterns import head_pattern_table
from .layout import VideoLayout
from .mask import BlockSparseMask
from .permutation import TokenOrder, gather_tokens, token_order
from .predictor import predict_block_mask
from .state import AttentionState, AttentionStats, MaskCache

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(query: object, key: object, value: object) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
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
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key has head dim {key.shape[-1]}, but query has {query.shape[-1]}")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value has {value.shape[2]} tokens, but key has {key.shape[2]}")


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    return float(scale)


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           block_mask: BlockSparseMask, *, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Attention restricted to the key blocks listed in ``block_mask``.

    query [B, H, Nq, D], key/value [B, H, Nk, D]; block_mask for (B or 1, H or 1) with
    q_len == Nq and kv_len == Nk. Returns [B, H, Nq, D] in the input dtype. Query rows that list
    no key block give 0.
    """
    _check_qkv(query, key, value)
    if not isinstance(block_mask, BlockSparseMask):
        raise TypeError(f"block_mask must be a BlockSparseMask, got {type(block_mask).__name__}")
    b, h, n_q, d = query.shape
    if (block_mask.q_len, block_mask.kv_len) != (n_q, key.shape[2]):
        raise ValueError(
            f"block_mask is for q_len x kv_len = {block_mask.q_len} x {block_mask.kv_len}, "
            f"but query/key have {n_q} x {key.shape[2]} tokens"
        )
    if block_mask.counts.device != query.device:
        raise ValueError(f"block_mask is on {block_mask.counts.device}, but query is on {query.device}")
    mask = block_mask.expand(b, h)
    name = resolve_backend(backend, query, mask.block_size)
    return run_block_sparse(name, query, key, value, mask, _check_scale(scale, d))


def _v2_order(layout: VideoLayout, config: RainFusion2Config, device: torch.device) -> TokenOrder:
    name = "raster" if config.permutation == "none" else config.permutation
    return token_order(layout, name, sink_first_frame=config.sink_first_frame, device=device)


def _predict_v1(query: torch.Tensor, key: torch.Tensor, layout: VideoLayout, config: RainFusionConfig,
                scale: float, cache_key: tuple, sparse_step: int) -> MaskCache:
    """ARM on the original tokens, then each head's block mask in its own token order."""
    table = head_pattern_table(layout, arm_fractions(config), config.tau, config.sink_first_frame,
                               config.block_size, query.device)
    heads = recognise_heads(query, key, layout, config, scale=scale)
    return MaskCache(cache_key, sparse_step, table.block_mask(heads.candidate), table.orders[heads.pattern],
                     table.inverses[heads.pattern], heads.pattern)


def _timed(fn, profile: bool, device: torch.device):
    """(fn(), host seconds); with ``profile`` the device is synchronised around it."""
    sync = profile and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if sync:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layout: VideoLayout,
                     config: AnyConfig, state: AttentionState | None = None, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """RainFusion (v1) or RainFusion2.0 attention, a drop-in for ``scaled_dot_product_attention``.

    query, key, value [B, H, N, D] with N = layout.num_tokens. The method follows the config
    type. ``state`` (one per attention layer) carries the step index for the dense warm-up, the
    cached mask between refreshes and the last call's ``stats``. Returns [B, H, N, D] in the
    input dtype.
    """
    _check_qkv(query, key, value)
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    if not isinstance(config, (RainFusionConfig, RainFusion2Config)):
        raise TypeError(f"config must be a RainFusionConfig or RainFusion2Config, got {type(config).__name__}")
    if state is not None and not isinstance(state, AttentionState):
        raise TypeError(f"state must be an AttentionState or None, got {type(state).__name__}")
    layout.check_sequence_length(query.shape[2], "query")
    layout.check_sequence_length(key.shape[2], "key")
    scale = _check_scale(scale, query.shape[-1])
    method = "rainfusion" if isinstance(config, RainFusionConfig) else "rainfusion2"
    b, h = query.shape[:2]
    step = state.step if state is not None else 0
    warmup = state.warmup_steps(config.warmup_fraction) if state is not None else 0

    if step < warmup:
        out = _dense(query, key, value, scale)
        if state is not None:
            state.stats = AttentionStats(method, "sdpa", step, True, torch.ones(b, h, device=query.device))
        return out

    name = resolve_backend(backend, query, config.block_size)
    cache_key = (tuple(query.shape), query.device, layout, config)
    cache = state.cache if state is not None else None
    sparse_step = step - warmup
    reuse = (cache is not None and cache.key == cache_key
             and 0 <= sparse_step - cache.sparse_step < config.refresh_interval)
    profile = state is not None and state.profile
    predict_seconds = 0.0
    if method == "rainfusion2":  # one token order for every head: permute once, predict on it
        order = _v2_order(layout, config, query.device)
        permuted = [gather_tokens(t, order.index) for t in (query, key, value)]
        if not reuse:
            mask, predict_seconds = _timed(
                lambda: predict_block_mask(permuted[0], permuted[1], num_dense=order.num_dense, config=config,
                                           scale=scale),
                profile, query.device)
            cache = MaskCache(cache_key, sparse_step, mask, order.index, order.inverse, None)
    else:  # each head's order follows its recognised pattern
        if not reuse:
            cache, predict_seconds = _timed(lambda: _predict_v1(query, key, layout, config, scale, cache_key,
                                                                sparse_step), profile, query.device)
        permuted = [gather_tokens(t, cache.order) for t in (query, key, value)]

    out = run_block_sparse(name, *permuted, cache.mask, scale)
    out = gather_tokens(out, cache.inverse)
    if state is not None:
        state.cache = cache
        state.stats = AttentionStats(method, name, step, False, cache.mask.density(), cache.patterns,
                                     predict_seconds, reuse)
    return out
