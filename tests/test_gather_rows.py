"""The Triton row gather (CUDA path of gather_tokens) against index_select / gather."""

import pytest
import torch

pytest.importorskip("triton")
from rainfusion.kernels.gather_rows import gather_rows_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,d,bnhd", [(300, 64, False), (257, 96, True), (1000, 128, False)])
def test_gather_rows_matches_torch(n, d, bnhd):
    g = torch.Generator().manual_seed(n)
    shape = (2, n, 3, d) if bnhd else (2, 3, n, d)
    x = torch.randn(shape, generator=g).to(DEVICE)
    x = x.transpose(1, 2) if bnhd else x
    shared = torch.randperm(n, generator=g).to(DEVICE)
    out = gather_rows_triton(x, shared)
    assert torch.equal(out, x.index_select(2, shared))
    assert out.stride() == x.stride()  # same memory layout as the input
    per_head = torch.stack([torch.randperm(n, generator=g) for _ in range(6)]).view(2, 3, n).to(DEVICE)
    want = torch.gather(x, 2, per_head.unsqueeze(-1).expand(2, 3, n, d))
    assert torch.equal(gather_rows_triton(x, per_head), want)


def test_gather_rows_is_a_custom_op():
    x = torch.randn(1, 2, 130, 64, device=DEVICE)
    index = torch.randperm(130, device=DEVICE)
    torch.library.opcheck(torch.ops.rainfusion.gather_rows.default, (x, index))
