"""Scratch: where does v2 prediction time go, and can a Triton row gather beat index_select?"""
import sys, pathlib, torch, triton, triton.language as tl
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from attention import time_ms
from rainfusion import RainFusion2Config
from rainfusion.benchmark import PRESETS
from rainfusion.permutation import token_order, gather_tokens
from rainfusion.predictor import block_means, predict_block_mask, keep_count

@triton.jit
def gather3(x0, x1, x2, y0, y1, y2, index_ptr, n, stride_bh, stride_n, ROWS: tl.constexpr, D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < n
    src = tl.load(index_ptr + rows, mask=ok, other=0).to(tl.int64)
    base = tl.program_id(1).to(tl.int64) * stride_bh
    cols = tl.arange(0, D)[None, :]
    s = base + src[:, None] * stride_n + cols
    d = base + rows.to(tl.int64)[:, None] * stride_n + cols
    m = ok[:, None]
    tl.store(y0 + d, tl.load(x0 + s, mask=m), mask=m)
    tl.store(y1 + d, tl.load(x1 + s, mask=m), mask=m)
    tl.store(y2 + d, tl.load(x2 + s, mask=m), mask=m)

spec = PRESETS["hunyuan-720p"]
lay, H, D = spec.layout, spec.heads, spec.head_dim
n = lay.num_tokens
q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
order = token_order(lay, "window3d", device="cuda")
print(torch.cuda.get_device_name())
print("index_select x3", time_ms(lambda: [gather_tokens(t, order.index) for t in (q, k, v)]))
ys = [torch.empty_like(t) for t in (q, k, v)]
for rows in (32, 64, 128):
    f = lambda: gather3[(triton.cdiv(n, rows), H)](q, k, v, *ys, order.index, n, q.stride(1), q.stride(2), ROWS=rows, D=D, num_warps=4)
    f(); print("triton gather3 rows", rows, time_ms(f), torch.equal(ys[1], gather_tokens(k, order.index)))
qp, kp = gather_tokens(q, order.index), gather_tokens(k, order.index)
cfg = RainFusion2Config()
print("block_means x2", time_ms(lambda: (block_means(qp, 128), block_means(kp, 128))))
qm, km = block_means(qp, 128), block_means(kp, 128)
probs = torch.softmax(qm @ km.transpose(-1, -2) * D**-0.5, -1)
print("scores+softmax", time_ms(lambda: torch.softmax(qm @ km.transpose(-1, -2) * D**-0.5, -1)))
w = keep_count(probs.shape[-1], 0.8) + 32
print("topk", w, time_ms(lambda: torch.topk(probs, w, dim=-1)))
print("sort full", time_ms(lambda: torch.sort(probs, dim=-1, descending=True)))
print("predict total", time_ms(lambda: predict_block_mask(qp, kp, num_dense=order.num_dense, config=cfg, scale=D**-0.5)))
