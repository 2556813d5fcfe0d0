"""Shared test helpers: random block masks (every row kind), random q/k/v and masks on the test
device, the float64 oracle of the block-sparse kernels with its tolerances, and the sm_90 compile
report of benchmarks/kernel_report.py.

Tolerances (relative L2 against float64): float32 1e-5 (observed ~3e-7; float32 rounding over a
few hundred keys), float16 2e-3 and bfloat16 1.5e-2 (P is rounded to the input dtype before the
PV product and the output is rounded once: ~2^-11 and ~2^-8 relative). At realistic sizes on a
GPU the rule is: our error <= 2 x torch SDPA's error at the same dtype + 1e-3 (``sdpa_error``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

from rainfusion.mask import BlockSparseMask, key_padding_mask, num_blocks
from rainfusion.reference import masked_attention, relative_l2, token_mask

ON_GPU = torch.cuda.is_available()
# Where the kernel tests run: the GPU, else the CPU (Triton's interpreter, see tests/conftest.py).
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Relative L2 error against the float64 oracle, per input dtype (module docstring).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def random_block_mask(batch: int, heads: int, q_len: int, kv_len: int, block_size: int, *,
                      density: float = 0.4, generator: torch.Generator | None = None) -> BlockSparseMask:
    """A BlockSparseMask with random kept blocks, plus one full and one empty row when possible."""
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    dense = torch.rand(batch, heads, qb, kb, generator=generator) < density
    if qb >= 3:
        dense[:, :, 0] = True  # full row
        dense[:, :, 1] = False  # empty row
    return BlockSparseMask.from_dense(dense, q_len=q_len, kv_len=kv_len, block_size=block_size)


def case_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel case runs in: float32 runs only in the interpreter (which multiplies
    bfloat16 ``tl.dot`` operands as raw bits); on a GPU the same case runs in bfloat16."""
    return torch.bfloat16 if ON_GPU and dtype == torch.float32 else dtype


def qkv(b: int, h: int, q_len: int, kv_len: int, d: int, dtype: torch.dtype, *, seed: int = 0,
        bnhd: bool = False, device: torch.device | str | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [B, H, Nq, D] and k, v [B, H, Nk, D] on ``device`` (default DEVICE); with
    ``bnhd``, views of [B, N, H, D] memory."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (q_len, kv_len, kv_len):
        shape = (b, n, h, d) if bnhd else (b, h, n, d)
        t = torch.randn(shape, generator=g).to(device=DEVICE if device is None else device, dtype=dtype)
        out.append(t.transpose(1, 2) if bnhd else t)
    return tuple(out)


def block_mask(b: int, h: int, q_len: int, kv_len: int, block_size: int, *, density: float = 0.4,
               seed: int = 0, device: torch.device | str | None = None) -> BlockSparseMask:
    """``random_block_mask`` on ``device`` (default DEVICE): a full and an empty row when there
    are >= 3 query blocks."""
    m = random_block_mask(b, h, q_len, kv_len, block_size, density=density,
                          generator=torch.Generator().manual_seed(seed))
    device = DEVICE if device is None else device
    return BlockSparseMask(m.counts.to(device), m.indices.to(device), q_len, kv_len, block_size)


def allowed_tokens(q: torch.Tensor, k: torch.Tensor, mask: BlockSparseMask,
                   kv_valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, H, Nq, Nk]: the block mask in tokens, keys past kv_valid_len[b] excluded."""
    allowed = token_mask(mask.expand(*q.shape[:2]))
    return allowed if kv_valid_len is None else allowed & key_padding_mask(kv_valid_len, k.shape[2])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float,
              kv_valid_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle: output [B, H, Nq, D] and natural log-sum-exp [B, H, Nq] (-inf for
    rows that see no key)."""
    allowed = allowed_tokens(q, k, mask, kv_valid_len)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return masked_attention(q, k, v, allowed, scale=scale), lse


def sdpa_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
               want: torch.Tensor) -> float:
    """Relative L2 error of torch SDPA at the input dtype against ``want`` (empty rows -> 0, like
    the kernels)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return relative_l2(out.nan_to_num(0.0), want)


def assert_lse_close(lse: torch.Tensor, want: torch.Tensor, atol: float = 1e-3) -> None:
    """A kernel's log-sum-exp: float32 of the oracle's shape, -inf exactly on the oracle's empty
    rows, within ``atol`` elsewhere."""
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    empty = torch.isinf(want)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse.double()[~empty], want[~empty], rtol=0, atol=atol)


def kernel_report(args: list[str]) -> tuple[int, int, int, str]:
    """(registers, stack bytes, shared memory bytes, output) of benchmarks/kernel_report.py with
    ``args``, run in a process without the interpreter (it compiles for sm_90 with Triton's own
    ptxas; no GPU needed). The SASS goes to build/kernel-<args>/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(root, "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = os.path.join(root, "build", "kernel-" + "-".join(a.strip("-") for a in args))
    report = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_report.py"), *args, "--out", out],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    found = re.search(r"(\d+) registers, stack (\d+) B, shared memory (\d+) B", report.stdout)
    assert found, report.stdout
    return int(found.group(1)), int(found.group(2)), int(found.group(3)), report.stdout
