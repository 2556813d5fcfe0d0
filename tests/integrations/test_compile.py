"""torch.compile of a model with rainfusion applied, on each supported diffusers transformer: the
sparse step is one opaque op (``rainfusion::diffusers_self_attention``) with the layer as data, so
diffusers' regional compilation compiles each block kind once with ``fullgraph=True`` and the
whole model compiles with one graph break (the step bookkeeping); outputs equal eager rainfusion."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from rainfusion.integrations.diffusers import apply_rainfusion  # noqa: E402
from tiny_models import MODELS, all_sparse  # noqa: E402

STEPS = (1.5, 1.2, 1.0)  # timesteps of a three-step generation, as multiples of the model's test timestep


def _generation(case, model, x) -> list[torch.Tensor]:
    return [case.run(model, x, case.timestep * f) for f in STEPS]


def _eager(case, x) -> list[torch.Tensor]:
    model = case.build()
    apply_rainfusion(model, case.config)
    return _generation(case, model, x)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", [name for name in MODELS if name != "cogvideox"])  # no _repeated_blocks
def test_compile_repeated_blocks_fullgraph_compiles_each_block_kind_once_and_equals_eager(name):
    """No graph break in a block, no recompilation across layers (the tiny Wan and LTX have two
    blocks of one class) or steps, each layer sparse on every step, the eager output exactly."""
    case = MODELS[name]
    x = case.inputs()
    want = _eager(case, x)
    model = case.build()
    controller = apply_rainfusion(model, case.config)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _generation(case, model, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    layers = set(range(len(case.self_attention(model))))
    assert all_sparse(controller, layers) and len(controller.history) == len(STEPS) * len(layers)


def test_the_op_traces_through_aot_autograd_with_the_output_layout_of_sdpa():
    """aot_eager runs the op's fake implementation (shape and strides of the output) and
    functionalisation: the compiled blocks still give the eager output exactly."""
    case = MODELS["wan"]
    x = case.inputs()
    model = case.build()
    apply_rainfusion(model, case.config)
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(_generation(case, model, x), _eager(case, x)))


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_compile_adds_one_graph_break_and_equals_eager(name):
    """torch.compile(model): rainfusion adds exactly one graph break to the stock model's, at the
    forward's start (the layout and the step, on the host: ``TransformerHook.pre_forward``), so
    no attention module runs outside a graph; the output is the eager one, with no recompilation
    from one step to the next."""
    case = MODELS[name]
    x = case.inputs()
    stock = case.build()
    stock_breaks = torch._dynamo.explain(lambda: case.run(stock, x, case.timestep))().break_reasons
    torch._dynamo.reset()
    want = _eager(case, x)
    model = case.build()
    controller = apply_rainfusion(model, case.config)
    explained = torch._dynamo.explain(lambda: case.run(model, x, case.timestep))()
    ours = [reason.reason for reason in explained.break_reasons if "TransformerHook.pre_forward" in reason.reason]
    assert len(explained.break_reasons) == len(stock_breaks) + 1 and len(ours) == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _generation(case, compiled, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all_sparse(controller, set(range(len(case.self_attention(model)))))


@pytest.mark.gpu
def test_inductor_compiled_blocks_on_the_gpu_match_eager_rainfusion():
    """compile_repeated_blocks(fullgraph=True) with Inductor, bf16 on CUDA, the block-sparse
    kernel behind the op (128-token blocks, a tail block): the eager rainfusion output within bf16
    rounding, on every step, each step sparse."""
    from rainfusion import RainFusion2Config
    from rainfusion.reference import relative_l2
    from test_diffusers_wan import inputs, tiny_wan

    latents, text = (t.cuda().bfloat16() for t in inputs(seed=3, frames=5, size=64, width=90))
    config = RainFusion2Config(warmup_fraction=0.0)
    models = [tiny_wan().cuda().bfloat16() for _ in range(2)]
    controllers = [apply_rainfusion(model, config) for model in models]
    models[1].compile_repeated_blocks(fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with torch.no_grad():
            outputs = [[model(latents, torch.tensor([t], device="cuda"), text, return_dict=False)[0]
                        for t in (900, 700, 500)] for model in models]
    for eager, compiled in zip(*outputs):
        assert float(relative_l2(compiled, eager)) < 2e-2
    assert all(not stats.dense and stats.mean_density < 1 for *_, stats in controllers[1].history)
    assert controllers[1].history[-1][-1].backend == controllers[0].history[-1][-1].backend != "portable"


@pytest.mark.gpu
def test_cuda_graphs_leave_the_step_decisions_to_every_call():
    """mode="reduce-overhead" (CUDA graphs): the op is cudagraph-unsafe, so a replay cannot skip
    its host decisions; a generation with a dense warm-up step, then sparse ones, gives the
    eager outputs step by step."""
    from rainfusion import RainFusion2Config
    from rainfusion.reference import relative_l2
    from test_diffusers_wan import inputs, tiny_wan

    latents, text = (t.cuda().bfloat16() for t in inputs(seed=4, frames=5, size=64, width=90))
    models = [tiny_wan().cuda().bfloat16() for _ in range(2)]
    controllers = [apply_rainfusion(model, RainFusion2Config(warmup_fraction=0.25), num_steps=4) for model in models]
    compiled = torch.compile(models[1], mode="reduce-overhead")
    with torch.no_grad():
        outputs = [[model(latents, torch.tensor([t], device="cuda"), text, return_dict=False)[0].clone()
                    for t in (900, 700, 500, 300)] for model in (models[0], compiled)]
    for eager, compiled in zip(*outputs):
        assert float(relative_l2(compiled, eager)) < 2e-2
    assert [stats.dense for *_, stats in controllers[1].history] == [stats.dense for *_, stats in controllers[0].history]
    assert {stats.dense for *_, stats in controllers[1].history} == {True, False}
