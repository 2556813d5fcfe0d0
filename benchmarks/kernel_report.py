"""Compile our Triton kernel (or, with --gluon, the Gluon one; with --prepass, one of the FP8
pre-pass's three quantizations) for an H100 (sm_90) on any machine, no GPU needed, and report what
the compiler made of it: registers, spills, shared memory, and counts of the instructions that
matter (wgmma, exponentials, waits, CTA barriers, local-memory traffic). The SASS goes to --out.

    python benchmarks/kernel_report.py [--head-dim 128] [--gluon [--fp8] | --prepass q|k|v] [--out /tmp/kernel]
"""

from __future__ import annotations

import argparse
import os
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rainfusion.kernels import _block_sparse_fwd, _block_sparse_fwd_gluon, _quantize_fp8, block_sparse
from rainfusion.kernels.fp8 import FP8_MAX

INSTRUCTIONS = ["HGMMA", "QGMMA", "SHFL", "WARPGROUP.DEPBAR", "MUFU.EX2", "BAR.SYNC", "UTMALDG", "SYNCS", "USETMAXREG", "LDL", "STL"]
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_iw", "stride_ln")
POINTER_TYPES = {"lse_ptr": "*fp32", "counts_ptr": "*i32", "indices_ptr": "*i32", "kv_valid_ptr": "*i32", "out_index_ptr": "*i64",
                 "schedule_ptr": "*i32",
                 "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}


def compile_for_sm90(head_dim: int, block_q: int, block_n: int, num_warps: int, num_stages: int,
                     maxnreg: int | None, use_tma: bool = True, dtype: str = "bf16"):
    """The kernel as launched on [B, H, N, D] tensors with unit head-dim strides, 128-token blocks."""
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=128, BLOCK_Q=block_q,
                     BLOCK_N=block_n, HAS_KV_VALID=False, RETURN_LSE=False, USE_TMA=use_tma, HAS_OUT_INDEX=False,
                     **{name: 1 for name in UNIT_STRIDES})
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return _compile(_block_sparse_fwd.block_sparse_fwd_kernel, ASTSource, constants, dtype, options)


def compile_gluon_for_sm90(head_dim: int, dtype: str = "bf16", fp8: bool = False):
    """The Gluon kernel as launched (3 stages, or FP8_STAGES with ``fp8``; no valid key count),
    like ``compile_for_sm90``; with ``fp8`` its e4m3 inputs (the output stays ``dtype``)."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    constants = dict(HEAD_DIM=head_dim, BLOCK=128, STAGES=block_sparse.FP8_STAGES if fp8 else 3, RETURN_LSE=False,
                     HAS_KV_VALID=False, FP8=fp8, HAS_OUT_INDEX=False, stride_iw=1, stride_ln=1)
    names = ("q_in", "k_in", "v_in", "ones_in")
    if fp8:  # its host descriptors' types, from descriptors of small CPU tensors
        q, k = (torch.zeros(1, 1, 128, head_dim, dtype=torch.int8) for _ in range(2))
        v, ones = torch.zeros(1, 1, head_dim, 128, dtype=torch.float8_e4m3fn), torch.zeros(8, 128, dtype=torch.float8_e4m3fn)
        types = dict(zip(names, map(mangle_type, block_sparse.fp8_descriptors(q, k, v, ones, 128))))
    else:
        types = dict.fromkeys(names, "*" + dtype)
    return _compile(_block_sparse_fwd_gluon.block_sparse_fwd_kernel, GluonASTSource, constants, dtype,
                    dict(num_warps=4), types)


def compile_prepass_for_sm90(head_dim: int, tensor: str):
    """The FP8 pre-pass's kernel as ``fp8.quantize_attention_inputs`` launches it on bf16 [B, H, N,
    D] tensors gathered by one token order: ``tensor`` "q" (int8 blocks), "k" (int8, centred) or
    "v" (e4m3 V^T in the P operand order, per-channel scales). Rows written a multiple of 16 (V^T's
    always are; q's and k's where N is, as at hunyuan-720p)."""
    int8, transposed = tensor in ("q", "k"), tensor == "v"
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK=128,
                     HAS_CENTER=tensor == "k", WGMMA_ORDER=transposed, FP8_MAX=FP8_MAX, INT8=int8,
                     CHANNEL_SCALE=transposed, HAS_INDEX=True, stride_xd=1, stride_tn=1, stride_cd=1, stride_csd=1,
                     **({"stride_on": 1} if transposed else {"stride_od": 1, "stride_sn": 1}))
    types = dict(x_ptr="*bf16", token_index_ptr="*i64", out_ptr="*i8" if int8 else "*fp8e4nv")
    return _compile(_quantize_fp8.quantize_blocks_kernel, ASTSource, constants, "fp32", dict(num_warps=8), types,
                    divisible=("out_rows",))


def _compile(fn, source, constants: dict, dtype: str, options: dict, types: dict | None = None,
             divisible: tuple[str, ...] = ()):
    """triton.compile for sm_90 with arguments typed by name (``types`` first: pointers or
    descriptors; then pointers by POINTER_TYPES, else ``dtype``), the rest int32 (scale fp32);
    pointers, strides and the ``divisible`` integers are multiples of 16, as the launch finds them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
            continue
        if name in (types or {}):
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*" + dtype)
        else:
            signature[name] = "fp32" if name == "qk_scale_log2" else "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(source(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=block_sparse.HEAD_DIMS)
    parser.add_argument("--gluon", action="store_true", help="the Gluon kernel (Hopper's path) instead")
    parser.add_argument("--fp8", action="store_true", help="with --gluon: its FP8 path")
    parser.add_argument("--prepass", choices=("q", "k", "v"), help="the FP8 pre-pass's kernel for q, k or v instead")
    parser.add_argument("--out", default="/tmp/rainfusion-kernel", help="folder for the cubin and SASS")
    args = parser.parse_args()
    if args.prepass:
        kernel = compile_prepass_for_sm90(args.head_dim, args.prepass)
        setting = f"FP8 pre-pass of {args.prepass}"
    elif args.gluon:
        kernel = compile_gluon_for_sm90(args.head_dim, fp8=args.fp8)
        setting = "Gluon FP8" if args.fp8 else "Gluon"
    else:
        block_q, block_n, num_warps, num_stages, maxnreg = block_sparse._CONFIGS[
            (128, triton.next_power_of_2(args.head_dim))]
        kernel = compile_for_sm90(args.head_dim, block_q, block_n, num_warps, num_stages, maxnreg)
        setting = f"(BLOCK_Q, BLOCK_N, warps, stages, maxnreg) = {(block_q, block_n, num_warps, num_stages, maxnreg)}"
    os.makedirs(args.out, exist_ok=True)
    cubin = os.path.join(args.out, "block_sparse_fwd.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    with open(cubin.replace(".cubin", ".sass"), "w") as f:
        f.write(sass)
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                           text=True, check=True).stdout
    registers, stack = (usage.split(key)[1].split()[0] for key in ("REG:", "STACK:"))
    print(f"D={args.head_dim} {setting}: {registers} registers, stack {stack} B, "
          f"shared memory {kernel.metadata.shared} B")
    print("  " + ", ".join(f"{name} {sass.count(name)}" for name in INSTRUCTIONS))
    print(f"  SASS: {cubin.replace('.cubin', '.sass')}")


if __name__ == "__main__":
    main()
