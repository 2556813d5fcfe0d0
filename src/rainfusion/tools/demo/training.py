"""Train the demo model with flow matching on freshly rendered procedural videos (reproducible
from ``--seed``), keep an exponential moving average of the weights, and save it with
``save_checkpoint``. Meant for a GPU (bf16 autocast); ``--time-limit`` stops it in time.
The embedded checkpoint came from two ~9-minute runs on an H100 (the first before the training
noise shift existed; ``--stop-at`` repeats where the time limit cut them):

    python -m rainfusion.tools.demo.training --out stage1.safetensors --steps 6000 --stop-at 5784 --noise-shift 1
    python -m rainfusion.tools.demo.training --out demo.safetensors --init stage1.safetensors --lr 2e-4 \
        --steps 5800 --stop-at 5624 --seed 1

The 16,384-token checkpoint (16 frames of 256 px) is that one fine-tuned on an H200 (115 s):

    python -m rainfusion.tools.demo.training --out demo-16k.safetensors --init demo.safetensors --size 256 \
        --batch 4 --lr 1e-4 --warmup 50 --steps 1000 --seed 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time

import torch

from .flow import NOISE_SHIFT, sample, training_loss
from .model import DemoVideoModel, from_latents, load_checkpoint, save_checkpoint, to_latents
from .videos import VideoSpec, caption_text, contact_sheet, sample_captions, sample_videos


def train(spec: VideoSpec, *, steps: int, batch: int, lr: float = 3e-4, warmup: int = 500, ema: float = 0.999,
          seed: int = 0, device: str = "cuda", time_limit: float = math.inf, log_every: int = 100,
          transformer_config: dict | None = None, init: DemoVideoModel | None = None, noise_shift: float = NOISE_SHIFT,
          stop_at: int | None = None) -> tuple[DemoVideoModel, list[dict]]:
    """(EMA model, log rows). Cosine learning rate over ``steps`` after a linear warm-up; stops
    after ``stop_at`` (default ``steps``) steps or ``time_limit`` seconds, whichever comes first.
    ``init``: weights to start from; ``noise_shift``: see ``flow.NOISE_SHIFT``."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    stop_at = steps if stop_at is None else stop_at
    if not 1 <= stop_at <= steps:
        raise ValueError(f"stop_at must be in [1, steps={steps}], got {stop_at}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # clips (drawn on the host, small)
    noise_generator = torch.Generator(device).manual_seed(seed)  # noise, drawn on the device
    model = DemoVideoModel(spec, transformer_config or (init.transformer_config if init is not None else None))
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(device).train()
    average = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    log, started, running = [], time.perf_counter(), torch.zeros((), device=device)
    for step in range(stop_at):
        videos, captions = sample_videos(batch, spec, generator, device)
        with autocast:
            loss = training_loss(model, to_latents(videos), captions, noise_generator, shift=noise_shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for kept, live in zip(average.parameters(), model.parameters()):
                kept.lerp_(live, 1 - decay)
        running += loss.detach()
        elapsed = time.perf_counter() - started
        if (step + 1) % log_every == 0 or elapsed > time_limit or step + 1 == stop_at:
            row = dict(step=step + 1, loss=float(running) / ((step % log_every) + 1), seconds=round(elapsed, 1),
                       lr=schedule.get_last_lr()[0])
            log.append(row)
            print(json.dumps(row), flush=True)
            running.zero_()
        if elapsed > time_limit:
            break
    return average, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--steps", type=int, default=20000, help="length of the learning-rate schedule")
    parser.add_argument("--stop-at", type=int, help="stop after this many steps (default: --steps)")
    parser.add_argument("--noise-shift", type=float, default=NOISE_SHIFT, help="shift of the training noise levels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--frames", type=int, help=f"frames per clip (default: --init's, else {VideoSpec.frames})")
    parser.add_argument("--size", type=int, help=f"clip height and width in pixels (default: --init's, else {VideoSpec.size})")
    parser.add_argument("--warmup", type=int, default=500, help="steps of linear learning-rate warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-limit", type=float, default=math.inf, help="seconds of training at most")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--init", help="checkpoint to start from (fine-tuning at another clip size: --frames, --size)")
    parser.add_argument("--preview", help="PNG of 4 sampled clips after training")
    args = parser.parse_args()
    init = load_checkpoint(args.init) if args.init else None
    spec = dataclasses.replace(init.spec if init else VideoSpec(),
                               **{k: v for k, v in dict(frames=args.frames, size=args.size).items() if v is not None})
    model, log = train(spec, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                       device=args.device, time_limit=args.time_limit, log_every=args.log_every, init=init,
                       noise_shift=args.noise_shift, stop_at=args.stop_at)
    save_checkpoint(model, args.out)
    if args.preview:
        from PIL import Image

        captions = sample_captions(4, spec, torch.Generator().manual_seed(args.seed + 1)).to(args.device)
        latents = sample(model, captions, torch.Generator(args.device).manual_seed(args.seed + 1), steps=30)
        Image.fromarray(contact_sheet(from_latents(latents)).numpy()).save(args.preview)
        for row in captions:
            print(caption_text(row))
    with open(args.out.rsplit(".", 1)[0] + "-log.json", "w") as f:
        json.dump(dict(spec=vars(args), log=log), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
