"""FlashAttention-4's block-sparse forward fed our masks (GPU with flash-attn-4 only)."""

import pytest
import torch

from _helpers import random_block_mask
from rainfusion.kernels.fa4 import block_sparse_attention_fa4, dense_attention_fa4, fa4_available
from rainfusion.mask import BlockSparseMask
from rainfusion.reference import masked_attention, relative_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not fa4_available(), reason="needs flash-attn-4 on an SM90+ GPU")]


def _qkv(n, h=4, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    bnhd = [torch.randn(1, n, h, d, generator=g).to("cuda", torch.bfloat16) for _ in range(3)]
    return [t.transpose(1, 2) for t in bnhd]


@pytest.mark.parametrize("n,d", [(4096, 128), (4000, 128), (3001, 64)])
def test_fa4_block_sparse_matches_the_masked_reference(n, d):
    q, k, v = _qkv(n, d=d, seed=n)
    m = random_block_mask(1, 4, n, n, 128, density=0.3, generator=torch.Generator().manual_seed(n))
    mask = BlockSparseMask(m.counts.cuda(), m.indices.cuda(), n, n, 128)
    out = block_sparse_attention_fa4(q, k, v, mask, scale=d**-0.5)
    want = masked_attention(q, k, v, mask)
    assert relative_l2(out, want) < 1.5e-2
    assert torch.equal(out[:, :, 128:256], torch.zeros_like(out[:, :, 128:256]))  # the empty row


def test_fa4_dense_matches_sdpa():
    q, k, v = _qkv(3000)
    out = dense_attention_fa4(q, k, v, scale=128**-0.5)
    assert relative_l2(out, masked_attention(q, k, v)) < 1.5e-2


def test_auto_picks_fa4_and_sparse_attention_runs_on_it():
    from rainfusion import AttentionState, RainFusion2Config, VideoLayout, sparse_attention

    layout = VideoLayout(5, 16, 32, text_len=40, text_position="after")
    q, k, v = _qkv(layout.num_tokens)
    state = AttentionState()
    out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(), state=state)
    assert state.stats.backend == "fa4"
    triton_out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(), backend="triton")
    assert relative_l2(out, triton_out) < 1e-2


def test_dense_warmup_steps_run_on_fa4():
    from rainfusion import AttentionState, RainFusion2Config, VideoLayout, sparse_attention

    layout = VideoLayout(5, 16, 32, text_len=40, text_position="after")
    q, k, v = _qkv(layout.num_tokens)
    state = AttentionState(num_steps=10)  # step 0 of 3 warm-up steps
    out = sparse_attention(q, k, v, layout=layout, config=RainFusion2Config(), state=state)
    assert state.stats.dense and state.stats.backend == "fa4"
    assert relative_l2(out, masked_attention(q, k, v)) < 1.5e-2
