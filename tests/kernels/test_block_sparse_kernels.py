"""Both block-sparse forward kernels, Triton (``_block_sparse_fwd``) and Gluon for Hopper
(``_block_sparse_fwd_gluon``), against one float64 oracle: they implement one mask-row contract
(rainfusion/mask.py), so every case runs once per kernel that takes its shape.

Each case calls the launcher with ``kernel=<param>``, so the kernel under test is the one that ran
("gluon" raises where it cannot run, it never falls back). The "gluon" parameter is marked ``gpu``
and skipped unless the GPU is sm_90 and the Gluon kernel was tested on this Triton release
(``GLUON_SKIP``); it is generated only for the shapes the Gluon kernel takes (head dim in
GLUON_HEAD_DIMS, 128-token blocks: ``kernel_params``). Cases declared float32 run in float32 under
Triton's interpreter on CPU (tests/conftest.py) and in bfloat16 on a GPU (``case_dtype``), where
the Gluon kernel takes them. Tolerances: tests/_helpers.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from triton.runtime import JITFunction  # noqa: E402

from _helpers import (  # noqa: E402
    DEVICE,
    ON_GPU,
    TOLERANCE,
    allowed_tokens,
    assert_lse_close,
    block_mask,
    case_dtype,
    kernel_report,
    qkv,
    random_block_mask,
    reference,
    sdpa_error,
)
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout  # noqa: E402
from rainfusion.kernels import block_sparse  # noqa: E402
from rainfusion.kernels.block_sparse import block_sparse_attention_triton  # noqa: E402
from rainfusion.mask import BlockSparseMask  # noqa: E402
from rainfusion.methods import plan_attention  # noqa: E402
from rainfusion.permutation import is_known_permutation  # noqa: E402
from rainfusion.reference import masked_attention, relative_l2  # noqa: E402

if not ON_GPU and isinstance(triton.language.zeros, JITFunction):
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")


def _gluon_skip_reason() -> str | None:
    """Why the Gluon kernel cannot be tested on this machine, or None when it can."""
    why = []
    if not ON_GPU:
        why.append("it needs an sm_90 (Hopper) GPU and there is no CUDA GPU here")
    elif torch.cuda.get_device_capability() != (9, 0):
        major, minor = torch.cuda.get_device_capability()
        why.append(f"it needs an sm_90 (Hopper) GPU and this one is sm_{major}{minor}")
    if not block_sparse.gluon_tested_on(triton.__version__):
        why.append(f"it is tested on Triton {', '.join(block_sparse.GLUON_TRITON_RELEASES)} only and this is "
                   f"Triton {triton.__version__}")
    return "the Gluon kernel is not tested here: " + "; ".join(why) if why else None


GLUON_SKIP = _gluon_skip_reason()
GLUON = pytest.param("gluon", id="gluon", marks=[
    pytest.mark.gpu, pytest.mark.skipif(GLUON_SKIP is not None, reason=GLUON_SKIP or "")])
TRITON = pytest.param("triton", id="triton")
# The log-sum-exp bounds the two kernels were held to at realistic sizes.
LSE_ATOL = {"triton": 1e-3, "gluon": 2e-3}


def kernel_params(head_dim: int, block_size: int) -> list:
    """The ``kernel`` values for a case of this shape: "triton" always, "gluon" (gpu-marked,
    skipped with GLUON_SKIP) only where the Gluon kernel takes the shape."""
    gluon_takes_it = head_dim in block_sparse.GLUON_HEAD_DIMS and block_size == 128
    return [TRITON, GLUON] if gluon_takes_it else [TRITON]


def with_kernels(rows: list[tuple], shape) -> list:
    """Each row (one case's values) once per kernel of ``kernel_params(*shape(*row))``, the kernel
    as the last value."""
    params = []
    for row in rows:
        for kernel in kernel_params(*shape(*row)):
            params.append(pytest.param(*row, *kernel.values, marks=kernel.marks))
    return params


def attend(q, k, v, mask, kernel, **kwargs):
    """The launcher with ``kernel``; the softmax scale is 1/sqrt(D)."""
    assert block_sparse._use_gluon(q, k, v, mask.block_size, kernel) == (kernel == "gluon")
    return block_sparse_attention_triton(q, k, v, mask, scale=q.shape[-1] ** -0.5, kernel=kernel, **kwargs)


def assert_matches_sdpa_rule(out, q, k, v, mask, kv_valid_len=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Our error <= 2 x SDPA's at the same dtype + 1e-3 (float64 oracle); returns the oracle."""
    want, want_lse = reference(q, k, v, mask, q.shape[-1] ** -0.5, kv_valid_len)
    allowed = allowed_tokens(q, k, mask, kv_valid_len)
    assert relative_l2(out, want) <= 2 * sdpa_error(q, k, v, allowed, q.shape[-1] ** -0.5, want) + 1e-3
    return want, want_lse


# --- small cases: CPU (Triton's interpreter) for "triton", GPU for both ----------------------


@pytest.mark.parametrize("b, q_len, kv_len, d, block_size, dtype, kernel", with_kernels([
    (1, 300, 300, 64, 64, torch.float32),
    (2, 257, 257, 128, 128, torch.float32),
    (1, 150, 150, 96, 128, torch.float16),
    (2, 300, 300, 96, 64, torch.float32),
    (1, 257, 150, 64, 64, torch.float16),  # cross attention: Nq != Nk
], shape=lambda b, q_len, kv_len, d, block_size, dtype: (d, block_size)))
def test_matches_reference(b, q_len, kv_len, d, block_size, dtype, kernel):
    """Shapes with tails, full and empty rows, a narrow table: output and lse match the oracle,
    the output is contiguous in the input dtype, and a second call (no lse) is bitwise equal."""
    dtype = case_dtype(dtype)
    q, k, v = qkv(b, 2, q_len, kv_len, d, dtype, seed=d + q_len)
    mask = block_mask(b, 2, q_len, kv_len, block_size, seed=q_len)
    if mask.q_blocks >= 3:  # random_block_mask forces a full and an empty row
        assert (mask.counts == 0).any() and (mask.counts == mask.kv_blocks).any()
        assert mask.indices.shape[-1] < mask.kv_blocks
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    want, want_lse = reference(q, k, v, mask, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert relative_l2(out, want) < TOLERANCE[dtype]
    assert_lse_close(lse, want_lse)
    assert torch.equal(attend(q, k, v, mask, kernel), out)


@pytest.mark.parametrize("b, n, d, per_head, kernel", with_kernels([
    (1, 300, 64, False), (2, 257, 128, True),
], shape=lambda b, n, d, per_head: (d, 128)))
def test_token_order_attends_the_gathered_tokens(b, n, d, per_head, kernel):
    """token_order (one order, or one per head; tails): the output is bitwise that of the
    gathered q, k, v, with lse and valid-key limits, and with restore_order the same rows stored
    back at the tokens' own positions; malformed orders are refused."""
    q, k, v = qkv(b, 2, n, n, d, case_dtype(torch.float32), seed=n)
    g = torch.Generator().manual_seed(n)
    order = (torch.stack([torch.randperm(n, generator=g) for _ in range(b * 2)]).view(b, 2, n) if per_head
             else torch.randperm(n, generator=g)).to(DEVICE)
    gathered = [torch.gather(t, 2, order.expand(b, 2, n)[..., None].expand(-1, -1, -1, d)) for t in (q, k, v)]
    mask = block_mask(b, 2, n, n, 128, seed=n)
    kv_valid_len = torch.full((b,), n - 40, dtype=torch.int32, device=DEVICE)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True, kv_valid_len=kv_valid_len, token_order=order)
    want, want_lse = attend(*gathered, mask, kernel, return_lse=True, kv_valid_len=kv_valid_len)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    restored, restored_lse = attend(q, k, v, mask, kernel, return_lse=True, kv_valid_len=kv_valid_len,
                                    token_order=order, restore_order=True)
    rows = order.expand(b, 2, n)
    assert torch.equal(torch.gather(restored, 2, rows[..., None].expand(-1, -1, -1, d)), want)
    assert torch.equal(torch.gather(restored_lse, 2, rows), want_lse)
    with pytest.raises(ValueError, match="restore_order=True .* needs a token_order"):
        attend(q, k, v, mask, kernel, restore_order=True)
    with pytest.raises(TypeError, match="token_order must be an int64 tensor"):
        attend(q, k, v, mask, kernel, token_order=order.int())
    with pytest.raises(ValueError, match=r"token_order must be \[N\] or \[B, H, N\] with N = Nq = Nk"):
        attend(q, k, v, mask, kernel, token_order=order[..., :-1])


def test_restore_order_refuses_an_order_that_is_not_a_permutation():
    """restore_order writes output row token_order[i]: an order with a repeated token (so one
    missing) is refused, checked once per tensor (then known) and again after an in-place change;
    a plan's order is known from the start (no check, no host sync); without restore_order a
    repeated token is a plain gather (the output of the gathered tokens)."""
    n, d = 300, 64
    q, k, v = qkv(1, 2, n, n, d, case_dtype(torch.float32), seed=7)
    mask = block_mask(1, 2, n, n, 128, seed=7)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert not is_known_permutation(order)
    attend(q, k, v, mask, "triton", token_order=order, restore_order=True)
    assert is_known_permutation(order)  # checked once
    order[5] = order[6]  # in place: now token order[6] twice
    with pytest.raises(ValueError, match=r"token_order must hold each of its N = 300 tokens once .* "
                                         r"restore_order=False"):
        attend(q, k, v, mask, "triton", token_order=order, restore_order=True)
    repeated = order.clone().view(1, 1, n).expand(1, 2, n)  # [B, H, N] too
    with pytest.raises(ValueError, match="token_order must hold each of its N = 300 tokens once"):
        attend(q, k, v, mask, "triton", token_order=repeated, restore_order=True)
    gathered = [t[:, :, order] for t in (q, k, v)]
    assert torch.equal(attend(q, k, v, mask, "triton", token_order=order), attend(*gathered, mask, "triton"))
    layout = VideoLayout(frames=3, height=16, width=24, text_len=64, text_position="after")
    for config in (RainFusionConfig(), RainFusion2Config()):
        x = torch.randn(1, 2, layout.num_tokens, d)
        assert is_known_permutation(plan_attention(x, x, layout, config, d**-0.5).order)


@pytest.mark.parametrize("n, d, block_size, counts, kernel", with_kernels([
    (300, 64, 64, [5, 0, 5, 0, 0]),
    (600, 128, 128, [5, 0, 5, 0, 5]),
], shape=lambda n, d, block_size, counts: (d, block_size)))
def test_full_and_empty_rows_with_an_empty_table(n, d, block_size, counts, kernel):
    """Rows are all full or empty: the index table has width 0 and is never read; empty rows
    give exactly 0 and lse -inf."""
    q, k, v = qkv(1, 2, n, n, d, case_dtype(torch.float32), seed=1)
    counts = torch.tensor(counts, dtype=torch.int32, device=DEVICE).expand(1, 2, 5)
    mask = BlockSparseMask(counts, torch.empty(1, 2, 5, 0, dtype=torch.int32, device=DEVICE), n, n, block_size)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    want, want_lse = reference(q, k, v, mask, d**-0.5)
    assert relative_l2(out, want) < TOLERANCE[out.dtype]
    empty = out[:, :, block_size:2 * block_size]
    assert torch.equal(empty, torch.zeros_like(empty))
    assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("n, d, block_size, kernel", with_kernels([
    (300, 64, 64),
    (600, 128, 128),
], shape=lambda n, d, block_size: (d, block_size)))
def test_reads_only_what_the_mask_row_contract_lists(n, d, block_size, kernel):
    """The mask-row contract (rainfusion/mask.py): a full row (count == kv_blocks) reads no table
    entry and a non-full row reads only its first ``count`` slots. The table holds out-of-range
    values everywhere else; the mask is valid (checked on construction) and the output matches
    the oracle. Rows: full, empty, only the tail block, ``count == width``, two blocks."""
    kb = -(-n // block_size)
    assert kb == 5
    junk = -7
    counts = torch.tensor([[[kb, 0, 1, 3, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[junk, 999, 3], [999, junk, 5], [kb - 1, junk, 999],
                              [0, 2, kb - 1], [1, 3, junk]]]], dtype=torch.int32)
    mask = BlockSparseMask(counts.to(DEVICE), indices.to(DEVICE), n, n, block_size)  # validated
    q, k, v = qkv(2, 2, n, n, d, case_dtype(torch.float32), seed=11)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    want, want_lse = reference(q, k, v, mask, d**-0.5)
    assert relative_l2(out, want) < TOLERANCE[out.dtype]
    assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("n, d, kernel", with_kernels([(257, 64), (257, 128)], shape=lambda n, d: (d, 128)))
def test_bnhd_views_broadcast_mask_and_kv_valid_len(n, d, kernel):
    """[B, N, H, D] memory is read in place and the output keeps it; a [1, 1, ...] mask is
    broadcast with stride 0; keys past kv_valid_len[b] are ignored per batch item (all keys, a
    block edge, inside a block, none): an item with no valid key gives 0 and lse -inf."""
    b, h = 4, 2
    q, k, v = qkv(b, h, n, n, d, case_dtype(torch.float32), seed=3, bnhd=True)
    mask = block_mask(1, 1, n, n, 128, density=0.7, seed=3)
    kv_valid_len = torch.tensor([n, 128, 70, 0], dtype=torch.int32, device=DEVICE)
    out, lse = attend(q, k, v, mask, kernel, kv_valid_len=kv_valid_len, return_lse=True)
    assert out.shape == (b, h, n, d) and out.transpose(1, 2).is_contiguous()
    want, want_lse = reference(q, k, v, mask, d**-0.5, kv_valid_len)
    assert relative_l2(out, want) < TOLERANCE[out.dtype]
    assert not out.isnan().any() and torch.equal(out[3], torch.zeros_like(out[3]))
    assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("n, d, block_size, kernel", with_kernels([(150, 64, 64), (257, 128, 128)],
                                                                  shape=lambda n, d, block_size: (d, block_size)))
def test_custom_op_registration_and_compile(n, d, block_size, kernel):
    """torch.library.opcheck of the custom op (with and without lse, with kv_valid_len), and the
    launcher under torch.compile(fullgraph=True, backend="aot_eager") gives the eager output."""
    q, k, v = qkv(1, 2, n, n, d, case_dtype(torch.float32), seed=4)
    mask = block_mask(1, 2, n, n, block_size, seed=4)
    valid = torch.tensor([100], dtype=torch.int32, device=DEVICE)
    assert block_sparse._use_gluon(q, k, v, block_size, kernel) == (kernel == "gluon")
    for return_lse in (False, True):
        torch.library.opcheck(
            torch.ops.rainfusion.block_sparse_attention_triton.default,
            (q, k, v, mask.counts, mask.indices, valid, block_size, 0.125, return_lse, kernel),
        )
    compiled = torch.compile(
        lambda q, k, v: block_sparse_attention_triton(q, k, v, mask, scale=0.125, kernel=kernel),
        fullgraph=True, backend="aot_eager",
    )
    assert torch.equal(compiled(q, k, v), block_sparse_attention_triton(q, k, v, mask, scale=0.125, kernel=kernel))


# --- kernel choice and input checks (kernel-independent: they come before the kernel runs) ---


def test_gluon_refuses_a_call_it_cannot_run():
    """kernel="gluon" raises where the Gluon kernel cannot run (CPU tensors, or on a GPU head dim
    64 with 64-token blocks) instead of running the Triton kernel; "auto" runs the Triton one."""
    q, k, v = qkv(1, 2, 150, 150, 64, case_dtype(torch.float32), seed=9)
    mask = block_mask(1, 2, 150, 150, 64, seed=9)
    assert block_sparse._gluon_refusal(q, k, v, 64) is not None
    with pytest.raises(ValueError, match=r"kernel='gluon' cannot run this call: it runs on sm_90"):
        block_sparse_attention_triton(q, k, v, mask, scale=0.125, kernel="gluon")
    assert not block_sparse._use_gluon(q, k, v, 64, "auto")
    auto = block_sparse_attention_triton(q, k, v, mask, scale=0.125)
    assert torch.equal(auto, block_sparse_attention_triton(q, k, v, mask, scale=0.125, kernel="triton"))


def test_rejects_an_unknown_kernel():
    q, k, v = qkv(1, 2, 150, 150, 64, case_dtype(torch.float32))
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'gluon', 'triton'\), got 'cuda'"):
        block_sparse_attention_triton(q, k, v, block_mask(1, 2, 150, 150, 64), scale=0.125, kernel="cuda")


def _valid_args() -> dict:
    q, k, v = qkv(1, 2, 150, 150, 64, case_dtype(torch.float32))
    return dict(query=q, key=k, value=v, mask=block_mask(1, 2, 150, 150, 64))


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("kernel", block_sparse.KERNELS)
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
        (lambda a: a.update(mask=block_mask(1, 2, 256, 256, 64)), ValueError,
         "mask is for q_len x kv_len = 256 x 256"),
        (lambda a: a.update(mask=block_mask(1, 3, 150, 150, 64)), ValueError,
         "batch x heads = 1 x 3, expected 1 x 2"),
        (lambda a: a.update(kv_valid_len=_int32(5).float()), TypeError,
         "kv_valid_len must be an int32 or int64 tensor, got torch.float32"),
        (lambda a: a.update(kv_valid_len=_int32(5, 5)), ValueError, r"kv_valid_len must have shape \[1\]"),
    ],
)
def test_rejects_bad_inputs(change, error, match, kernel):
    """Each bad input raises its own error, whichever kernel was asked for (the checks come
    before the kernel choice: "gluon" would otherwise raise its refusal here)."""
    args = _valid_args()
    change(args)
    with pytest.raises(error, match=match):
        block_sparse_attention_triton(**args, scale=0.125, kernel=kernel)


@pytest.mark.parametrize("kernel", block_sparse.KERNELS)
def test_rejects_cpu_tensors_for_the_compiled_kernel(monkeypatch, kernel):
    monkeypatch.setattr(block_sparse, "INTERPRETED", False)
    q, k, v = qkv(1, 2, 150, 150, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="query is on .*: the Triton kernel needs CUDA tensors"):
        block_sparse_attention_triton(q.cpu(), k.cpu(), v.cpu(), random_block_mask(1, 2, 150, 150, 64),
                                      scale=0.125, kernel=kernel)


@pytest.mark.parametrize("shape", [(2, 3, 11), (1, 3, 11), (2, 1, 11), (1, 1, 7)])
def test_longest_rows_first_orders_each_heads_blocks_by_count(shape):
    """The Gluon kernel's schedule: per (batch, head), every query block once, by decreasing
    count, equal counts in block order (a dense mask keeps the grid order); broadcast counts
    expanded to all B x H."""
    b, h = 2, 3
    g = torch.Generator().manual_seed(sum(shape))
    counts = torch.randint(0, 4, shape, generator=g, dtype=torch.int32)  # many ties
    schedule = block_sparse.longest_rows_first(counts, b, h)
    assert schedule.dtype == torch.int32 and schedule.shape == (b * h, shape[-1])
    for bh in range(b * h):
        row = counts.expand(b, h, -1)[bh // h, bh % h].tolist()
        want = sorted(range(len(row)), key=lambda i: (-row[i], i))
        assert schedule[bh].tolist() == want
    dense = torch.full((1, 1, 5), 5, dtype=torch.int32)
    assert torch.equal(block_sparse.longest_rows_first(dense, 1, 2), torch.arange(5, dtype=torch.int32).repeat(2, 1))


@pytest.mark.parametrize("version,tested", [("3.6.0", True), ("3.6.1+git1234", True), ("3.7.1", False),
                                            ("3.9.0", False), ("3.10.0", False), ("4.6.0", False)])
def test_gluon_runs_only_on_the_triton_releases_it_was_tested_on(version, tested):
    assert block_sparse.gluon_tested_on(version) == tested


# --- compiled for sm_90 by Triton's own ptxas (no GPU needed) --------------------------------


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_kernel_fits_two_programs_per_h100_sm(head_dim):
    """Kernel v3's design (benchmarks/NOTES.md): two programs share an SM, so each needs <= 128
    registers per thread at 8 warps and at most half of the 228 KB of shared memory."""
    registers, _, shared, _ = kernel_report(["--head-dim", str(head_dim)])
    assert registers <= 128 and shared <= 228 * 1024 // 2 - 1024


@pytest.mark.skipif(not block_sparse.gluon_tested_on(triton.__version__),
                    reason=f"the Gluon kernel is not enabled on Triton {triton.__version__} "
                           f"(tested on {', '.join(block_sparse.GLUON_TRITON_RELEASES)})")
def test_gluon_kernel_compiles_for_sm90_without_spills():
    _, stack, shared, report = kernel_report(["--gluon"])
    assert stack == 0 and "LDL 0, STL 0" in report and shared <= 227 * 1024, report


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_fp8_prepass_compiles_for_sm90_without_spills(tensor):
    """The FP8 pre-pass's kernel for q, k and V^T uses no local memory (a spill would slow a pass
    that runs at the copy rate)."""
    _, stack, _, report = kernel_report(["--prepass", tensor])
    assert stack == 0 and "LDL 0, STL 0" in report, report


# --- GPU, realistic sizes --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, kernel", with_kernels([(64,), (128,)], shape=lambda d: (d, 128)))
def test_gpu_dense_matches_sdpa(dtype, d, kernel):
    """An all-full mask (no table) is dense attention: within 2 x SDPA's error of float64."""
    b, h, n = 2, 4, 4000
    q, k, v = qkv(b, h, n, n, d, dtype, seed=d)
    dense = torch.ones(1, 1, math.ceil(n / 128), math.ceil(n / 128), dtype=torch.bool, device="cuda")
    mask = BlockSparseMask.from_dense(dense, q_len=n, kv_len=n, block_size=128)
    out = attend(q, k, v, mask, kernel)
    want = masked_attention(q, k, v, scale=d**-0.5)
    sdpa = relative_l2(F.scaled_dot_product_attention(q, k, v, scale=d**-0.5), want)
    assert relative_l2(out, want) <= 2 * sdpa + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, block_size, n, density, bnhd, kernel", with_kernels([
    (64, 64, 4111, 0.3, False),
    (128, 128, 4000, 0.3, False),
    (96, 128, 3001, 0.3, False),
    (128, 128, 4096, 1.0, True),
    (128, 128, 1000, 0.5, False),
    (128, 128, 130, 1.0, True),
], shape=lambda d, block_size, n, density, bnhd: (d, block_size)))
def test_gpu_sparse_matches_reference(dtype, d, block_size, n, density, bnhd, kernel):
    """Random masks with full and empty rows at realistic sizes, contiguous or [B, N, H, D]:
    output within 2 x SDPA's error of float64, lse within the kernel's bound."""
    q, k, v = qkv(2, 3, n, n, d, dtype, seed=n, bnhd=bnhd)
    mask = block_mask(2, 3, n, n, block_size, density=density, seed=n)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    _, want_lse = assert_matches_sdpa_rule(out, q, k, v, mask)
    assert_lse_close(lse, want_lse, atol=LSE_ATOL[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", kernel_params(128, 128))
@pytest.mark.parametrize("b, h, n, kv_valid, mask_batch, density, seed", [
    (2, 4, 4000, [4000, 3333], 1, 0.4, 5),
    (4, 2, 1500, [1300, 1024, 100, 0], 4, 1.0, 128),  # inside a block, a block edge, past the listed blocks, none
    (4, 2, 1500, [1300, 1024, 100, 0], 4, 0.4, 128),
])
def test_gpu_bnhd_kv_valid_len_and_lse(b, h, n, kv_valid, mask_batch, density, seed, kernel):
    """Per-item valid key counts on [B, N, H, D] views (the output keeps that layout), a mask
    broadcast over the batch or per item: within 2 x SDPA's error, lse close, an item with no
    valid key gives exactly 0."""
    d = 128
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, seed=seed, bnhd=True)
    mask = block_mask(mask_batch, h, n, n, 128, density=density, seed=seed)
    kv_valid_len = torch.tensor(kv_valid, dtype=torch.int32, device="cuda")
    out, lse = attend(q, k, v, mask, kernel, kv_valid_len=kv_valid_len, return_lse=True)
    assert out.transpose(1, 2).is_contiguous()
    _, want_lse = assert_matches_sdpa_rule(out, q, k, v, mask, kv_valid_len)
    assert_lse_close(lse, want_lse, atol=LSE_ATOL[kernel])
    for item, valid in enumerate(kv_valid):
        if valid == 0:
            assert torch.equal(out[item], torch.zeros_like(out[item]))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", kernel_params(128, 128))
@pytest.mark.parametrize("q_len, kv_len", [(700, 2000), (2000, 333)])
def test_gpu_query_and_key_lengths_differ(q_len, kv_len, kernel):
    q, k, v = qkv(1, 2, q_len, kv_len, 128, torch.bfloat16, seed=q_len)
    mask = block_mask(1, 2, q_len, kv_len, 128, density=0.5, seed=kv_len)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    _, want_lse = assert_matches_sdpa_rule(out, q, k, v, mask)
    assert_lse_close(lse, want_lse, atol=LSE_ATOL[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, kernel", with_kernels([(64,), (128,)], shape=lambda d: (d, 128)))
def test_gpu_large_logits_stay_finite_and_deterministic(dtype, d, kernel):
    """q, k x 100 (scores ~1e4): the output is finite, within 2 x SDPA's error, lse within 0.05
    (fp32 rounding alone is ~1e-3 at |lse| ~ 1e4), and a second call is bitwise equal."""
    b, h, n = 1, 2, 4000
    q, k, v = qkv(b, h, n, n, d, dtype, seed=6)
    q, k = q * 100, k * 100
    mask = block_mask(b, h, n, n, 128, density=0.5, seed=6)
    out, lse = attend(q, k, v, mask, kernel, return_lse=True)
    assert torch.isfinite(out).all()
    _, want_lse = assert_matches_sdpa_rule(out, q, k, v, mask)
    assert_lse_close(lse, want_lse, atol=0.05)
    assert torch.equal(out, attend(q, k, v, mask, kernel))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", kernel_params(128, 128))
def test_gpu_deterministic_and_compiles(kernel):
    """Two calls are bitwise equal, and so is the launcher under torch.compile(fullgraph=True)."""
    b, h, n, d = 2, 4, 4000, 128
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16, seed=7)
    mask = block_mask(b, h, n, n, 128, density=0.3, seed=7)
    out = attend(q, k, v, mask, kernel)
    assert torch.equal(out, attend(q, k, v, mask, kernel))
    compiled = torch.compile(
        lambda q, k, v: block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel=kernel), fullgraph=True)
    assert torch.equal(compiled(q, k, v), out)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", block_sparse.KERNELS)
def test_gpu_rejects_float32(kernel):
    q, k, v = qkv(1, 2, 150, 150, 64, torch.float32)
    with pytest.raises(TypeError, match="query dtype must be one of"):
        block_sparse_attention_triton(q, k, v, block_mask(1, 2, 150, 150, 64), scale=0.125, kernel=kernel)


@pytest.mark.gpu
def test_gpu_auto_takes_gluon_exactly_where_it_can_run():
    """"auto" gives the Gluon kernel's output where ``_gluon_refusal`` is None, else the Triton
    kernel's (and "gluon" raises the refusal); head dim 64 and unaligned tensors never take it."""
    n, d = 1000, 128
    q, k, v = qkv(1, 2, n, n, d, torch.bfloat16, seed=8)
    mask = block_mask(1, 2, n, n, 128, density=0.5, seed=8)
    refusal = block_sparse._gluon_refusal(q, k, v, 128)
    auto = block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5)
    if refusal is None:
        assert torch.equal(auto, block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel="gluon"))
        # a query 2 bytes past a 16-byte boundary: no TMA, so no Gluon; "auto" runs the Triton kernel
        unaligned = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape).copy_(q)
        assert "16-byte aligned" in block_sparse._gluon_refusal(unaligned, k, v, 128)
        with pytest.raises(ValueError, match="16-byte aligned"):
            block_sparse_attention_triton(unaligned, k, v, mask, scale=d**-0.5, kernel="gluon")
        out = block_sparse_attention_triton(unaligned, k, v, mask, scale=d**-0.5)
        assert relative_l2(out, reference(q, k, v, mask, d**-0.5)[0]) < TOLERANCE[torch.bfloat16]
    else:
        with pytest.raises(ValueError, match="kernel='gluon' cannot run this call"):
            block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel="gluon")
        assert torch.equal(auto, block_sparse_attention_triton(q, k, v, mask, scale=d**-0.5, kernel="triton"))
    q64, k64, v64 = (t[..., :64].contiguous() for t in (q, k, v))
    assert block_sparse._gluon_refusal(q64, k64, v64, 128) is not None
    assert torch.equal(block_sparse_attention_triton(q64, k64, v64, mask, scale=0.125),
                       block_sparse_attention_triton(q64, k64, v64, mask, scale=0.125, kernel="triton"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (a launch on the second GPU while the first is current)")
@pytest.mark.parametrize("kernel", kernel_params(128, 128))
def test_gpu_launch_runs_on_the_query_device(kernel):
    """q, k, v, mask and kv_valid_len on cuda:1 while cuda:0 is current: the output and lse are on
    cuda:1 and equal the same call on cuda:0; the current device stays cuda:0."""
    n, d = 1000, 128
    on = {}
    for device in ("cuda:0", "cuda:1"):
        q, k, v = qkv(2, 2, n, n, d, torch.bfloat16, seed=10, device=device)
        mask = block_mask(2, 2, n, n, 128, density=0.5, seed=10, device=device)
        kv_valid_len = torch.tensor([n, 700], dtype=torch.int32, device=device)
        with torch.cuda.device(0):
            out, lse = attend(q, k, v, mask, kernel, kv_valid_len=kv_valid_len, return_lse=True)
            torch.cuda.synchronize(device)
            assert torch.cuda.current_device() == 0
        assert out.device == lse.device == torch.device(device)
        on[device] = (out.cpu(), lse.cpu())
    assert torch.equal(on["cuda:1"][0], on["cuda:0"][0]) and torch.equal(on["cuda:1"][1], on["cuda:0"][1])
