import torch

from _helpers import random_block_mask
from rainfusion.permutation import token_order
from rainfusion.layout import VideoLayout
from rainfusion.reference import attention_recall, cosine_similarity, relative_l2, token_mask


def test_attention_recall_is_the_dense_mass_inside_the_permuted_mask():
    layout = VideoLayout(3, 8, 12, text_len=10, text_position="after")
    n = layout.num_tokens
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 2, n, 8, generator=g) for _ in range(2))
    order = token_order(layout, "window3d")
    mask = random_block_mask(2, 2, n, n, 64, generator=g)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8**0.5, -1)
    # the mask lives on permuted tokens: map it back to the original order by hand
    allowed = token_mask(mask)[:, :, order.inverse][:, :, :, order.inverse]
    want = (probs * allowed).sum(-1).mean(-1)
    got = attention_recall(q, k, mask, order.inverse, scale=8**-0.5)
    assert torch.allclose(got, want, atol=1e-10)
    rows = torch.tensor([0, 5, n - 1])
    got_rows = attention_recall(q, k, mask, order.inverse, scale=8**-0.5, rows=rows)
    assert torch.allclose(got_rows, (probs * allowed)[:, :, rows].sum(-1).mean(-1), atol=1e-10)


def test_metrics():
    x = torch.randn(100)
    assert relative_l2(x, x) == 0 and abs(cosine_similarity(x, x) - 1) < 1e-12
    assert abs(relative_l2(2 * x, x) - 1) < 1e-12 and abs(cosine_similarity(-x, x) + 1) < 1e-12
