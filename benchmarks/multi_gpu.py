"""One denoising step of Wan2.1-14B (720p, 81 frames) over the GPUs of one host with diffusers'
Ulysses context parallelism, dense and with RainFusion v2.

diffusers' WanTransformer3DModel with the Wan2.1-T2V-14B config (model_step.py's ``wan-14b-720p``:
latents 1 x 16 x 21 x 90 x 160, 75,600 tokens, 40 layers, random bf16 weights), at each Ulysses
degree (1, and the world size): ``dense`` (the stock model on the fastest SDPA backend that takes
the call, picked as model_step.py does) and ``v2-0.8`` (rainfusion2 at sparsity 0.8, its warm-up
off, so the step is sparse). Each degree gets a fresh model, all ranks seeded alike (the same
weights and inputs everywhere); at degree 1 every rank runs the whole step on its own GPU. Per row:
the median step time on rank 0; for degree > 1 the relative L2 (in float64) of rank 0's output
against the degree-1 output of the same method; for v2 the mean density over all heads (each rank
attends with its share of them); the sparse speed-up (dense / v2 at one degree) and the Ulysses
speed-up (degree 1 / degree N, per method). Rank 0 writes JSON and prints a table last.

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py [--ulysses 1 2] [--layers N] [--budget-ms MS] [--out results.json]
    python benchmarks/multi_gpu.py --ulysses 1                    # one GPU: the dry run
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --tiny    # CPU smoke run: gloo, tiny model, float32
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

from attention import time_ms
from model_step import DENSE_BACKENDS, build
from rainfusion import apply_rainfusion
from rainfusion.config import method_config
from rainfusion.integrations.diffusers.geometry import geometry_of
from rainfusion.reference import relative_l2

MODEL = "wan-14b-720p"
V2 = "v2-0.8"
# --tiny: tests/integrations/test_diffusers_wan.py's tiny_wan, on test_context_parallel.py's inputs
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64)
TINY_LATENTS, TINY_TEXT = (1, 4, 5, 32, 32), (1, 12, 32)

Step = Callable[[], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Setup:
    """This process's place in the run and the run's options."""

    rank: int
    world: int
    device: torch.device
    tiny: bool
    layers: int | None
    budget_ms: float


def init_distributed(tiny: bool) -> tuple[int, int, torch.device]:
    """Joins torchrun's process group (a one-process group under plain python): nccl on this
    rank's GPU, or gloo on the CPU with --tiny. Returns (rank, world size, device)."""
    if tiny:
        device, backend, extra = torch.device("cpu"), "gloo", {}
        # test-only shim, as in tests/integrations/test_context_parallel.py: diffusers puts each rank
        # on device rank % torch.accelerator.device_count(), which is 0 on a machine without GPUs
        torch.accelerator.device_count = lambda: 1
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend, extra = "nccl", dict(device_id=device)
    if "RANK" in os.environ:
        dist.init_process_group(backend, **extra)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    return dist.get_rank(), dist.get_world_size(), device


def build_tiny(layers: int | None) -> tuple[torch.nn.Module, Step, dict]:
    """(model, call, config) like model_step.build, for the tiny float32 Wan on the CPU."""
    import diffusers

    config = dict(TINY_WAN, **({"num_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**config).eval()
    latents, text, timestep = torch.randn(TINY_LATENTS), torch.randn(TINY_TEXT), torch.tensor([500])

    def call() -> torch.Tensor:
        with torch.no_grad():
            return model(latents, timestep, text, return_dict=False)[0]

    return model, call, config


def reduce(value: float, op: dist.ReduceOp, device: torch.device) -> float:
    """``value`` reduced over all ranks."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor)


def timed_call(call: Step, device: torch.device) -> tuple[torch.Tensor, float]:
    """One step: its output and its wall time in ms."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return output, 1e3 * (time.perf_counter() - start)


def median_ms(call: Step, first_ms: float, setup: Setup) -> float:
    """Median step time. The run count (2-50, the budget over the slowest rank's first step) is
    agreed before timing: a step at degree > 1 holds collectives, so ranks running different counts
    would hang, and time_ms alone picks the count from each rank's own probe."""
    runs = max(2, min(50, int(setup.budget_ms // reduce(first_ms, dist.ReduceOp.MAX, setup.device))))
    dist.barrier()
    if setup.device.type == "cuda":
        return time_ms(call, min_runs=runs, max_runs=runs)
    call()  # --tiny: wall time on the CPU, after the same warm-up
    return statistics.median(timed_call(call, setup.device)[1] for _ in range(runs))


def bench_degree(degree: int, setup: Setup) -> tuple[list[dict], list[torch.Tensor], int]:
    """Rows and rank-local outputs of dense and v2 on a fresh model at one Ulysses degree, and
    the model's layer count."""
    import diffusers

    model, call, config = build_tiny(setup.layers) if setup.tiny else build(MODEL, setup.layers)
    if degree > 1:  # a model's parallelism cannot be turned off again: one model per degree
        mesh = None
        if setup.tiny:  # a CPU mesh, as the test builds it (diffusers would ask for the accelerator's)
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (1, degree), mesh_dim_names=("ring", "ulysses"))
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=degree, mesh=mesh))

    def say(text: str) -> None:
        if setup.rank == 0:
            print(text, flush=True)

    rows, outputs = [], []
    for backend_name, backend in DENSE_BACKENDS:  # the fastest SDPA kernel that takes the call
        try:
            with sdpa_kernel(backend):
                output, first = timed_call(call, setup.device)
        except RuntimeError as error:
            say(f"degree {degree}: SDPA {backend_name} does not take the call ({str(error)[:80]})")
            continue
        with sdpa_kernel(backend):
            rows.append(dict(method="dense", ulysses_degree=degree, backend=f"sdpa-{backend_name}",
                             ms=median_ms(call, first, setup)))
        outputs.append(output)
        break
    if not rows:
        raise RuntimeError(f"no SDPA backend runs the step at Ulysses degree {degree}")
    say(f"dense  degree {degree}: {rows[-1]['ms']:.1f} ms ({rows[-1]['backend']})")

    v2 = dataclasses.replace(method_config("rainfusion2"), warmup_fraction=0.0,
                             **({"block_size": 64} if setup.tiny else {}))
    controller = apply_rainfusion(model, v2)
    output, first = timed_call(call, setup.device)
    ms = median_ms(call, first, setup)
    last = controller.history[-len(geometry_of(model).self_attention(model)):]
    density = sum(stats.mean_density for *_, stats in last) / len(last)
    if degree > 1:  # each rank saw its share of the heads (equal shares)
        density = reduce(density, dist.ReduceOp.SUM, setup.device) / degree
    rows.append(dict(method=V2, ulysses_degree=degree, backend=last[-1][-1].backend, ms=ms, density=density,
                     sparse_layers=sum(not stats.dense for *_, stats in last)))
    outputs.append(output)
    say(f"{V2} degree {degree}: {ms:.1f} ms, density {density:.3f}")
    return rows, outputs, config["num_layers"]


def table(report: dict) -> str:
    """The rows as text."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [f"{report['card']} x{report['world_size']} {report['date']}: {report['model']}, {report['layers']} layers",
             f"{'method':<8} {'degree':>6} {'ms':>10} {'sparse':>7} {'ulysses':>8} {'rel L2 vs 1':>12} {'density':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<8} {r['ulysses_degree']:>6} {r['ms']:>10.1f} "
                     f"{times(r.get('sparse_speedup')):>7} {times(r['ulysses_speedup']):>8} "
                     f"{fmt(r['rel_l2_vs_single'], '.2e'):>12} {fmt(r.get('density'), '.3f'):>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses", type=int, nargs="+", help="Ulysses degrees, each 1 or the world size "
                        "(default: 1 and the world size)")
    parser.add_argument("--layers", type=int, help="transformer blocks, fewer than the model's 40 (time or memory)")
    parser.add_argument("--budget-ms", type=float, default=20000.0,
                        help="time for the timed steps of each row (2 to 50 steps)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: gloo, tiny Wan, float32")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/multi-gpu-<card>x<world>-<date>.json)")
    args = parser.parse_args()
    rank, world, device = init_distributed(args.tiny)
    try:
        degrees = sorted(set(args.ulysses or (1, world)))  # degree 1 first: the reference outputs
        if any(d not in (1, world) for d in degrees):
            raise SystemExit(f"--ulysses: each degree must be 1 or the world size {world}, got {degrees}")
        setup = Setup(rank, world, device, args.tiny, args.layers, args.budget_ms)
        rows, single = [], {}
        for degree in degrees:
            degree_rows, outputs, layers = bench_degree(degree, setup)
            for row, output in zip(degree_rows, outputs):
                if degree == 1:
                    single[row["method"]] = output
                    row["rel_l2_vs_single"] = None
                else:
                    reference = single.get(row["method"])
                    row["rel_l2_vs_single"] = None if reference is None else relative_l2(output, reference)
                rows.append(row)
            gc.collect()  # the model and rainfusion's hooks hold each other
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ms = {(r["method"], r["ulysses_degree"]): r["ms"] for r in rows}
        for r in rows:
            method, degree = r["method"], r["ulysses_degree"]
            if method == V2 and ("dense", degree) in ms:
                r["sparse_speedup"] = ms["dense", degree] / r["ms"]
            r["ulysses_speedup"] = ms[method, 1] / r["ms"] if degree > 1 and (method, 1) in ms else None
        if rank == 0:
            import diffusers

            card = "cpu" if args.tiny else torch.cuda.get_device_name(device)
            date = datetime.date.today().isoformat()
            report = dict(card=card, date=date, torch=torch.__version__, diffusers=diffusers.__version__,
                          world_size=world, model="tiny-wan" if args.tiny else MODEL, layers=layers, rows=rows)
            slug = re.sub(r"[^a-z0-9]+", "-", card.lower().removeprefix("nvidia ")).strip("-")
            out = args.out or Path(__file__).resolve().parent / "results" / f"multi-gpu-{slug}x{world}-{date}.json"
            with open(out, "w") as f:
                json.dump(report, f, indent=2)
            print(table(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
