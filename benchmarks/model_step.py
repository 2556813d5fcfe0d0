"""One denoising step of a real diffusers transformer (real config, random weights) on a GPU:
dense (SDPA cuDNN) vs RainFusion v1 (0.5) and v2 (0.8, 0.9), sparse steps (no warm-up).

    python benchmarks/model_step.py --model wan-1.3b-480p [--layers N] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import time_ms
from rainfusion import RainFusion2Config, RainFusionConfig, apply_rainfusion, remove_rainfusion

MODELS = {
    # Wan2.1-T2V-1.3B: 480p, 81 frames -> latents 21 x 60 x 104, 32,760 tokens after 1x2x2 patches
    "wan-1.3b-480p": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                      num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6),
                          latents=(1, 16, 21, 60, 104), text=(1, 512, 4096)),
}
METHODS = {"v1-0.5": RainFusionConfig(), "v2-0.8": RainFusion2Config(), "v2-0.9": RainFusion2Config(sparsity=0.9)}


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-1.3b-480p", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, help="fewer layers than the real model (memory)")
    parser.add_argument("--out")
    args = parser.parse_args()
    spec = MODELS[args.model]
    config = dict(spec["config"], **({"num_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**config).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(spec["latents"], device="cuda", dtype=torch.bfloat16)
    text = torch.randn(spec["text"], device="cuda", dtype=torch.bfloat16)
    timestep = torch.tensor([500], device="cuda")

    def step():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return model(latents, timestep, text, return_dict=False)[0]

    rows = [dict(method="dense-cudnn", ms=time_ms(step, budget_ms=4000))]
    for name, method in METHODS.items():
        controller = apply_rainfusion(model, method)
        rows.append(dict(method=name, ms=time_ms(step, budget_ms=4000),
                         density=sum(s.mean_density for *_, s in controller.history[-config["num_layers"]:])
                         / config["num_layers"], backend=controller.history[-1][-1].backend))
        remove_rainfusion(model)
    report = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), model=args.model,
                  layers=config["num_layers"], diffusers=diffusers.__version__, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(report["card"], report["date"], args.model, f"{config['num_layers']} layers")
    for r in rows:
        print(f"{r['method']:<12} {r['ms']:>9.1f} ms  {rows[0]['ms'] / r['ms']:.2f}x  "
              f"density {r.get('density', 1.0):.3f}  {r.get('backend', 'sdpa')}")


if __name__ == "__main__":
    main()
