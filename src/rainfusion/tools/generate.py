"""``rainfusion generate``: run a diffusers video pipeline with RainFusion and write the video,
optionally next to the dense video of the same seed (PSNR, SSIM, time, realized density)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import method_config
from .metrics import DensitySummary, psnr, ssim, summarize_history

LOADING_LIBRARIES = ("diffusers", "huggingface_hub", "transformers")  # whose logs load_pipeline holds back


class ModelNotAvailable(ValueError):
    """The pipeline cannot be loaded: not a pipeline directory, not in the Hugging Face cache, or broken."""


def first_line(error: BaseException) -> str:
    """An error's first line of text, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# configuration, loading, running


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
    from ..integrations.diffusers import apply_rainfusion, remove_rainfusion

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if fps < 1:
        raise ValueError(f"--fps must be >= 1, got {fps}")
    config = method_config(method, sparsity=sparsity, block_size=block_size)
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
