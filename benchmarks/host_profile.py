"""Where the host's time to issue one attention call goes, on one GPU: Python's profiler over calls
issued back to back (the GPU never waited on), per function, in microseconds per call.

An FP8 call took the host 0.6-1.1 ms to issue on an H200 against bf16's 0.14-0.3 ms
(benchmarks/NOTES.md, session 11); this shows which steps take it. The profiler's own cost
inflates each Python call by a microsecond or so: read the shares, and the un-profiled host ms
per call that comes first.

    python benchmarks/host_profile.py [--preset wan-1.3b-480p] [--keep 10] [--calls 50] [--top 18]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time


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
    args = parser.parse_args()
    for what, fn in calls_to_profile(args.preset, args.keep).items():
        host_ms, rows = host_profile(fn, args.calls, args.top)
        print(f"\n{args.preset}, {what}: host {host_ms:.3f} ms per call; with the profiler, us per call:")
        print(f"{'own':>9s} {'cumulative':>11s}  function")
        for name, own, cumulative in rows:
            print(f"{own:9.1f} {cumulative:11.1f}  {name}")


if __name__ == "__main__":
    main()
