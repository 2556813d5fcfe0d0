"""The public entry points: ``sparse_attention`` (drop-in for SDPA) and ``block_sparse_attention``.

Both methods share one path: dense warm-up steps, else a plan (``methods``: mask, token order,
patterns) made or reused from the cache, the tokens gathered into the plan's order, block-sparse
attention, and the output gathered back.
"""

from __future__ import annotations

import time

import torch

from ._validation import check_kv_valid_len, check_qkv, check_scale
from .backends import (compensate_skipped, dense_attention, gather_tokens, needs_grad, resolve_backend,
                       run_block_sparse)
from .config import AnyConfig, RainFusion2Config, RainFusionConfig
from .layout import VideoLayout
from .mask import BlockSparseMask, check_block_mask
from .methods import plan_attention
from .steps import AttentionState, AttentionStats, MaskCache


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           block_mask: BlockSparseMask, *, scale: float | None = None,
                           kv_valid_len: torch.Tensor | None = None, backend: str = "auto",
                           precision: str = "native") -> torch.Tensor:
    """Attention restricted to the key blocks listed in ``block_mask``.

    query [B, H, Nq, D], key/value [B, H, Nk, D]; block_mask for (B or 1, H or 1) with
    q_len == Nq and kv_len == Nk (its contents were checked when it was built, see
    ``BlockSparseMask``); kv_valid_len (int [B] in [1, Nk], optional): keys at positions >= it
    are padding and ignored (e.g. padded text); checking it reads one value on the host. Returns
    [B, H, Nq, D] in the input dtype (float64 computed in float64). Query rows that see no key
    give 0. Differentiable on the ``portable`` backend (see ``backends``). ``precision``: "native"
    (products in the inputs' dtype) or "fp8" (opt-in: int8 q, k with per-block scales and e4m3 P,
    v on Hopper's Gluon kernel; elsewhere native, logged once).
    """
    check_qkv(query, key, value)
    mask = check_block_mask(block_mask, query, key)
    kv_valid_len = check_kv_valid_len(kv_valid_len, query, valid_range=(1, key.shape[2]),
                                      why=" (at least one valid key, at most the key count)")
    name = resolve_backend(backend, query, mask.block_size, padded_keys=kv_valid_len is not None,
                           grad=needs_grad(query, key, value), precision=precision)
    return run_block_sparse(name, query, key, value, mask, check_scale(scale, query.shape[-1]), kv_valid_len,
                            precision=precision)


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


def _compensated(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockSparseMask,
                 scale: float, kv_valid_len: torch.Tensor | None, precision: str) -> torch.Tensor:
    """Block-sparse attention over the kept blocks, exact, merged with the estimate of the skipped
    ones from the permuted key and value block means (``compensation``). Skipped blocks hold no
    padding (the text, where padding lives, is always kept)."""
    exact, lse = run_block_sparse(name, query, key, value, mask, scale, kv_valid_len, return_lse=True,
                                  precision=precision)
    return compensate_skipped(query, key, value, mask, exact, lse, scale)


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layout: VideoLayout,
                     config: AnyConfig, state: AttentionState | None = None, scale: float | None = None,
                     kv_valid_len: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """RainFusion (v1) or RainFusion2.0 attention, a drop-in for ``scaled_dot_product_attention``.

    query, key, value [B, H, N, D] with N = layout.num_tokens. The method follows the config
    type. ``state`` (one per attention layer) carries the step index for the dense warm-up, the
    cached mask between refreshes and the last call's ``stats``. ``kv_valid_len`` (int [B]):
    keys at positions >= it are padding (the end of text placed after the video, as
    HunyuanVideo pads its prompt): at least the video's token count, at most N. Returns
    [B, H, N, D] in the input dtype; float64 inputs are computed in float64 on dense and sparse
    steps alike. Gradients flow on the portable backend (see ``backends``), the masks being
    constants.
    """
    check_qkv(query, key, value)
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    if not isinstance(config, (RainFusionConfig, RainFusion2Config)):
        raise TypeError(f"config must be a RainFusionConfig or RainFusion2Config, got {type(config).__name__}")
    if state is not None and not isinstance(state, AttentionState):
        raise TypeError(f"state must be an AttentionState or None, got {type(state).__name__}")
    layout.check_sequence_length(query.shape[2], "query")
    layout.check_sequence_length(key.shape[2], "key")
    scale = check_scale(scale, query.shape[-1])
    if kv_valid_len is not None and layout.text_position != "after":
        raise ValueError("kv_valid_len marks padding at the end of the sequence, which must be text after the "
                         f"video; layout has text_position={layout.text_position!r}")
    kv_valid_len = check_kv_valid_len(kv_valid_len, query, valid_range=(layout.text_start, key.shape[2]),
                                      why=" (only the text after the video may be padding)")
    method = "rainfusion" if isinstance(config, RainFusionConfig) else "rainfusion2"
    b, h = query.shape[:2]
    step = state.step if state is not None else 0
    warmup = state.warmup_steps(config.warmup_fraction) if state is not None else 0

    if step < warmup:
        out, dense_backend = dense_attention(query, key, value, scale, kv_valid_len)
        if state is not None:
            state.stats = AttentionStats(method, dense_backend, step, True, torch.ones(b, h, device=query.device))
        return out

    name = resolve_backend(backend, query, config.block_size, padded_keys=kv_valid_len is not None,
                           grad=needs_grad(query, key, value), precision=config.precision)
    cache_key = (tuple(query.shape), query.device, layout, config)
    cache = state.cache if state is not None else None
    sparse_step = step - warmup
    reuse = (cache is not None and cache.key == cache_key
             and 0 <= sparse_step - cache.sparse_step < config.refresh_interval)
    predict_seconds = 0.0
    if not reuse:
        plan, predict_seconds = _timed(lambda: plan_attention(query, key, layout, config, scale),
                                       state is not None and state.profile, query.device)
        cache = MaskCache(cache_key, sparse_step, plan)
    plan = cache.plan
    # trailing text stays at the end in every token order: the padding is still a suffix
    if config.compensate:
        permuted = [gather_tokens(t, plan.order) for t in (query, key, value)]
        out = gather_tokens(_compensated(name, *permuted, plan.mask, scale, kv_valid_len, config.precision),
                            plan.inverse)
    else:  # the backend permutes and un-permutes (the triton one's kernels store the rows back in place)
        # a reused plan's key mean is of earlier keys: the pre-pass then reads this call's
        out = run_block_sparse(name, query, key, value, plan.mask, scale, kv_valid_len, precision=config.precision,
                               token_order=plan.order, inverse_order=plan.inverse,
                               key_center=None if reuse else plan.key_mean)
    if state is not None:
        state.cache = cache
        overhead = plan.mask.kv_blocks / key.shape[2] if config.compensate else 0.0
        state.stats = AttentionStats(method, name, step, False, plan.mask.density(), plan.patterns,
                                     predict_seconds, reuse, overhead)
    return out
