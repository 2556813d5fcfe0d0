"""The user paths around apply_rainfusion / remove_rainfusion on each supported diffusers transformer
(the tiny random models of the per-model test files, non-square latents): remove, set_processor,
set_attention_backend, copy.deepcopy and diffusers' layer skip."""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.hooks import LayerSkipConfig, apply_layer_skip  # noqa: E402
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

from rainfusion.integrations.diffusers import apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.integrations.diffusers._model_hooks import registered  # noqa: E402
from tiny_models import MODELS, Model, all_sparse  # noqa: E402


@pytest.fixture(params=list(MODELS))
def case(request) -> Model:
    return MODELS[request.param]


@pytest.fixture
def keep_the_active_backend(monkeypatch):
    """set_attention_backend also sets diffusers' process-wide active backend: put it back after."""
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)


def _forward(case: Model, model: torch.nn.Module, x: tuple) -> torch.Tensor:
    return case.run(model, x, case.timestep)


def _hooks_of(model: torch.nn.Module) -> list:
    """Each module's torch module hooks and diffusers registry hooks (by name), in order."""
    def diffusers_hooks(module):
        registry = getattr(module, "_diffusers_hook", None)
        return [] if registry is None else list(registry.hooks.items())

    return [(dict(module._forward_pre_hooks), dict(module._forward_hooks), diffusers_hooks(module))
            for module in model.modules()]


def _refusal(backend: str) -> str:
    return rf"self-attention layer 0 dispatches to diffusers' attention backend '{backend}'"


def test_apply_runs_sparse_and_remove_restores_the_stock_model_bit_for_bit(case):
    model, x = case.build(), case.inputs()
    modules = [model, *case.self_attention(model)]
    stock = _forward(case, model, x)
    processors = [module.processor for module in modules[1:]]
    forwards, hooks = [module.forward for module in modules], _hooks_of(model)
    controller = apply_rainfusion(model, case.config)
    sparse = _forward(case, model, x)
    assert all_sparse(controller, set(range(len(processors))))
    assert not torch.equal(sparse, stock)
    remove_rainfusion(model)
    assert all(module.processor is processor for module, processor in zip(modules[1:], processors))
    assert _hooks_of(model) == hooks
    assert [module.forward for module in modules] == forwards
    assert torch.equal(_forward(case, model, x), stock)


def test_a_processor_set_after_apply_stays_sparse_and_survives_remove(case):
    """A new processor of the original's class on the first and the last self-attention layer."""
    model = case.build()
    layers = case.self_attention(model)
    controller = apply_rainfusion(model, case.config)
    mine = {i: type(layers[i].processor)() for i in (0, len(layers) - 1)}
    for i, processor in mine.items():
        layers[i].set_processor(processor)
    _forward(case, model, case.inputs())
    assert all_sparse(controller, set(range(len(layers))))
    remove_rainfusion(model)
    assert all(layers[i].processor is processor for i, processor in mine.items())


def test_set_attention_backend_after_apply_reaches_the_processors_and_stays_sparse(case, keep_the_active_backend):
    model = case.build()
    layers = case.self_attention(model)
    controller = apply_rainfusion(model, case.config)
    model.set_attention_backend("_native_math")  # calls torch's SDPA: rainfusion takes the call
    math = AttentionBackendName._NATIVE_MATH
    if case.dispatches:
        assert all(module.processor._attention_backend == math for module in layers)
    else:  # calls torch directly: nothing to set, and nothing in the way
        assert not any(hasattr(module.processor, "_attention_backend") for module in layers)
    _forward(case, model, case.inputs())
    assert all_sparse(controller, set(range(len(layers))))
    remove_rainfusion(model)
    if case.dispatches:
        assert all(module.processor._attention_backend == math for module in layers)


def test_a_backend_set_after_apply_that_rainfusion_cannot_see_is_refused_at_forward(case, keep_the_active_backend):
    """set_attention_backend('flex') (known to diffusers, usable on the CPU): flex's kernel is not
    torch's SDPA, so the forward is refused, not run dense; CogVideoX's processor ignores backends."""
    model, x = case.build(), case.inputs()
    controller = apply_rainfusion(model, case.config)
    model.set_attention_backend("flex")
    if not case.dispatches:
        _forward(case, model, x)
        assert all_sparse(controller, set(range(len(case.self_attention(model)))))
        return
    with pytest.raises(ValueError, match=_refusal("flex")):
        _forward(case, model, x)
    remove_rainfusion(model)
    hooks = _hooks_of(model)
    with pytest.raises(ValueError, match=_refusal("flex")):  # and at apply, installing nothing
        apply_rainfusion(model, case.config)
    assert registered(model) is None and _hooks_of(model) == hooks


def test_a_deepcopy_with_rainfusion_refuses_to_run_until_reapplied_and_then_is_its_own_model(case):
    """diffusers' hook chain survives copy.deepcopy only as closures over the original's modules,
    so the copy's forward is refused (naming the remedy) rather than running the original model;
    remove + apply on the copy gives it its own controller, its own modules and the original's
    output, and removing it from the copy leaves the original applied."""
    model, x = case.build(), case.inputs()
    stock = _forward(case, model, x)
    controller = apply_rainfusion(model, case.config)
    expected = _forward(case, model, x)
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"copy\.deepcopy.*remove_rainfusion\(copy\)"):
        _forward(case, twin, x)
    remove_rainfusion(twin)
    twin_controller = apply_rainfusion(twin, case.config)
    ran = []
    case.self_attention(twin)[0].register_forward_pre_hook(lambda module, args: ran.append(module))
    controller.history.clear()
    assert torch.equal(_forward(case, twin, x), expected)
    assert ran and not controller.history
    assert all_sparse(twin_controller, set(range(len(case.self_attention(twin)))))
    remove_rainfusion(twin)
    assert registered(model) is not None and torch.equal(_forward(case, twin, x), stock)


@pytest.mark.parametrize("skip_ff", [False, True], ids=["attention", "whole-block"])
def test_layer_skip_behaves_the_same_with_and_without_rainfusion(case, skip_ff):
    """apply_layer_skip on block 0 after apply_rainfusion: where diffusers refuses it on the stock
    model (0.42 has no skip function for these processors' classes, or the attention class lacks
    `is_cross_attention`) it refuses it alike; where it runs, layer 0 is skipped, the rest stays
    sparse, and after remove_rainfusion the skip remains and gives the stock skipped output."""
    x = case.inputs()
    outcomes = []
    for with_rainfusion in (False, True):
        model = case.build()
        controller = apply_rainfusion(model, case.config) if with_rainfusion else None
        try:
            apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn=case.blocks, skip_attention=True,
                                                    skip_ff=skip_ff))
        except (ValueError, AttributeError) as error:
            outcomes.append((type(error), str(error)))
            continue
        output = _forward(case, model, x)
        if with_rainfusion:
            assert all_sparse(controller, set(range(1, len(case.self_attention(model)))))
            remove_rainfusion(model)
            output = _forward(case, model, x)
        outcomes.append(output)
    stock, rainfusion = outcomes
    if isinstance(stock, tuple):  # (exception type, message)
        assert isinstance(rainfusion, tuple) and rainfusion == stock
    else:
        assert isinstance(rainfusion, torch.Tensor) and torch.equal(rainfusion, stock)
