"""Where the GPU's time of one attention call goes, on one GPU: torch's profiler over calls issued
back to back, the CUDA kernels' time per call grouped by kernel name, in milliseconds.

v2 end to end is the predictor (block means, pooled scores, top blocks), with FP8 the pre-pass
(the key mean, the value channel maxima, the three quantizations) and the block-sparse kernel;
this shows what each costs next to the kernel, for ``compare_trees.py``'s calls. With
``--timeline``, one call's kernels in order: when each starts after the call begins on the host,
how long it runs and how long the GPU idled before it (to compare with a single call's time as
``attention.py`` measures it). With ``--syncs``, the host synchronisations one call makes (torch's
sync debug mode); with ``--clocks``, the SM clock, power and clock-event reasons nvidia-smi
reports while the call runs back to back for a few seconds (a clock drop under load is the GPU's,
not the host's); with ``--rests``, a single call's time (``attention.py``'s) after resting the GPU
that long before each (under a power cap a rested GPU runs the next call at higher clocks).

    python benchmarks/gpu_breakdown.py [--preset hunyuan-720p] [--keep 186] [--calls 5] [--top 14] [--timeline]
        [--syncs] [--clocks] [--rests 0 0.02 0.1 0.3]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict


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
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "the call"),
                     key=lambda e: e.time_range.start)  # (the range also appears on the GPU's side)
    rows, busy_until = [], began
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        rows.append((e.name, (start - began) / 1000, (end - start) / 1000, max(0, start - busy_until) / 1000))
        busy_until = max(busy_until, end)
    return rows


def host_syncs(fn) -> list[str]:
    """The synchronising CUDA operations one call of ``fn`` makes after a warm-up (torch's sync
    debug mode: only those torch issues, e.g. ``.item()``)."""
    import warnings

    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:160] for w in caught]


def clocks_under_load(fn, seconds: float = 3.0) -> dict[str, object]:
    """``fn`` back to back for ``seconds`` (a synchronisation every 8 calls) while nvidia-smi samples
    the GPU every 50 ms: ms per call, median SM clock (MHz), power (W), temperature (C), and the
    clock-event reasons seen (nvidia-smi's bit masks, with how many samples showed each)."""
    import subprocess
    import time

    import torch

    gpu = f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    reasons_field = "clocks_event_reasons.active"  # clocks_throttle_reasons.active before driver 535
    if subprocess.run(["nvidia-smi", "-i", gpu, f"--query-gpu={reasons_field}", "--format=csv"],
                      capture_output=True).returncode:
        reasons_field = "clocks_throttle_reasons.active"
    fields = f"clocks.sm,power.draw,temperature.gpu,{reasons_field}"
    fn()
    torch.cuda.synchronize()
    probe = subprocess.Popen(["nvidia-smi", "-i", gpu, f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                              "-lms", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, began = 0, time.perf_counter()
    start.record()
    while time.perf_counter() - began < seconds:
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    probe.terminate()
    lines = probe.communicate()[0].splitlines()
    samples = [[part.strip() for part in line.split(",")] for line in lines if line.count(",") == 3]
    if not samples:
        return dict(ms=start.elapsed_time(end) / calls, error=" | ".join(lines[:2]))
    sm_mhz, watts, celsius = (statistics.median(float(sample[i]) for sample in samples) for i in range(3))
    return dict(ms=start.elapsed_time(end) / calls, sm_mhz=sm_mhz, watts=watts, celsius=celsius,
                reasons=dict(Counter(sample[3] for sample in samples)), samples=len(samples))


def main() -> None:
    from attention import time_ms
    from host_profile import calls_to_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hunyuan-720p")
    parser.add_argument("--keep", type=int, default=186, help="key blocks per query block of the kernel-only calls")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=14, help="kernels listed per call")
    parser.add_argument("--timeline", action="store_true", help="also one call's kernels in order, with the gaps")
    parser.add_argument("--syncs", action="store_true", help="also the host synchronisations of one call")
    parser.add_argument("--clocks", action="store_true", help="also the GPU's clocks and power under each call")
    parser.add_argument("--rests", nargs="*", type=float, default=[], help="also single-call ms after these rests (s)")
    args = parser.parse_args()
    calls = calls_to_profile(args.preset, args.keep)
    if args.clocks or args.rests:  # the end-to-end ratios' baseline, under the same load or rests
        import torch.nn.functional as F
        from compare_trees import random_inputs
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = random_inputs(args.preset)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        calls["sdpa cudnn dense"] = cudnn
    for what, fn in calls.items():
        if args.rests:
            print(f"{args.preset} {what}, one call after a rest: " + ", ".join(
                f"{rest * 1e3:.0f} ms rest {time_ms(fn, rest_s=rest, max_runs=15):.2f} ms" for rest in args.rests))
        if args.syncs:
            syncs = host_syncs(fn)
            print(f"{args.preset} {what}: {len(syncs)} host synchronisations in one call", *syncs, sep="\n  ")
        if args.clocks:
            print(f"{args.preset} {what} back to back: {clocks_under_load(fn)}")
        if args.timeline:
            rows = timeline(fn)
            ends = max(start + ms for _, start, ms, _ in rows)
            print(f"{args.preset} {what}, one call: GPU done {ends:.3f} ms after the call began, "
                  f"{sum(gap for *_, gap in rows):.3f} ms of it idle")
            print("  start ms    ms   idle before  kernel")
            for name, start, ms, gap in rows:
                print(f"  {start:8.3f} {ms:8.3f} {gap:8.3f}  {name[:90]}")
        if what == "sdpa cudnn dense":
            continue
        times = sorted(kernel_times(fn, args.calls).items(), key=lambda item: -item[1])
        print(f"{args.preset} {what}: {sum(t for _, t in times):.3f} ms of kernels per call")
        for name, ms in times[:args.top]:
            print(f"  {ms:9.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
