"""rainfusion inside diffusers' context parallelism (`enable_parallelism`), two CPU processes on
gloo: with Ulysses every rank attends over the full sequence for its heads, so the masks and the
output are the single-process ones, whichever of the two is applied first; ring is refused."""

import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from rainfusion import RainFusion2Config, apply_rainfusion  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402
from test_diffusers_wan import inputs, run, tiny_wan  # noqa: E402

CONFIG = RainFusion2Config(warmup_fraction=0.0, block_size=64)


def _rank(rank: int, rendezvous: str, order: str, degrees: dict, out: str) -> None:
    # a file rendezvous: no TCP port to pick, so no race with another process taking it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        # test-only shim: diffusers picks each rank's device among the accelerators (none here)
        torch.accelerator.device_count = lambda: 1
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (degrees.get("ring_degree", 1), degrees.get("ulysses_degree", 1)),
                                mesh_dim_names=("ring", "ulysses"))
        parallel = diffusers.ContextParallelConfig(mesh=mesh, **degrees)
        model = tiny_wan()
        try:
            if order == "rainfusion first":
                controller = apply_rainfusion(model, CONFIG)
                model.enable_parallelism(config=parallel)
            else:
                model.enable_parallelism(config=parallel)
                controller = apply_rainfusion(model, CONFIG)
            output = run(model, *inputs(frames=5, size=32), 500)
            result = (output, [tuple(stats.density.shape) for *_, stats in controller.history], None)
        except ValueError as error:
            result = (None, None, str(error))
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # neither rank tears its gloo threads down while the other still talks
    finally:
        dist.destroy_process_group()
    # done and saved: leave without the interpreter's teardown, in which a rank once aborted inside
    # gloo ("terminate called without an active exception") after a passing run (an error above
    # still reaches mp.spawn as a traceback)
    os._exit(0)


def _two_ranks(tmp_path, order: str, **degrees):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), order, degrees, out), nprocs=2)
    return torch.load(out)


@pytest.mark.parametrize("order", ["rainfusion first", "parallelism first"])
def test_ulysses_two_ranks_give_the_single_process_output(tmp_path, order):
    output, shapes, error = _two_ranks(tmp_path, order, ulysses_degree=2)
    assert error is None
    model = tiny_wan()
    controller = apply_rainfusion(model, CONFIG)
    single = run(model, *inputs(frames=5, size=32), 500)
    assert shapes == [(1, 1)] * 2  # each rank attended with 1 of the 2 heads, sparse in both layers
    assert all(stats.mean_density < 1 for *_, stats in controller.history)
    assert relative_l2(output, single) <= 1e-5


def test_ring_attention_is_refused_naming_ulysses(tmp_path):
    _, _, error = _two_ranks(tmp_path, "rainfusion first", ring_degree=2)
    assert error is not None and "ring context parallelism (ring_degree=2)" in error and "use Ulysses" in error
