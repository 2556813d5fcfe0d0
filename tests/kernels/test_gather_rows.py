"""The Triton row gather (CUDA path of gather_tokens) against index_select / gather, and the
row gather and block means launching on their input's device."""

import pytest
import torch

pytest.importorskip("triton")
from _helpers import DEVICE  # noqa: E402
from rainfusion.kernels.block_means import block_means_triton  # noqa: E402
from rainfusion.kernels.gather_rows import gather_rows_triton  # noqa: E402


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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (a launch on the second GPU while the first is current)")
@pytest.mark.parametrize("bnhd", [False, True])
def test_gpu_gather_rows_and_block_means_run_on_the_input_device(bnhd):
    """x and index on cuda:1 while cuda:0 is current: gather_rows_triton (shared and per-head
    index) and block_means_triton (with and without index, a tail block) return on cuda:1 what
    the same calls return on cuda:0; the current device stays cuda:0."""
    b, h, n, d, bs = 2, 3, 1000, 128, 128
    g = torch.Generator().manual_seed(12)
    x = torch.randn((b, n, h, d) if bnhd else (b, h, n, d), generator=g).to(torch.bfloat16)
    x = x.transpose(1, 2) if bnhd else x
    shared = torch.randperm(n, generator=g)
    per_head = torch.stack([torch.randperm(n, generator=g) for _ in range(b * h)]).view(b, h, n)
    on = {}
    for device in ("cuda:0", "cuda:1"):
        xd, shared_d, per_head_d = x.to(device), shared.to(device), per_head.to(device)
        with torch.cuda.device(0):
            outs = [gather_rows_triton(xd, shared_d), gather_rows_triton(xd, per_head_d),
                    block_means_triton(xd, bs), block_means_triton(xd, bs, shared_d)]
            torch.cuda.synchronize(device)
            assert torch.cuda.current_device() == 0
        assert all(out.device == torch.device(device) for out in outs)
        on[device] = [out.cpu() for out in outs]
    assert torch.equal(on["cuda:0"][0], x.index_select(2, shared))
    for got, want in zip(on["cuda:1"], on["cuda:0"]):
        assert torch.equal(got, want)
