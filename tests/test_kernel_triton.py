"""The Triton block-sparse forward against the float64 oracle.

Without CUDA the kernel runs under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before triton is first imported). The interpreter
multiplies bfloat16 operands of ``tl.dot`` as raw bits, so on CPU the small cases run in float32
and float16; on a GPU the float32 cases run in bfloat16 instead.

Tolerances (relative L2 against float64): float32 1e-5 (observed ~3e-7; float32 rounding over
a few hundred keys), float16 2e-3 and bfloat16 1.5e-2 (P is rounded to the input dtype before
the PV product and the output is rounded once: ~2^-11 and ~2^-8 relative). The GPU tests at
realistic sizes use the rule: our error <= 2 x torch SDPA's error at the same dtype + 1e-3.
On Hopper the Gluon kernel would take most cases; here it is switched off so that these tests
cover the Triton kernel (tests/test_kernel_gluon.py covers the Gluon one).
"""

import math

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
triton = pytest.importorskip("triton")
from triton.runtime import JITFunction  # noqa: E402

if not ON_GPU and isinstance(triton.language.zeros, JITFunction):
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")

from masks import random_block_mask  # noqa: E402
from rainfusion.kernels import block_sparse  # noqa: E402
from rainfusion.kernels.block_sparse import block_sparse_attention_triton  # noqa: E402
from rainfusion.mask import BlockSparseMask  # noqa: E402
from rainfusion.reference import key_padding_mask, masked_attention, relative_l2, token_mask  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def triton_kernel_only(monkeypatch):
    monkeypatch.setattr(block_sparse, "USE_GLUON_ON_HOPPER", False)


def _dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 runs only in the interpreter; on a GPU the same case runs in bfloat16."""
    return torch.bfloat16 if ON_GPU and dtype == torch.float32 else dtype


def _qkv(b: int, h: int, q_len: int, kv_len: int, d: int, dtype: torch.dtype, *, seed: int = 0,
         bnhd: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [B, H, Nq, D] and k, v [B, H, Nk, D]; with ``bnhd``, views of [B, N, H, D] memory."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (q_len, kv_len, kv_len):
        shape = (b, n, h, d) if bnhd else (b, h, n, d)
        t = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
        out.append(t.transpose(1, 2) if bnhd else t)
    return tuple(out)


def _mask(b: int, h: int, q_len: int, kv_len: int, block_size: int, *, density: float = 0.4,
          seed: int = 0) -> BlockSparseMask:
    """random_block_mask on DEVICE (a full and an empty row when there are >= 3 query blocks)."""
    m = random_block_mask(b, h, q_len, kv_len, block_size, density=density,
                          generator=torch.Generator().manual_seed(seed))
    return BlockSparseMask(m.counts.to(DEVICE), m.indices.to(DEVICE), q_len, kv_len, block_size)


def _allowed(q: torch.Tensor, k: torch.Tensor, mask: BlockSparseMask,
             kv_valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, H, Nq, Nk]: the block mask in tokens, keys past kv_valid_len[b] excluded."""
    allowed = token_mask(mask.expand(*q.shape[:2]))
    return allowed if kv_valid_len is None else allowed & key_padding_mask(kv_valid_len, k.shape[2])


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float,
               kv_valid_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 output [B, H, Nq, D] and natural log-sum-exp [B, H, Nq] (-inf for empty rows)."""
    allowed = _allowed(q, k, mask, kv_valid_len)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return masked_attention(q, k, v, allowed, scale=scale), lse


def _assert_lse_close(lse: torch.Tensor, want: torch.Tensor, atol: float = 1e-3) -> None:
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    empty = torch.isinf(want)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse.double()[~empty], want[~empty], rtol=0, atol=atol)


@pytest.mark.parametrize(
    "b, q_len, kv_len, d, block_size, dtype",
    [
        (1, 300, 300, 64, 64, torch.float32),
        (2, 257, 257, 128, 128, torch.float32),
        (1, 150, 150, 96, 128, torch.float16),
        (2, 300, 300, 96, 64, torch.float32),
        (1, 257, 150, 64, 64, torch.float16),  # cross attention: Nq != Nk
    ],
)
def test_matches_reference(b, q_len, kv_len, d, block_size, dtype):
    dtype = _dtype(dtype)
    q, k, v = _qkv(b, 2, q_len, kv_len, d, dtype, seed=d + q_len)
    mask = _mask(b, 2, q_len, kv_len, block_size, seed=q_len)
    if mask.q_blocks >= 3:  # random_block_mask forces a full and an empty row
        assert (mask.counts == 0).any() and (mask.counts == mask.kv_blocks).any()
        assert mask.indices.shape[-1] < mask.kv_blocks
    scale = d**-0.5
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=scale, return_lse=True)
    want, want_lse = _reference(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert relative_l2(out, want) < TOLERANCE[dtype]
    _assert_lse_close(lse, want_lse)
    assert torch.equal(block_sparse_attention_triton(q, k, v, mask, scale=scale), out)


def test_full_and_empty_rows_with_an_empty_table():
    """Rows are all full or empty: the index table has width 0 and is never read."""
    n, bs = 300, 64
    q, k, v = _qkv(1, 2, n, n, 64, _dtype(torch.float32), seed=1)
    counts = torch.tensor([5, 0, 5, 0, 0], dtype=torch.int32, device=DEVICE).expand(1, 2, 5)
    mask = BlockSparseMask(counts, torch.empty(1, 2, 5, 0, dtype=torch.int32, device=DEVICE), n, n, bs)
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=0.125, return_lse=True)
    want, want_lse = _reference(q, k, v, mask, 0.125)
    assert relative_l2(out, want) < TOLERANCE[out.dtype]
    assert torch.equal(out[:, :, 64:128], torch.zeros_like(out[:, :, 64:128]))
    _assert_lse_close(lse, want_lse)


def test_bnhd_views_broadcast_mask_and_kv_valid_len():
    """[B, N, H, D] memory is read in place and the output keeps it; a [1, 1, ...] mask is
    broadcast with stride 0; keys past kv_valid_len are ignored and a batch item with no valid
    key gives 0 (lse -inf)."""
    b, h, n, d = 3, 2, 257, 64
    q, k, v = _qkv(b, h, n, n, d, _dtype(torch.float32), seed=3, bnhd=True)
    mask = _mask(1, 1, n, n, 128, density=0.7, seed=3)
    kv_valid_len = torch.tensor([n, 70, 0], dtype=torch.int32, device=DEVICE)
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kv_valid_len=kv_valid_len,
                                             return_lse=True)
    assert out.shape == (b, h, n, d) and out.transpose(1, 2).is_contiguous()
    want, want_lse = _reference(q, k, v, mask, d**-0.5, kv_valid_len)
    assert relative_l2(out, want) < TOLERANCE[out.dtype]
    assert not out.isnan().any() and torch.equal(out[2], torch.zeros_like(out[2]))
    _assert_lse_close(lse, want_lse)


def test_custom_op_registration():
    n = 150
    q, k, v = _qkv(1, 2, n, n, 64, _dtype(torch.float32), seed=4)
    mask = _mask(1, 2, n, n, 64, seed=4)
    valid = torch.tensor([100], dtype=torch.int32, device=DEVICE)
    for return_lse in (False, True):
        torch.library.opcheck(
            torch.ops.rainfusion.block_sparse_attention_triton.default,
            (q, k, v, mask.counts, mask.indices, valid, 64, 0.125, return_lse),
        )
    compiled = torch.compile(
        lambda q, k, v: block_sparse_attention_triton(q, k, v, mask, scale=0.125),
        fullgraph=True, backend="aot_eager",
    )
    assert torch.equal(compiled(q, k, v), block_sparse_attention_triton(q, k, v, mask, scale=0.125))


def _valid_args() -> dict:
    q, k, v = _qkv(1, 2, 150, 150, 64, _dtype(torch.float32))
    return dict(query=q, key=k, value=v, mask=_mask(1, 2, 150, 150, 64))


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update({n: a[n][..., :32] for n in ("query", "key", "value")}), ValueError,
         r"query head dim must be one of \(64, 96, 128\), got 32"),
        (lambda a: a.update(query=a["query"][0]), ValueError, r"query must be 4-D \[B, heads, N, D\]"),
        (lambda a: a.update(key="k"), TypeError, "key must be a torch.Tensor, got str"),
        (lambda a: a.update(value=a["value"].double()), TypeError, "value has dtype torch.float64"),
        (lambda a: a.update(query=a["query"].int(), key=a["key"].int(), value=a["value"].int()), TypeError,
         "query must be float16, bfloat16, float32 or float64"),
        (lambda a: a.update(query=a["query"].double(), key=a["key"].double(), value=a["value"].double()),
         TypeError, "query dtype must be one of"),
        (lambda a: a.update(key=a["key"].to("meta")), ValueError, "key is on meta"),
        (lambda a: a.update(value=a["value"][:, :, :100]), ValueError, "value has 100 tokens, but key has 150"),
        (lambda a: a.update(mask=a["mask"].to_dense()), TypeError, "mask must be a BlockSparseMask, got Tensor"),
        (lambda a: a.update(mask=_mask(1, 2, 256, 256, 64)), ValueError, "mask is for q_len x kv_len = 256 x 256"),
        (lambda a: a.update(mask=_mask(1, 3, 150, 150, 64)), ValueError, "batch x heads = 1 x 3, expected 1 x 2"),
        (lambda a: a.update(kv_valid_len=_int32(5).float()), TypeError,
         "kv_valid_len must be an int32 or int64 tensor, got torch.float32"),
        (lambda a: a.update(kv_valid_len=_int32(5, 5)), ValueError, r"kv_valid_len must have shape \[1\]"),
    ],
)
def test_rejects_bad_inputs(change, error, match):
    args = _valid_args()
    change(args)
    with pytest.raises(error, match=match):
        block_sparse_attention_triton(**args, scale=0.125)


def test_rejects_cpu_tensors_for_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(block_sparse, "INTERPRETED", False)
    q, k, v = _qkv(1, 2, 150, 150, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="query is on .*: the Triton kernel needs CUDA tensors"):
        block_sparse_attention_triton(q.cpu(), k.cpu(), v.cpu(), random_block_mask(1, 2, 150, 150, 64), scale=0.125)


# --- GPU, realistic sizes ------------------------------------------------------------------


def _sdpa_error(q, k, v, allowed, scale, want) -> float:
    """Relative L2 error of torch SDPA at the input dtype (empty rows -> 0, like ours)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return relative_l2(out.nan_to_num(0.0), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dense_matches_sdpa(dtype, d):
    b, h, n = 2, 4, 4000
    q, k, v = _qkv(b, h, n, n, d, dtype, seed=d)
    dense = torch.ones(1, 1, math.ceil(n / 128), math.ceil(n / 128), dtype=torch.bool, device="cuda")
    mask = BlockSparseMask.from_dense(dense, q_len=n, kv_len=n, block_size=128)
    out = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    want = masked_attention(q, k, v, scale=d**-0.5)
    sdpa = relative_l2(F.scaled_dot_product_attention(q, k, v, scale=d**-0.5), want)
    assert relative_l2(out, want) <= 2 * sdpa + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, block_size, n", [(64, 64, 4111), (128, 128, 4000), (96, 128, 3001)])
def test_gpu_sparse_matches_reference(dtype, d, block_size, n):
    b, h = 2, 2
    q, k, v = _qkv(b, h, n, n, d, dtype, seed=n)
    mask = _mask(b, h, n, n, block_size, density=0.3, seed=n)
    out = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    allowed = token_mask(mask)
    want = masked_attention(q, k, v, allowed, scale=d**-0.5)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, allowed, d**-0.5, want) + 1e-3


@pytest.mark.gpu
def test_gpu_bnhd_kv_valid_len_and_lse():
    b, h, n, d = 2, 4, 4000, 128
    q, k, v = _qkv(b, h, n, n, d, torch.bfloat16, seed=5, bnhd=True)
    mask = _mask(1, h, n, n, 128, density=0.4, seed=5)
    kv_valid_len = torch.tensor([n, 3333], dtype=torch.int32, device="cuda")
    out, lse = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kv_valid_len=kv_valid_len,
                                             return_lse=True)
    assert out.transpose(1, 2).is_contiguous()
    want, want_lse = _reference(q, k, v, mask, d**-0.5, kv_valid_len)
    allowed = _allowed(q, k, mask, kv_valid_len)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, allowed, d**-0.5, want) + 1e-3
    _assert_lse_close(lse, want_lse, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_logits_stay_finite(dtype):
    b, h, n, d = 1, 2, 4000, 64
    q, k, v = _qkv(b, h, n, n, d, dtype, seed=6)
    q, k = q * 100, k * 100
    mask = _mask(b, h, n, n, 128, density=0.5, seed=6)
    out = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    assert torch.isfinite(out).all()
    allowed = token_mask(mask)
    want = masked_attention(q, k, v, allowed, scale=d**-0.5)
    assert relative_l2(out, want) <= 2 * _sdpa_error(q, k, v, allowed, d**-0.5, want) + 1e-3


@pytest.mark.gpu
def test_gpu_deterministic_and_compiles():
    b, h, n, d = 2, 4, 4000, 128
    q, k, v = _qkv(b, h, n, n, d, torch.bfloat16, seed=7)
    mask = _mask(b, h, n, n, 128, density=0.3, seed=7)
    out = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    assert torch.equal(out, block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5))
    compiled = torch.compile(lambda q, k, v: block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5),
                             fullgraph=True)
    assert torch.equal(compiled(q, k, v), out)


@pytest.mark.gpu
def test_gpu_rejects_float32():
    q, k, v = _qkv(1, 2, 150, 150, 64, torch.float32)
    with pytest.raises(TypeError, match="query dtype must be one of"):
        block_sparse_attention_triton(q, k, v, _mask(1, 2, 150, 150, 64), scale=0.125)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_fits_two_programs_per_h100_sm(head_dim):
    """Kernel v3's design (benchmarks/NOTES.md): two programs share an SM, so each needs <= 128
    registers per thread at 8 warps and at most half of the 228 KB of shared memory. Compiled for
    sm_90 by Triton's own ptxas, no GPU needed (in a process without the interpreter)."""
    registers, _, shared, _ = kernel_report(["--head-dim", str(head_dim)])
    assert registers <= 128 and shared <= 228 * 1024 // 2 - 1024


def kernel_report(args: list[str]) -> tuple[int, int, int, str]:
    """(registers, stack bytes, shared memory bytes, output) of benchmarks/kernel_report.py, run
    in a process without the interpreter (it compiles for sm_90 with Triton's own ptxas)."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(root, "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = os.path.join(root, "build", "kernel-" + "-".join(a.strip("-") for a in args))
    report = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_report.py"), *args, "--out", out],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    found = re.search(r"(\d+) registers, stack (\d+) B, shared memory (\d+) B", report.stdout)
    return int(found.group(1)), int(found.group(2)), int(found.group(3)), report.stdout
