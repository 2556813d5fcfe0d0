"""Which low-precision scheme keeps attention accurate, on CPU: the FP8 kernel's arithmetic and
its alternatives emulated in float64 with torch's e4m3 cast, on q, k, v captured from the demo
model (v2 0.8 masks), against exact attention (issue 16).

Each scheme rounds q and k (e4m3 or int8, one scale per 128-token block or per token), P (e4m3
after a 2^8 gain) and v (e4m3 per block) as the kernel f-v1 did, then computes in float64;
that scheme matched its H200 errors within about 0.002 (benchmarks/NOTES.md). The kernel has
since moved to int8 q, k (f-v2) and per-channel v scales (f-v5). With ``--centres``, int8 q, k
per block with the keys centred on their mean, on the mean of 128 evenly strided tokens (what a
pre-pass that quantizes k while it takes its block means could use) or on nothing, optionally
after adding a per-channel key bias of ``--key-bias`` standard deviations (SageAttention finds
such a bias in real models' keys; the demo model's have none).

    python benchmarks/fp8_emulation.py [--checkpoint PATH] [--noise 0.9] [--centres [--key-bias 3]]
"""

from __future__ import annotations

import argparse

import torch

from rainfusion import RainFusion2Config
from rainfusion.methods import plan_attention
from rainfusion.reference import token_mask
from rainfusion.tools.demo.analysis import capture_self_attention
from rainfusion.tools.demo.model import load_checkpoint
from rainfusion.tools.demo.run import EMBEDDED

BLOCK = 128
# name -> (q and k format, q scale groups, k scale groups, P and v in e4m3)
SCHEMES = {
    "exact q, k; e4m3 P, v": (None, None, None, True),
    "e4m3 q, k per block (kernel f-v1)": ("e4m3", "block", "block", True),
    "e4m3 q, k per token": ("e4m3", "token", "token", True),
    "int8 q, k per block": ("int8", "block", "block", True),
    "int8 q per token, k per block": ("int8", "token", "block", True),
    "e4m3 q, k per block; exact P, v": ("e4m3", "block", "block", False),
    "int8 q, k per block; exact P, v": ("int8", "block", "block", False),
}


def rounded(x: torch.Tensor, fmt: str | None, groups: str | None) -> torch.Tensor:
    """x [..., N, D] float64 rounded to ``fmt`` ("e4m3", "int8" or None: exact) with one scale
    per 128-token block or per token (``groups``), returned dequantized."""
    if fmt is None:
        return x
    top = 448.0 if fmt == "e4m3" else 127.0
    if groups == "token":
        scale = x.abs().amax(-1, keepdim=True) / top
    else:
        n = x.shape[-2]
        padded = torch.nn.functional.pad(x, (0, 0, 0, (-n) % BLOCK))
        scale = padded.unflatten(-2, (-1, BLOCK)).abs().amax((-1, -2)) / top
        scale = scale.repeat_interleave(BLOCK, -1)[..., :n, None]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt == "int8":
        return torch.round(x / scale) * scale
    return (x / scale).float().to(torch.float8_e4m3fn).double() * scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
              scheme: tuple | None, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Masked attention [B, H, N, D] in float64 with the rounding of ``scheme`` (None: exact);
    keys centred first on ``centre`` [B, H, 1, D], by default their mean, as the kernel does
    (softmax is unchanged by it)."""
    if scheme is None:
        fmt, q_groups, k_groups, low_pv = None, None, None, False
    else:
        fmt, q_groups, k_groups, low_pv = scheme
    k = k - (k.mean(-2, keepdim=True) if centre is None else centre)
    scores = (rounded(q, fmt, q_groups) @ rounded(k, fmt, k_groups).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True)).nan_to_num(0.0)
    total = p.sum(-1, keepdim=True)
    if low_pv:
        p = (p * 256).float().to(torch.float8_e4m3fn).double() / 256
        v = rounded(v, "e4m3", "block")
    return (p @ v) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(EMBEDDED))
    parser.add_argument("--noise", type=float, default=0.9)
    parser.add_argument("--centres", action="store_true", help="int8 q, k per block under three key centres")
    parser.add_argument("--key-bias", type=float, default=0.0, help="with --centres: a per-channel key bias (std devs)")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint, "cpu", torch.float32)
    layout = model.layout
    if args.centres:
        print(f"{'layer':<6}" + "".join(f"{name:>24}" for name in ("mean", "128 strided tokens", "none")))
    else:
        print(f"{'layer':<6}" + "".join(f"{name[:34]:>36}" for name in SCHEMES))
    for layer, (query, key, value) in enumerate(capture_self_attention(model, noise=args.noise)):
        scale = query.shape[-1] ** -0.5
        plan = plan_attention(query, key, layout, RainFusion2Config(), scale)
        q, k, v = (t[:, :, plan.order].double() for t in (query, key, value))
        allowed = token_mask(plan.mask.expand(*q.shape[:2]))
        if args.key_bias:
            bias = torch.randn(k.shape[-1], dtype=k.dtype, generator=torch.Generator().manual_seed(layer))
            k = k + args.key_bias * k.std() * bias
        exact = attention(q, k, v, allowed, scale, None)
        if args.centres:
            strided = k[..., ::max(1, k.shape[-2] // 128), :][..., :128, :]
            runs = [(SCHEMES["int8 q, k per block"], centre) for centre in (
                None, strided.mean(-2, keepdim=True), torch.zeros_like(k[..., :1, :]))]
        else:
            runs = [(scheme, None) for scheme in SCHEMES.values()]
        cells = []
        for scheme, centre in runs:
            out = attention(q, k, v, allowed, scale, scheme, centre)
            error = float((out - exact).norm() / exact.norm())
            cosine = float(torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0))
            cells.append(f"{error:.4f} / {cosine:.5f}")
        width = 24 if args.centres else 36
        print(f"{layer:<6}" + "".join(f"{cell:>{width}}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
