import pytest
import torch
import torch.nn.functional as F

from _helpers import random_block_mask
from rainfusion import (AttentionState, RainFusion2Config, RainFusionConfig, VideoLayout,
                        block_sparse_attention, sparse_attention)
from rainfusion.backends import gather_tokens
from rainfusion.reference import masked_attention, relative_l2, token_mask

LAYOUTS = [
    VideoLayout(4, 8, 12),
    VideoLayout(5, 7, 9, text_len=37, text_position="before"),
    VideoLayout(3, 16, 11, text_len=21, text_position="after"),
]
CONFIGS = [
    RainFusion2Config(sparsity=0.0, block_size=64),
    RainFusion2Config(sparsity=0.0, block_size=128, permutation="tile2d", selection="topp", top_p=1.0),
    RainFusion2Config(sparsity=0.0, block_size=64, permutation="none", sink_first_frame=False),
    RainFusionConfig(sparsity=0.0, block_size=64),
    RainFusionConfig(sparsity=0.0, block_size=128, sink_first_frame=False),
]


def qkv(layout, b=2, h=3, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, layout.num_tokens, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}-{c.block_size}")
def test_sparsity_zero_equals_dense_sdpa(layout, config):
    q, k, v = qkv(layout, seed=layout.num_tokens)
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert relative_l2(out, ref) < 1e-5
    assert not state.stats.dense and state.stats.mean_density == 1.0


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64), RainFusionConfig(block_size=64)])
def test_warmup_steps_are_dense_then_sparse(config):
    layout = LAYOUTS[1]
    q, k, v = qkv(layout)
    state = AttentionState(num_steps=10)
    warmup = state.warmup_steps(config.warmup_fraction)
    assert warmup == {0.3: 3, 0.1: 1}[config.warmup_fraction]
    ref = F.scaled_dot_product_attention(q, k, v)
    for step in range(warmup + 1):
        out = sparse_attention(q, k, v, layout=layout, config=config, state=state)
        assert state.stats.dense == (step < warmup)
        if step < warmup:
            assert torch.allclose(out, ref, atol=1e-6)
            assert state.stats.backend == "sdpa"
        state.next_step()
    assert state.stats.mean_density < 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64, sparsity=0.7),
                                    RainFusion2Config(block_size=64, selection="topp", top_p=0.5),
                                    RainFusionConfig(block_size=64, alpha=0.6),
                                    RainFusionConfig.rainfusion_plus(block_size=64, alpha=0.3)])
def test_output_is_the_masked_reference_of_the_predicted_mask(layout, config):
    q, k, v = qkv(layout, seed=7)
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state)
    cache = state.cache
    permuted = [gather_tokens(t, cache.plan.order) for t in (q, k, v)]
    ref = gather_tokens(masked_attention(*permuted, cache.plan.mask), cache.plan.inverse)
    assert relative_l2(out, ref) < 1e-5
    assert state.stats.mean_density < 1.0
    if isinstance(config, RainFusionConfig):
        assert sum(state.stats.pattern_counts.values()) == 6


def test_mask_refresh_interval_reuses_the_cached_mask():
    layout = LAYOUTS[0]
    q, k, v = qkv(layout)
    state = AttentionState()
    config = RainFusion2Config(block_size=64, refresh_interval=2)
    reused = []
    for _ in range(4):
        sparse_attention(q, k, v, layout=layout, config=config, state=state)
        reused.append(state.stats.mask_reused)
        state.next_step()
    assert reused == [False, True, False, True]
    q2, k2, v2 = (t[:1] for t in (q, k, v))  # a new batch size invalidates the cache
    sparse_attention(q2, k2, v2, layout=layout, config=config, state=state)
    assert not state.stats.mask_reused
    state.reset()
    assert state.step == 0 and state.cache is None


def test_bf16_inputs_keep_their_dtype():
    layout = LAYOUTS[2]
    q, k, v = qkv(layout, dtype=torch.bfloat16)
    out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(block_size=64))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()


def bad(**changes):
    layout = VideoLayout(2, 8, 8)
    q, k, v = qkv(layout, b=1, h=2, d=16)
    args = dict(query=q, key=k, value=v, layout=layout, config=RainFusion2Config(block_size=64))
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(query=torch.randn(2, 128, 16)), ValueError, r"query must be 4-D \[B, heads, N, D\], got shape \(2, 128, 16\)"),
        (dict(key=torch.randn(1, 2, 128, 16, dtype=torch.float64)), TypeError, "key has dtype torch.float64, but query has torch.float32"),
        (dict(value=torch.randn(1, 3, 128, 16)), ValueError, r"value has batch x heads \(1, 3\), but query has \(1, 2\)"),
        (dict(key=torch.randn(1, 2, 128, 8)), ValueError, "key/value have head dims 8/16, but query has 16"),
        (dict(value=torch.randn(1, 2, 127, 16)), ValueError, "value has 127 tokens, but key has 128"),
        (dict(key=torch.randn(1, 2, 128, 16, device="meta")), ValueError, "key is on meta, but query is on cpu"),
        (dict(query=torch.randn(1, 2, 128, 16).int()), TypeError, "query must be float16, bfloat16, float32 or float64"),
        (dict(layout=VideoLayout(3, 8, 8)), ValueError, r"query has sequence length 128, but layout 3x8x8 expects 192"),
        (dict(config=dict(sparsity=0.5)), TypeError, "config must be a RainFusionConfig or RainFusion2Config, got dict"),
        (dict(layout=(2, 8, 8)), TypeError, "layout must be a VideoLayout, got tuple"),
        (dict(state="step 3"), TypeError, "state must be an AttentionState or None, got str"),
        (dict(scale=-1.0), ValueError, r"scale must be a finite positive float or None \(1/sqrt\(head dim\)\), got -1.0"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite positive float or None .*, got inf"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite positive float or None .*, got nan"),
        (dict(scale=0), ValueError, "scale must be a finite positive float or None .*, got 0"),
        (dict(scale="0.1"), TypeError, "scale must be a float or None, got str"),
        (dict(kv_valid_len=torch.tensor([0])), ValueError, "kv_valid_len marks padding at the end"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'fa4', 'triton', 'portable'\)"),
        (dict(query="q"), TypeError, "query must be a torch.Tensor, got str"),
    ],
)
def test_sparse_attention_rejects_bad_input(changes, error, match):
    args = bad(**changes)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(error, match=match):
        sparse_attention(q, k, v, **args)


def test_block_sparse_attention_rejects_bad_masks_and_backends(monkeypatch):
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    with pytest.raises(TypeError, match="block_mask must be a BlockSparseMask, got Tensor"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask is for q_len x kv_len = 256 x 256, but query/key have 200 x 200"):
        block_sparse_attention(q, k, v, random_block_mask(1, 2, 256, 256, 64))
    with pytest.raises(ValueError, match=r"block_mask has batch x heads = 1 x 3, expected 1 x 2"):
        block_sparse_attention(q, k, v, random_block_mask(1, 3, 200, 200, 64))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs Triton and CUDA tensors"):
        block_sparse_attention(q, k, v, random_block_mask(1, 2, 200, 200, 64), backend="triton")


@pytest.mark.parametrize("per_head", [False, True])
def test_run_block_sparse_puts_the_output_back_in_the_tokens_order(per_head):
    """token_order with inverse_order (portable backend): the output and lse of the gathered
    tokens, each row back at its token's own position; inverse_order alone is refused."""
    from rainfusion.backends import gather_tokens, run_block_sparse

    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    order = torch.stack([torch.randperm(200) for _ in range(2)])[None] if per_head else torch.randperm(200)
    inverse = torch.argsort(order, dim=-1)
    mask = random_block_mask(1, 2, 200, 200, 64)
    gathered = [gather_tokens(t, order) for t in (q, k, v)]
    want, want_lse = run_block_sparse("portable", *gathered, mask, 0.25, return_lse=True)
    out, lse = run_block_sparse("portable", q, k, v, mask, 0.25, return_lse=True, token_order=order,
                                inverse_order=inverse)
    rows = order.expand(1, 2, 200)
    in_order = lambda x: torch.gather(x, 2, rows[..., None].expand(-1, -1, -1, 16))  # noqa: E731
    assert torch.equal(in_order(out), want) and torch.equal(torch.gather(lse, 2, rows), want_lse)
    out = run_block_sparse("portable", q, k, v, mask, 0.25, token_order=order, inverse_order=inverse)
    assert torch.equal(in_order(out), run_block_sparse("portable", *gathered, mask, 0.25))
    with pytest.raises(ValueError, match="inverse_order undoes a token_order"):
        run_block_sparse("portable", q, k, v, mask, 0.25, inverse_order=inverse)


def test_triton_backend_runs_both_methods_like_the_portable_one():
    pytest.importorskip("triton")
    layout = VideoLayout(4, 8, 16, text_len=30, text_position="after")
    q, k, v = qkv(layout, b=1, h=2, d=64, seed=11, dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available():
        q, k, v = (t.cuda() for t in (q, k, v))
    for config in (RainFusion2Config(block_size=64), RainFusionConfig(block_size=64, alpha=0.5)):
        portable = sparse_attention(q, k, v, layout=layout, config=config, backend="portable")
        state = AttentionState()
        triton_out = sparse_attention(q, k, v, layout=layout, config=config, state=state, backend="triton")
        assert state.stats.backend == "triton"
        assert relative_l2(triton_out, portable) < (2e-3 if q.dtype == torch.float16 else 1e-5)


def test_fa4_backend_is_refused_where_it_does_not_apply():
    q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
    with pytest.raises(ValueError, match="backend='fa4' needs flash-attn-4 on an SM90\\+ GPU"):
        block_sparse_attention(q, k, v, random_block_mask(1, 2, 200, 200, 64), backend="fa4")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["native", "fp8"])
def test_sparse_attention_compiles_on_gpu(precision):
    # (FP8 where its kernel runs, else the logged native fallback, under the compiled graph too)
    layout = VideoLayout(5, 16, 32, text_len=40, text_position="after")
    q, k, v = (t.cuda() for t in qkv(layout, b=1, h=4, d=128, seed=12, dtype=torch.bfloat16))
    config = RainFusion2Config(precision=precision)
    eager = sparse_attention(q, k, v, layout=layout, config=config, backend="triton")
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, layout=layout, config=config, backend="triton"))
    assert relative_l2(compiled(q, k, v), eager) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_steps_with_padded_keys_run_on_the_triton_kernel(dtype):
    from rainfusion.backends import dense_attention

    layout = VideoLayout(3, 30, 44, text_len=100, text_position="after")  # 4060 tokens: a tail block
    q, k, v = (t.cuda() for t in qkv(layout, b=2, h=3, d=128, seed=13, dtype=dtype))
    n = layout.num_tokens
    valid = torch.tensor([n - 70, n - 3], device="cuda", dtype=torch.int32)
    out, backend = dense_attention(q, k, v, 128**-0.5, valid)
    allowed = torch.arange(n, device="cuda") < valid.view(-1, 1, 1, 1)
    ref = masked_attention(q, k, v, allowed)
    assert backend == "triton" and relative_l2(out, ref) < 1e-2
    # without padding: FA4 where installed, else SDPA with cuDNN first
    out, backend = dense_attention(q, k, v, 128**-0.5)
    assert backend in ("fa4", "sdpa") and relative_l2(out, masked_attention(q, k, v)) < 1e-2


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64), RainFusionConfig(block_size=64, alpha=0.6)])
def test_text_rows_and_columns_are_dense_wherever_the_text_sits(config):
    for layout in LAYOUTS[1:]:
        q, k, v = qkv(layout, b=1, h=2, seed=3)
        state = AttentionState()
        sparse_attention(q, k, v, layout=layout, config=config, state=state)
        cache = state.cache
        order = cache.plan.order.expand(1, 2, -1)
        position = torch.empty_like(order)
        position.scatter_(-1, order, torch.arange(layout.num_tokens).expand_as(order))  # token -> position
        text = torch.arange(layout.text_start, layout.text_start + layout.text_len)
        text_blocks = (position[..., text] // 64).unique()
        kept = cache.plan.mask.to_dense()
        assert kept[:, :, text_blocks].all(), "text rows"
        assert kept[..., text_blocks].all(), "text columns"
        assert state.stats.mean_density < 1.0


@pytest.mark.parametrize("config", [RainFusion2Config(block_size=64, sparsity=0.0), RainFusionConfig(block_size=64, sparsity=0.0),
                                    RainFusion2Config(block_size=64), RainFusionConfig(block_size=64, alpha=0.6)])
def test_padded_trailing_text_is_masked_out(config):
    layout = LAYOUTS[2]  # text after the video
    q, k, v = qkv(layout, b=2, h=2, seed=5)
    n = layout.num_tokens
    valid = torch.tensor([n, n - 15])  # the second item pads its last 15 text tokens
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=config, state=state, kv_valid_len=valid)
    keys = torch.arange(n)
    cache = state.cache
    permuted = [gather_tokens(t, cache.plan.order) for t in (q, k, v)]
    allowed = token_mask(cache.plan.mask.expand(2, 2)) & (keys < valid.view(-1, 1, 1, 1))
    ref = gather_tokens(masked_attention(*permuted, allowed), cache.plan.inverse)
    assert relative_l2(out, ref) < 1e-5
    if config.sparsity == 0:  # and it is exactly SDPA with the padding mask
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keys < valid.view(-1, 1, 1, 1))
        assert relative_l2(out, sdpa) < 1e-5
    # warm-up steps mask the padding too
    warm = AttentionState(num_steps=10)
    dense = sparse_attention(q, k, v, layout=layout, config=config, state=warm, kv_valid_len=valid)
    assert warm.stats.dense
    assert relative_l2(dense, F.scaled_dot_product_attention(q, k, v, attn_mask=keys < valid.view(-1, 1, 1, 1))) < 1e-6


def test_kv_valid_len_needs_trailing_text():
    layout = LAYOUTS[1]  # text before
    q, k, v = qkv(layout, b=1, h=2)
    with pytest.raises(ValueError, match="kv_valid_len marks padding at the end of the sequence"):
        sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(block_size=64),
                         kv_valid_len=torch.tensor([layout.num_tokens - 3]))


@pytest.mark.parametrize("num_steps", [None, 10])  # a sparse step, and a dense warm-up step
def test_kv_valid_len_out_of_range_is_refused(num_steps):
    layout = LAYOUTS[2]  # text after the video
    q, k, v = qkv(layout, b=2, h=2, seed=9)
    n, video = layout.num_tokens, layout.video_tokens
    for bad in ([n, 0], [n, -4], [n + 1, n], [n, video - 1]):
        with pytest.raises(ValueError, match=rf"kv_valid_len must be in \[{video}, {n}\], got values in "
                                             r".*only the text after the video may be padding"):
            sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(block_size=64),
                             state=AttentionState(num_steps=num_steps), kv_valid_len=torch.tensor(bad))
    out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(block_size=64),
                           kv_valid_len=torch.tensor([n, video]))  # the whole text padded: allowed
    assert torch.isfinite(out).all()
