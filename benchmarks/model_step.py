"""One denoising step of a real diffusers transformer (real config, random weights) on a GPU.

Per model: the stock step on the fastest SDPA backend that takes the model's attention call
(cuDNN, else flash, else memory-efficient: HunyuanVideo passes a text-padding mask), eager and
under diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``, Inductor); the
step with attention replaced by a no-op (for the attention share); rainfusion's dense path (what
its warm-up steps run: FA4 dense or our kernel), eager and compiled; RainFusion v1 (0.5) and v2
(0.8), v2 eager and compiled. Speed-ups are against the stock step and against the best dense
step of the run; the whole-schedule ones assume 50 steps with each method's default warm-up
(dense steps first, on rainfusion's dense path). Wan2.1-1.3B runs its CFG pair as one batch of
2. Speed does not depend on the weight values.

    python benchmarks/model_step.py --models wan-1.3b-480p hunyuan-720p [--layers N] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from attention import time_ms
from rainfusion import RainFusion2Config, apply_rainfusion, remove_rainfusion
from rainfusion.config import method_config
from rainfusion.backends import dense_attention
from rainfusion.integrations.diffusers import hooks
from rainfusion.integrations.diffusers.geometry import geometry_of

STEPS = 50
DEVICE = "cuda"
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
MODELS = {
    # Wan2.1-T2V-1.3B: 480p, 81 frames -> latents 21 x 60 x 104, 32,760 tokens after 1x2x2 patches (CFG batch 2)
    "wan-1.3b-480p": dict(cls="WanTransformer3DModel", config=WAN_1_3B, latents=(2, 16, 21, 60, 104)),
    # Wan2.1-T2V-14B: 720p, 81 frames -> latents 21 x 90 x 160, 75,600 tokens
    "wan-14b-720p": dict(cls="WanTransformer3DModel", latents=(1, 16, 21, 90, 160),
                         config=dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    # HunyuanVideo: 720p, 129 frames -> latents 33 x 90 x 160, 118,800 video + 256 text tokens
    # (the prompt fills 128 of them; the rest is padding the model masks out)
    "hunyuan-720p": dict(cls="HunyuanVideoTransformer3DModel", latents=(1, 16, 33, 90, 160),
                         config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                     num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                     patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                     text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                     rope_axes_dim=(16, 56, 56))),
}
DENSE_BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


class _NoAttention(TorchFunctionMode):
    """Replaces scaled_dot_product_attention by returning the query (same shape): the step
    without its attention."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return args[0] if args else kwargs["query"]
        return func(*args, **(kwargs or {}))


def build(name: str, layers: int | None):
    """(model, call) for one preset: bf16 weights made on the GPU, call() runs one step."""
    import diffusers

    spec = MODELS[name]
    config = dict(spec["config"])
    if layers:  # HunyuanVideo keeps its 1:2 ratio of double- to single-stream blocks
        config["num_layers"] = layers
        if "num_single_layers" in config:
            config["num_single_layers"] = 2 * layers
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = getattr(diffusers, spec["cls"])(**config).eval()
    torch.set_default_dtype(default)
    latents = torch.randn(spec["latents"], device=DEVICE, dtype=torch.bfloat16)
    batch = latents.shape[0]
    timestep = torch.full((batch,), 500, device=DEVICE)
    if spec["cls"] == "WanTransformer3DModel":
        text = torch.randn(batch, 512, 4096, device=DEVICE, dtype=torch.bfloat16)
        args, kwargs = (latents, timestep, text), {}
    else:
        text = torch.randn(1, 256, 4096, device=DEVICE, dtype=torch.bfloat16)
        text_mask = (torch.arange(256, device=DEVICE) < 128).long()[None]
        pooled = torch.randn(1, 768, device=DEVICE, dtype=torch.bfloat16)
        args = (latents, timestep, text, text_mask, pooled)
        kwargs = dict(guidance=torch.tensor([6000.0], device=DEVICE, dtype=torch.bfloat16))

    def call():
        with torch.no_grad():
            return model(*args, **kwargs, return_dict=False)[0]

    return model, call, config


def _fastest_sdpa(name: str, call) -> tuple[str, SDPBackend]:
    """The first SDPA kernel of DENSE_BACKENDS that takes the model's attention calls."""
    for backend_name, backend in DENSE_BACKENDS:
        try:
            with sdpa_kernel(backend):
                call()
            return backend_name, backend
        except RuntimeError as error:
            print(f"{name}: SDPA {backend_name} does not take the call ({str(error)[:80]})")
    raise RuntimeError(f"no SDPA backend runs {name}")


def bench_model(name: str, layers: int | None) -> dict:
    """The rows of one model: stock eager and compiled (``compile_repeated_blocks(fullgraph=True)``,
    diffusers' regional compilation), the step without attention, rainfusion's dense path eager
    and compiled, v1 0.5, v2 0.8 eager and compiled; speed-ups against the stock step and the
    best dense step."""
    import diffusers

    model, call, config = build(name, layers)
    n_attention = len(geometry_of(model).self_attention(model))
    timing = dict(budget_ms=6000, min_runs=2)
    backend_name, backend = _fastest_sdpa(name, call)
    rows = []

    def row(method: str, config=None, skip_layers: tuple[int, ...] = ()) -> None:
        """Time one step: stock (config None), or with rainfusion applied (then removed); with
        every layer in ``skip_layers``, its dense path, whose kernels are recorded."""
        r = dict(method=method) if config is not None else dict(method=method, backend=f"sdpa-{backend_name}")
        controller = None if config is None else apply_rainfusion(model, config, skip_layers=skip_layers)
        used = set()

        def recording(*args, **kwargs):
            out, backend_used = dense_attention(*args, **kwargs)
            used.add(backend_used)
            return out, backend_used

        hooks.dense_attention = recording
        with sdpa_kernel(backend):
            r["ms"] = time_ms(call, **timing)
        hooks.dense_attention = dense_attention
        print(f"{name} {method}: {r['ms']:.1f} ms", flush=True)
        if skip_layers:
            r["backend"] = "+".join(sorted(used))
            remove_rainfusion(model)
        elif controller is not None:
            last = controller.history[-n_attention:]
            r.update(backend=last[-1][-1].backend, density=sum(s.mean_density for *_, s in last) / len(last),
                     warmup_steps=math.ceil(config.warmup_fraction * STEPS - 1e-9))
            remove_rainfusion(model)
        rows.append(r)

    every_layer = tuple(range(n_attention))
    row("dense")
    with _NoAttention():
        row("no-attention")
    row("dense-rainfusion", RainFusion2Config(), every_layer)
    row("v1-0.5", method_config("rainfusion"))
    row("v2-0.8", method_config("rainfusion2"))
    model.compile_repeated_blocks(fullgraph=True)
    row("dense-compiled")
    row("dense-rainfusion-compiled", RainFusion2Config(), every_layer)
    row("v2-0.8-compiled", method_config("rainfusion2"))
    ms = {r["method"]: r["ms"] for r in rows}
    stock, best_dense = ms["dense"], min(ms["dense"], ms["dense-compiled"], ms["dense-rainfusion"],
                                         ms["dense-rainfusion-compiled"])
    for r in rows:
        if "warmup_steps" not in r or r["method"].startswith("dense"):
            continue
        warm = ms["dense-rainfusion-compiled" if r["method"].endswith("-compiled") else "dense-rainfusion"]
        schedule = r["warmup_steps"] * warm + (STEPS - r["warmup_steps"]) * r["ms"]
        r.update(step_speedup=stock / r["ms"], step_speedup_vs_best_dense=best_dense / r["ms"],
                 schedule_speedup=STEPS * stock / schedule, schedule_speedup_vs_best_dense=STEPS * best_dense / schedule)
    return dict(model=name, layers={k: v for k, v in config.items() if k.endswith("layers")},
                batch=MODELS[name]["latents"][0], attention_share=1 - ms["no-attention"] / stock,
                best_dense=min(("dense", "dense-compiled", "dense-rainfusion", "dense-rainfusion-compiled"), key=ms.get),
                diffusers=diffusers.__version__, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["wan-1.3b-480p"], choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, nargs="+",
                        help="per model: double-stream (or Wan) blocks, fewer than the real model (time or memory)")
    parser.add_argument("--out")
    args = parser.parse_args()
    layers = args.layers or [None] * len(args.models)
    report = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                  steps=STEPS, models=[])
    for name, n in zip(args.models, layers):
        report["models"].append(bench_model(name, n or None))
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        if args.out:  # after each model: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    results = report["models"]
    print(report["card"], report["date"])
    for result in results:
        print(f"{result['model']} {result['layers']}: attention {100 * result['attention_share']:.0f}% of the dense step")
        for r in result["rows"]:
            extra = (f"  step {r['step_speedup']:.2f}x ({r['step_speedup_vs_best_dense']:.2f}x best dense)  schedule "
                     f"{r['schedule_speedup']:.2f}x ({r['schedule_speedup_vs_best_dense']:.2f}x) warm-up "
                     f"{r['warmup_steps']}  density {r['density']:.3f}" if "step_speedup" in r else "")
            print(f"  {r['method']:<26} {r['ms']:>9.1f} ms  {r.get('backend', ''):<14}{extra}")


if __name__ == "__main__":
    main()
