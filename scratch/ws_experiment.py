"""Scratch (not committed): does tl.range(warp_specialize=True) or other loop options help on H100?"""
import importlib.util, pathlib, sys, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from attention import random_block_mask, time_ms
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from rainfusion.kernels import block_sparse
src = pathlib.Path(block_sparse.__file__).with_name("_block_sparse_fwd.py").read_text()
variants = {
    "base": src,
    "ws": src.replace("    for it in range(first_tile, end_tile):", "    for it in tl.range(first_tile, end_tile, warp_specialize=not MASK_KEYS):"),
    "flatten": src.replace("    for it in range(first_tile, end_tile):", "    for it in tl.range(first_tile, end_tile, flatten=True):"),
}
heads, n, d = 24, 32768, 128
q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
print(torch.cuda.get_device_name(), f"cuDNN {cudnn:.2f} ms")
masks = {dd: random_block_mask(1, heads, n, dd) for dd in (1.0, 0.2)}
ref = None
for name, code in variants.items():
    path = pathlib.Path(f"/tmp/kvar_{name}.py"); path.write_text(code)
    spec = importlib.util.spec_from_file_location(f"kvar_{name}", path); mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        block_sparse._block_sparse_fwd = mod
        for setting in [(128, 8, 3), (128, 8, 2)]:
            block_sparse._CONFIGS[(128, 128)] = setting
            out = block_sparse.block_sparse_attention_triton(q, k, v, masks[0.2], scale=d**-0.5)
            ref = out if ref is None else ref
            err = (out.float() - ref.float()).norm() / ref.float().norm()
            t = [time_ms(lambda: block_sparse.block_sparse_attention_triton(q, k, v, m, scale=d**-0.5)) for m in masks.values()]
            print(f"{name:8s} {setting}: dense {t[0]:.2f} ms ({cudnn/t[0]:.2f}x), 0.2 {t[1]:.2f} ms ({cudnn/t[1]:.2f}x) diff {err:.1e}")
    except Exception as e:
        print(name, "failed:", type(e).__name__, str(e)[:300])
