"""Gradients (the portable backend differentiates, the GPU kernels refuse) and float64 (computed in
float64 on sparse and dense steps alike), against the float64 masked-attention oracle."""

import pytest
import torch
import torch.nn.functional as F

from _helpers import random_block_mask
from rainfusion import AttentionState, RainFusion2Config, RainFusionConfig, VideoLayout, block_sparse_attention, sparse_attention
from rainfusion.backends import gather_tokens
from rainfusion.mask import key_padding_mask
from rainfusion.reference import masked_attention, relative_l2, token_mask


def _leaves(*shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for shape in shapes]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out.double() * weights).sum(), inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q_len,kv_len,block_size,padded", [(300, 300, 64, False), (257, 390, 128, True),
                                                            (130, 70, 64, True)])
def test_block_sparse_gradients_match_the_float64_oracle(dtype, q_len, kv_len, block_size, padded):
    b, h, d = 2, 3, 16
    q, k, v = _leaves((b, h, q_len, d), (b, h, kv_len, d), (b, h, kv_len, d), dtype=dtype, seed=q_len + kv_len)
    mask = random_block_mask(b, h, q_len, kv_len, block_size, density=0.5, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([kv_len, kv_len // 2 + 3]) if padded else None
    out = block_sparse_attention(q, k, v, mask, kv_valid_len=valid, backend="portable")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _grads(out, [q, k, v], weights)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    allowed = token_mask(mask)
    if padded:
        allowed = allowed & key_padding_mask(valid, kv_len)
    want = _grads(masked_attention(q64, k64, v64, allowed), [q64, k64, v64], weights)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype, name
        assert relative_l2(g, w) < tolerance, name


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64, sparsity=0.8), RainFusionConfig(block_size=64),
                                    RainFusionConfig.rainfusion_plus(block_size=64)],
                         ids=["v2", "v1", "v1-plus"])
def test_sparse_attention_gradients_are_those_of_its_mask(config):
    """A sparse step differentiates as masked attention with its (constant) predicted mask;
    a dense warm-up step as SDPA."""
    layout = VideoLayout(6, 10, 14, text_len=19, text_position="after")  # 859 tokens: a tail, H != W
    n = layout.num_tokens
    q, k, v = _leaves(*[(2, 2, n, 16)] * 3, dtype=torch.float32, seed=5)
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = _grads(out, [q, k, v], weights)
    assert not state.stats.dense and state.stats.mean_density < 1 and state.stats.backend == "portable"

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    cache = state.cache
    permuted = [gather_tokens(t, cache.plan.order) for t in (q64, k64, v64)]
    want = _grads(gather_tokens(masked_attention(*permuted, cache.plan.mask), cache.plan.inverse), [q64, k64, v64], weights)
    for name, g, w in zip("qkv", got, want):
        assert relative_l2(g, w) < 1e-5, name

    warm = AttentionState(num_steps=10)
    dense_out = sparse_attention(q, k, v, layout=layout, config=config, state=warm)
    assert warm.stats.dense
    dense_want = _grads(F.scaled_dot_product_attention(q64, k64, v64), [q64, k64, v64], weights)
    for name, g, w in zip("qkv", _grads(dense_out, [q, k, v], weights), dense_want):
        assert relative_l2(g, w) < 1e-5, name


@pytest.mark.parametrize("backend", ["triton", "fa4"])
def test_forward_only_backends_refuse_inputs_that_need_a_gradient(backend):
    q, k, v = _leaves(*[(1, 2, 200, 64)] * 3, dtype=torch.float32, seed=7)
    mask = random_block_mask(1, 2, 200, 200, 64)
    with pytest.raises(ValueError, match=rf"backend='{backend}' is forward only, and the inputs require grad: use "
                                         r"backend='portable' \(or 'auto'\)"):
        block_sparse_attention(q, k, v, mask, backend=backend)
    with torch.no_grad():  # inference: nothing needs a gradient, so no refusal for that
        try:
            block_sparse_attention(q, k, v, mask, backend=backend)
        except ValueError as error:
            assert "require grad" not in str(error)


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64, sparsity=0.7), RainFusionConfig(block_size=64)],
                         ids=["v2", "v1"])
def test_float64_is_computed_in_float64_on_sparse_and_dense_steps(config):
    layout = VideoLayout(3, 12, 9, text_len=30, text_position="before")
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, layout.num_tokens, 32, generator=g, dtype=torch.float64) for _ in range(3))
    state = AttentionState(num_steps=10)
    for step in range(4):  # warm-up steps, then sparse ones
        out = sparse_attention(q, k, v, layout=layout, config=config, state=state)
        assert out.dtype == torch.float64
        if state.stats.dense:
            want = F.scaled_dot_product_attention(q, k, v)
        else:
            cache = state.cache
            permuted = [gather_tokens(t, cache.plan.order) for t in (q, k, v)]
            want = gather_tokens(masked_attention(*permuted, cache.plan.mask), cache.plan.inverse)
        assert relative_l2(out, want) < 1e-12, (step, state.stats.dense)  # float32 math would give ~1e-7
        state.next_step()
    assert not state.stats.dense


@pytest.mark.gpu
def test_auto_takes_the_portable_backend_on_cuda_when_a_gradient_is_needed():
    layout = VideoLayout(3, 16, 24)
    q, k, v = (t.cuda().detach().requires_grad_() for t in _leaves(*[(1, 2, layout.num_tokens, 64)] * 3,
                                                                  dtype=torch.float16, seed=12))
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(sparsity=0.7), state=state)
    assert state.stats.backend == "portable"
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    with torch.no_grad():
        sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(sparsity=0.7), state=state)
    assert state.stats.backend in ("triton", "fa4")
