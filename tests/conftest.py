import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Triton kernels run on CPU tensors in Triton's interpreter. triton.jit reads the flag when
    # it decorates a function (Triton's own tl.* helpers included), so it must be set before
    # triton is first imported, and stay set while kernels run.
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int(ndarray of shape (1,)),
    which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed after 3.6.0): use .item()."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "rainfusion_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.rainfusion_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if not ON_GPU:
    _patch_interpreter_for_numpy_2_4()


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
