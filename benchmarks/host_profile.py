"""Where the host's time to issue one attention call goes, on one GPU: Python's profiler over calls
issued back to back (the GPU never waited on), per function, in microseconds per call.

An FP8 call took the host 0.6-1.1 ms to issue on an H200 against bf16's 0.14-0.3 ms
(benchmarks/NOTES.md, session 11); this shows which steps take it. The profiler's own cost
inflates each Python call by a microsecond or so: read the shares, and the un-profiled host ms
per call that comes first. With ``--stages``, instead, one call issued after a synchronisation (as
``attention.py``'s single-call timing issues it) as a nested timeline of the library's steps and
Triton launches (timers wrapped around them; no profiler).

    python benchmarks/host_profile.py [--preset wan-1.3b-480p] [--keep 10] [--calls 50] [--top 18] [--stages]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import pstats
import time

# (module, function) of the steps ``--stages`` times, and the Triton kernels whose launches it times
STAGES = [("rainfusion.attention", name) for name in ("check_qkv", "resolve_backend", "plan_attention",
                                                      "run_block_sparse")] + [
    ("rainfusion.methods", name) for name in ("token_order", "block_means", "predict_from_means", "token_mean")] + [
    ("rainfusion.kernels.top_blocks", "top_blocks_triton"), ("rainfusion.kernels.fp8", "quantize_attention_inputs"),
    ("rainfusion.kernels.fp8", "quantize_blocks")] + [
    ("rainfusion.kernels.block_sparse", name) for name in (
        "block_sparse_attention_triton", "_block_sparse_attention_op", "fp8_descriptors", "longest_rows_first")]
KERNELS = [("rainfusion.kernels._block_sparse_fwd_gluon", "block_sparse_fwd_kernel"),
           ("rainfusion.kernels._block_sparse_fwd", "block_sparse_fwd_kernel"),
           ("rainfusion.kernels._quantize_fp8", "quantize_blocks_kernel"),
           ("rainfusion.kernels._block_means", "block_means_kernel"),
           ("rainfusion.kernels._top_blocks", "top_blocks_kernel"),
           ("rainfusion.kernels._gather_rows", "gather_rows_kernel")]


def instrument_stages() -> list[tuple[float, float, int, str]]:
    """Timers around ``STAGES`` and the launches of ``KERNELS``, for good (run it last): returns
    the list each timed step appends (start s, end s, depth, step) to."""
    records, depth = [], [0]

    def timed(real, label):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
                records.append((began, time.perf_counter(), depth[0], label))
        return wrapper

    for module_name, name in STAGES:
        module = importlib.import_module(module_name)
        setattr(module, name, timed(getattr(module, name), f"{module_name.rsplit('.', 1)[-1]}.{name}"))
    for module_name, name in KERNELS:
        kernel = getattr(importlib.import_module(module_name), name)
        kernel.run = timed(kernel.run, f"launch {name}")
    return records


def stage_timeline(fn, records: list, calls: int = 3) -> list[tuple[float, list[tuple[float, float, int, str]]]]:
    """``calls`` calls of ``fn`` (after a warm-up), each issued after a synchronisation, timed by
    ``instrument_stages``' timers: (host ms of the call, [(start ms, ms, depth, step)] in start
    order) per call."""
    import torch

    for _ in range(3):
        fn()
    timelines = []
    for _ in range(calls):
        torch.cuda.synchronize()
        records.clear()
        began = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - began) * 1e3
        timelines.append((host_ms, [((start - began) * 1e3, (end - start) * 1e3, level, label)
                                    for start, end, level, label in sorted(records)]))
    torch.cuda.synchronize()
    return timelines


def calls_to_profile(preset: str, keep: int) -> dict:
    """what -> a zero-argument call: our kernel with FP8 and in bf16 at ``keep`` random key blocks
    per query block, and v2 0.8 end to end with both (``compare_trees.our_calls``)."""
    from compare_trees import our_calls

    return our_calls(preset, [keep], ["fp8", "native"])[1]


def host_profile(fn, calls: int, top: int) -> tuple[float, list[tuple[str, float, float]]]:
    """(host ms per call without the profiler, then the ``top`` functions by own time with it:
    (name, own us per call, cumulative us per call))."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - began) * 1e3 / calls
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own s, cumulative s, callers)
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    rows = [(name if file == "~" else f"{name} ({file.rsplit('/', 1)[-1]}:{line})", own * 1e6 / calls,
             cumulative * 1e6 / calls)
            for (file, line, name), (_, _, own, cumulative, _) in ranked]
    return host_ms, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan-1.3b-480p")
    parser.add_argument("--keep", type=int, default=10, help="key blocks per query block of the kernel calls")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--stages", action="store_true", help="one call after a synchronisation, step by step")
    args = parser.parse_args()
    if args.stages:
        calls = calls_to_profile(args.preset, args.keep)
        records = instrument_stages()
        for what, fn in calls.items():
            for host_ms, rows in stage_timeline(fn, records):
                print(f"\n{args.preset}, {what}, issued after a synchronisation: host {host_ms:.3f} ms")
                print(f"{'start ms':>9s} {'ms':>7s}  step")
                for start, ms, level, label in rows:
                    print(f"{start:9.3f} {ms:7.3f}  {'  ' * level}{label}")
        return
    for what, fn in calls_to_profile(args.preset, args.keep).items():
        host_ms, rows = host_profile(fn, args.calls, args.top)
        print(f"\n{args.preset}, {what}: host {host_ms:.3f} ms per call; with the profiler, us per call:")
        print(f"{'own':>9s} {'cumulative':>11s}  function")
        for name, own, cumulative in rows:
            print(f"{own:9.1f} {cumulative:11.1f}  {name}")


if __name__ == "__main__":
    main()
