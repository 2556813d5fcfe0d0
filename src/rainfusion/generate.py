"""``rainfusion generate``: run a diffusers video pipeline with RainFusion and write the video,
optionally next to the dense video of the same seed (PSNR, SSIM, time, realized density)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import AnyConfig, RainFusion2Config, RainFusionConfig

METHODS = ("rainfusion", "rainfusion+", "rainfusion2")
LOADING_LIBRARIES = ("diffusers", "huggingface_hub", "transformers")  # whose logs load_pipeline holds back


class ModelNotAvailable(ValueError):
    """The pipeline cannot be loaded: not a pipeline directory, not in the Hugging Face cache, or broken."""


def first_line(error: BaseException) -> str:
    """An error's first line of text, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# quality metrics (frames in [0, 1], channels last: [F, H, W, C] or one image [H, W, C])


def _as_frames(video: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() == 3:
        video = video.unsqueeze(0)
    if video.dim() != 4:
        raise ValueError(f"{name} must be [F, H, W, C] or [H, W, C], got shape {tuple(video.shape)}")
    return video.double()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_frames(a, "a"), _as_frames(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels: 10 log10(range^2 / MSE); inf when equal."""
    a, b = _check_pair(a, b)
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window (11x11, sigma 1.5), K1 = 0.01,
    K2 = 0.03, statistics over the valid window positions; the mean over pixels, channels and
    frames. 1.0 when equal."""
    a, b = _check_pair(a, b)
    frames, height, width, channels = a.shape
    if height < window or width < window:
        raise ValueError(f"ssim needs frames of at least {window}x{window}, got {height}x{width}")
    # every (frame, channel) is one single-channel image: [F*C, 1, H, W]
    a = a.permute(0, 3, 1, 2).reshape(frames * channels, 1, height, width)
    b = b.permute(0, 3, 1, 2).reshape(frames * channels, 1, height, width)
    kernel = _gaussian_window(window, sigma, a.device)[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


# ---------------------------------------------------------------------------------------------
# configuration, loading, running


def make_config(method: str, sparsity: float | None = None, block_size: int | None = None) -> AnyConfig:
    """The config of a CLI method name; None keeps the method's default."""
    overrides = {k: v for k, v in (("sparsity", sparsity), ("block_size", block_size)) if v is not None}
    if method == "rainfusion":
        return RainFusionConfig(**overrides)
    if method == "rainfusion+":
        return RainFusionConfig.rainfusion_plus(**overrides)
    if method == "rainfusion2":
        return RainFusion2Config(**overrides)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


@contextlib.contextmanager
def logs_held_back(libraries: tuple[str, ...] = LOADING_LIBRARIES) -> Iterator[None]:
    """Hold back what these (imported) libraries log while the body runs: replayed when it succeeds,
    dropped when it raises (its error says what went wrong). Their loggers are restored either way."""
    # a library imported inside the body would set up its logger there, so only imported ones are held
    loggers = [logging.getLogger(name) for name in libraries if name in sys.modules]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    held = logging.handlers.BufferingHandler(capacity=sys.maxsize)
    for logger in loggers:
        logger.handlers, logger.propagate = [held], False
    try:
        yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
    for record in held.buffer:
        logging.getLogger(record.name).handle(record)


def load_pipeline(model: str, dtype: torch.dtype) -> object:
    """``DiffusionPipeline.from_pretrained`` on a local directory or a cached hub id, the libraries'
    log lines held back (see ``logs_held_back``).

    Raises ModelNotAvailable (one line) when the weights cannot be found locally or fetched."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError

    path = Path(model).expanduser()
    local = path.is_dir()
    if local:
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailable(f"--model {model}: a directory without model_index.json, not a diffusers pipeline")
        source = str(path)
    elif path.exists() or _looks_like_path(model):
        raise ModelNotAvailable(f"--model {model}: model weights not found, no pipeline directory there")
    else:
        source = model  # a hub id: the local cache, or a download where the network allows it
    try:
        with logs_held_back():
            return DiffusionPipeline.from_pretrained(source, dtype=dtype)
    except HFValidationError as error:
        raise ModelNotAvailable(f"--model {model}: neither a pipeline directory nor a hub id ({first_line(error)})") \
            from None
    except OSError as error:
        if local:
            raise ModelNotAvailable(f"--model {model}: cannot load this pipeline directory: {first_line(error)}") \
                from None
        # diffusers raises "not fully cached" from the error of its hub request: that one says why
        hub_error = first_line(error.__cause__ or error)
        raise ModelNotAvailable(
            f"--model {model}: not found locally (not a directory, not fully in the Hugging Face cache at "
            f"{HF_HUB_CACHE}) and not fetched from the hub ({hub_error}); download it where there is network "
            f"(hf download {model}) into this cache, or pass a pipeline directory"
        ) from None
    except ValueError as error:
        if "low_cpu_mem_usage" in str(error):
            raise ImportError(f"loading {model} needs the `accelerate` package (pip install accelerate)") from None
        raise


def _frames_of(output: object) -> torch.Tensor:
    """The first video of a pipeline output as a float tensor [F, H, W, C] in [0, 1]."""
    frames = output.frames if hasattr(output, "frames") else output[0]
    video = frames[0]
    if isinstance(video, torch.Tensor):
        tensor = video.float().cpu()
        if tensor.dim() == 4 and tensor.shape[1] in (1, 3) and tensor.shape[-1] not in (1, 3):
            tensor = tensor.permute(0, 2, 3, 1)  # [F, C, H, W] -> channels last
        return tensor.clamp(0, 1)
    if isinstance(video, (list, tuple)):  # PIL images or arrays
        import numpy as np

        arrays = [np.asarray(frame) for frame in video]
        tensor = torch.from_numpy(np.stack(arrays)).float()
        if arrays[0].dtype == np.uint8:
            tensor = tensor / 255.0
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(-1)
        return tensor.clamp(0, 1)
    import numpy as np

    return torch.from_numpy(np.asarray(video, dtype=np.float32)).clamp(0, 1)


@dataclass
class Run:
    video: torch.Tensor  # [F, H, W, C] in [0, 1]
    seconds: float


def run_pipeline(pipe: object, *, prompt: str, steps: int, seed: int, device: str, call_kwargs: dict,
                 label: str, progress: bool = True) -> Run:
    """One generation, timed (the whole pipeline call: text encoder, denoising, VAE decode)."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress, desc=label)
    generator = torch.Generator("cpu").manual_seed(seed)
    synchronize = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        output = pipe(prompt=prompt, num_inference_steps=steps, generator=generator, output_type="np",
                      **call_kwargs)
    synchronize()
    return Run(_frames_of(output), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# writing videos


def mp4_encoder() -> str | None:
    """What ``diffusers.utils.export_to_video`` would encode MP4 with, or None."""
    try:
        import imageio  # noqa: F401
    except ImportError:
        try:
            import cv2  # noqa: F401
        except ImportError:
            return None
        return "opencv"
    try:
        import imageio.plugins.ffmpeg

        imageio.plugins.ffmpeg.get_exe()
    except Exception:  # noqa: BLE001 - imageio without an ffmpeg binary (export_to_video would fail)
        return None
    return "imageio-ffmpeg"


def _to_gif(video: torch.Tensor, path: Path, fps: int) -> Path:
    from PIL import Image

    frames = (video * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(frame if frame.shape[-1] != 1 else frame[..., 0]) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0,
                   optimize=False)
    return path


def write_video(video: torch.Tensor, out: Path, fps: int) -> tuple[Path, str | None]:
    """Write MP4 when an encoder is available, else an animated GIF next to ``out``.

    Returns (the path written, why MP4 was not written or None)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        return _to_gif(video, out, fps), None
    encoder = mp4_encoder()
    reason = "no MP4 encoder (pip install imageio imageio-ffmpeg, or opencv-python)"
    if encoder is not None:
        from diffusers.utils import export_to_video

        try:
            export_to_video(list(video.numpy()), str(out), fps=fps)
            if out.is_file() and out.stat().st_size > 0:
                return out, None
            reason = f"{encoder} wrote no file"
        except Exception as error:  # noqa: BLE001 - any encoder failure falls back to GIF
            reason = f"MP4 encoding with {encoder} failed: {first_line(error)}"
    return _to_gif(video, out.with_suffix(".gif"), fps), reason


# ---------------------------------------------------------------------------------------------
# statistics of the controller history


@dataclass
class DensitySummary:
    calls: int = 0
    sparse_calls: int = 0
    mean_density: float = 1.0  # over all intercepted attention calls (dense warm-up counts as 1)
    sparse_density: float | None = None  # over the calls that ran sparse
    patterns: dict[str, int] = field(default_factory=dict)


def summarize_history(history: list) -> DensitySummary:
    densities, sparse, patterns = [], [], {}
    for _step, _cfg, _layer, stats in history:
        density = stats.mean_density
        densities.append(density)
        if not stats.dense:
            sparse.append(density)
        for name, count in stats.pattern_counts.items():
            patterns[name] = patterns.get(name, 0) + count
    if not densities:
        return DensitySummary()
    return DensitySummary(len(densities), len(sparse), sum(densities) / len(densities),
                          sum(sparse) / len(sparse) if sparse else None, patterns)


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class GenerateResult:
    path: Path
    seconds: float
    summary: DensitySummary
    dense_path: Path | None = None
    dense_seconds: float | None = None
    psnr: float | None = None
    ssim: float | None = None


def generate(*, model: str, prompt: str, method: str, sparsity: float | None, steps: int, out: str,
             compare: bool = False, seed: int = 0, frames: int | None = None, height: int | None = None,
             width: int | None = None, guidance_scale: float | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, block_size: int | None = None, fps: int = 16,
             progress: bool = True, log=print) -> GenerateResult:
    from .integrations.diffusers import apply_rainfusion, remove_rainfusion

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if fps < 1:
        raise ValueError(f"--fps must be >= 1, got {fps}")
    config = make_config(method, sparsity, block_size)
    pipe = load_pipeline(model, dtype)
    controller = apply_rainfusion(pipe, config)  # unsupported transformers raise ValueError here
    pipe.to(device)
    call_kwargs = {k: v for k, v in (("num_frames", frames), ("height", height), ("width", width),
                                     ("guidance_scale", guidance_scale)) if v is not None}
    common = dict(prompt=prompt, steps=steps, seed=seed, device=device, call_kwargs=call_kwargs, progress=progress)

    dense = None
    if compare:  # dense first: the sparse run does not pay for the first call's warm-up
        remove_rainfusion(pipe)
        dense = run_pipeline(pipe, label="dense", **common)
        controller = apply_rainfusion(pipe, config)
    sparse = run_pipeline(pipe, label=method, **common)
    summary = summarize_history(controller.history)
    remove_rainfusion(pipe)

    path, reason = write_video(sparse.video, Path(out), fps)
    if reason:
        log(f"{reason}: wrote an animated GIF instead: {path}")
    f, h, w = sparse.video.shape[:3]
    log(f"wrote {path} ({f} frames, {w}x{h})")
    result = GenerateResult(path, sparse.seconds, summary)
    sparsity_text = f"sparsity {config.sparsity:g}"
    density = f"mean density {summary.mean_density:.3f}"
    if summary.sparse_density is not None:
        density += f" ({summary.sparse_density:.3f} over {summary.sparse_calls} of {summary.calls} sparse calls)"
    else:
        density += f" (all {summary.calls} attention calls dense)"
    log(f"{method} ({sparsity_text}): {sparse.seconds:.2f} s, {density}")
    if summary.patterns:
        log("head patterns: " + ", ".join(f"{name} {count}" for name, count in summary.patterns.items()))

    if dense is not None:
        suffix = path.suffix
        dense_target = path.with_name(f"{path.stem}_dense{suffix}")
        dense_path, _ = write_video(dense.video, dense_target, fps)
        if dense_path != dense_target:
            log(f"(dense video written as {dense_path})")
        log(f"wrote {dense_path}")
        result.dense_path, result.dense_seconds = dense_path, dense.seconds
        result.psnr, result.ssim = psnr(sparse.video, dense.video), ssim(sparse.video, dense.video)
        log(f"dense: {dense.seconds:.2f} s (speed-up of {method}: {dense.seconds / sparse.seconds:.2f}x)")
        log(f"{method} vs dense: PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}")
    return result


def main_generate(args) -> int:
    """CLI handler (argparse namespace from ``rainfusion.cli``)."""
    from .cli import dtype_for

    generate(model=args.model, prompt=args.prompt, method=args.method, sparsity=args.sparsity,
             steps=args.steps, out=args.out, compare=args.compare, seed=args.seed, frames=args.frames,
             height=args.height, width=args.width, guidance_scale=args.guidance_scale, device=args.device,
             dtype=dtype_for(args.dtype, args.device),
             block_size=args.block_size, fps=args.fps, progress=not args.no_progress)
    return 0
