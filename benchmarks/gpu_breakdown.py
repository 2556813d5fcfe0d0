"""Where the GPU's time of one attention call goes, on one GPU: torch's profiler over calls issued
back to back, the CUDA kernels' time per call grouped by kernel name, in milliseconds.

v2 end to end is the predictor (block means, pooled scores, top blocks), with FP8 the pre-pass
(the key mean, the value channel maxima, the three quantizations) and the block-sparse kernel;
this shows what each costs next to the kernel, for ``compare_trees.py``'s calls. With
``--timeline``, one call's kernels in order: when each starts after the call begins on the host,
how long it runs and how long the GPU idled before it (to compare with a single call's time as
``attention.py`` measures it).

    python benchmarks/gpu_breakdown.py [--preset hunyuan-720p] [--keep 186] [--calls 5] [--top 14] [--timeline]
"""

from __future__ import annotations

import argparse
from collections import defaultdict


def kernel_times(fn, calls: int) -> dict[str, float]:
    """CUDA kernel name -> its ms per call of ``fn``, over ``calls`` calls after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1000 / calls
    return dict(totals)


def timeline(fn) -> list[tuple[str, float, float, float]]:
    """One call of ``fn`` after a warm-up: (kernel name, start ms after the call began on the
    host, duration ms, GPU idle ms before it) for each CUDA kernel in start order."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("the call"):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    began = next(e.time_range.start for e in events if e.name == "the call")
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    rows, busy_until = [], began
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        rows.append((e.name, (start - began) / 1000, (end - start) / 1000, max(0, start - busy_until) / 1000))
        busy_until = max(busy_until, end)
    return rows


def main() -> None:
    from host_profile import calls_to_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hunyuan-720p")
    parser.add_argument("--keep", type=int, default=186, help="key blocks per query block of the kernel-only calls")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=14, help="kernels listed per call")
    parser.add_argument("--timeline", action="store_true", help="also one call's kernels in order, with the gaps")
    args = parser.parse_args()
    for what, fn in calls_to_profile(args.preset, args.keep).items():
        if args.timeline:
            rows = timeline(fn)
            ends = max(start + ms for _, start, ms, _ in rows)
            print(f"{args.preset} {what}, one call: GPU done {ends:.3f} ms after the call began, "
                  f"{sum(gap for *_, gap in rows):.3f} ms of it idle")
            print("  start ms    ms   idle before  kernel")
            for name, start, ms, gap in rows:
                print(f"  {start:8.3f} {ms:8.3f} {gap:8.3f}  {name[:90]}")
        times = sorted(kernel_times(fn, args.calls).items(), key=lambda item: -item[1])
        print(f"{args.preset} {what}: {sum(t for _, t in times):.3f} ms of kernels per call")
        for name, ms in times[:args.top]:
            print(f"  {ms:9.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
