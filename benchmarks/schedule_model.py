"""How long our block-sparse kernel takes for a mask, by a model of how the GPU hands out its
programs: one program per SM at a time (the Gluon kernel's shared memory and registers), each
started in grid order on the SM that frees first, each taking ``program_us`` plus ``tile_us`` per
listed key block. Fitted on the H200 from rows of 1, 186 and 931 key blocks (benchmarks/NOTES.md,
session 10: FP8 12.5 + 1.18 us a tile, bf16 12.0 + 1.81). It gives the time lost at the end of a
launch when long rows start last (v2's dense first-frame and text rows), for the grid order
and for each head's longest rows first (``block_sparse.longest_rows_first``).

    python benchmarks/schedule_model.py [--preset hunyuan-720p] [--program-us 12.5] [--tile-us 1.18]

The mask is v2's (``RainFusion2Config()``) on random q, k at the preset's shape, on this
machine's CPU (a minute or two at 720p).
"""

from __future__ import annotations

import argparse
import heapq


def makespan_us(durations: list[float], sms: int) -> float:
    """Programs started in list order, each on the SM that frees first."""
    free = [0.0] * sms
    end = 0.0
    for duration in durations:
        finish = heapq.heappop(free) + duration
        end = max(end, finish)
        heapq.heappush(free, finish)
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hunyuan-720p")
    parser.add_argument("--program-us", type=float, default=12.5, help="a program's cost beyond its tiles")
    parser.add_argument("--tile-us", type=float, default=1.18, help="a listed key block's cost")
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()

    import torch

    from rainfusion import RainFusion2Config
    from rainfusion.kernels.block_sparse import longest_rows_first
    from rainfusion.methods import plan_attention
    from rainfusion.tools.bench import PRESETS

    spec = PRESETS[args.preset]
    g = torch.Generator().manual_seed(0)
    shape = (1, spec.heads, spec.layout.num_tokens, spec.head_dim)
    q, k = (torch.randn(*shape, generator=g) for _ in range(2))
    counts = plan_attention(q, k, spec.layout, RainFusion2Config(), spec.head_dim**-0.5).mask.counts
    counts = counts.expand(1, spec.heads, -1)
    schedule = longest_rows_first(counts, 1, spec.heads)
    cost = args.program_us + args.tile_us * counts.reshape(spec.heads, -1).double()
    grid = makespan_us(cost.flatten().tolist(), args.sms)
    longest = makespan_us(cost.gather(1, schedule.long()).flatten().tolist(), args.sms)
    ideal = float(cost.sum()) / args.sms
    print(f"{args.preset}: v2 density {float(counts.double().mean()) / counts.shape[-1]:.3f}, "
          f"{int((counts == counts.shape[-1]).sum())} dense rows of {counts.numel()}")
    print(f"  grid order {grid / 1e3:.3f} ms, longest rows first {longest / 1e3:.3f} ms, "
          f"perfectly balanced {ideal / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
