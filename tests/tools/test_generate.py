"""``rainfusion generate`` end to end on a real tiny WanPipeline built offline and saved to disk,
and the PSNR / SSIM it reports."""

import contextlib
import logging
import math
import re
import shutil
import sys
import types

import pytest
import torch

from rainfusion.tools import generate as gen
from rainfusion.tools import metrics
from rainfusion.tools.cli import main
from test_cli import one_line_error
from tiny_pipelines import build_tiny_wan_pipeline, needs_pipeline

@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan")
    build_tiny_wan_pipeline().save_pretrained(path)
    return path


# 9 frames of 128x128 -> latent 3x16x16 -> 3x8x8 = 192 tokens: 3 blocks of 64
SIZE = ["--frames", "9", "--height", "128", "--width", "128", "--steps", "3", "--block-size", "64",
        "--seed", "3", "--device", "cpu", "--dtype", "float32"]


def is_mp4(path) -> bool:
    return path.read_bytes()[4:8] == b"ftyp"


def is_gif(path) -> bool:
    return path.read_bytes()[:6] in (b"GIF87a", b"GIF89a")


def gif_frames(path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.n_frames


@needs_pipeline
def test_generate_compare_at_sparsity_zero_matches_dense(tiny_wan_dir, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    code = main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat runs on the beach",
                 "--method", "rainfusion2", "--sparsity", "0", "--out", str(out), "--compare", *SIZE])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if gen.mp4_encoder() is not None:
        written, dense = out, tmp_path / "video_dense.mp4"
        assert is_mp4(written) and is_mp4(dense)
    else:
        written, dense = out.with_suffix(".gif"), tmp_path / "video_dense.gif"
        assert is_gif(written) and is_gif(dense) and gif_frames(written) == 9
        assert "GIF" in captured.out
    psnr = float(re.search(r"PSNR (\S+) dB", captured.out).group(1))
    ssim = float(re.search(r"SSIM (\S+)", captured.out).group(1))
    # sparsity 0 keeps every block: equal to dense up to float summation order
    assert psnr > 80 or math.isinf(psnr)
    assert ssim > 0.9999
    assert re.search(r"rainfusion2 \(sparsity 0\): [\d.]+ s, mean density 1\.000", captured.out)
    assert re.search(r"dense: [\d.]+ s", captured.out)
    # the pipeline's tqdm progress bars are on, labelled by run
    assert "rainfusion2: 100%|" in captured.err and "dense: 100%|" in captured.err


@needs_pipeline
def test_generate_v1_without_mp4_encoder_falls_back_to_gif(tiny_wan_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gen, "mp4_encoder", lambda: None)
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a red car in the snow",
                 "--method", "rainfusion", "--sparsity", "0.5", "--out", str(out), "--no-progress", *SIZE])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not out.exists()
    gif = tmp_path / "clip.gif"
    assert is_gif(gif) and gif_frames(gif) == 9
    assert f"wrote an animated GIF instead: {gif}" in captured.out
    density = float(re.search(r"mean density ([\d.]+)", captured.out).group(1))
    assert 0 < density < 1  # the sparse steps skipped blocks
    counts = dict(re.findall(r"(spatial|temporal|textural) (\d+)", captured.out))
    assert set(counts) == {"spatial", "temporal", "textural"} and sum(map(int, counts.values())) > 0
    assert "rainfusion: " not in captured.err  # --no-progress: no denoising progress bar


def test_missing_model_directory_is_a_clean_error(tmp_path, capsys):
    nope = tmp_path / "nope"
    assert one_line_error(["generate", "--model", str(nope), "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")],
                          capsys) == f"error: --model {nope}: model weights not found, no pipeline directory there"


def test_directory_without_a_pipeline_is_a_clean_error(tmp_path, capsys):
    assert one_line_error(["generate", "--model", str(tmp_path), "--prompt", "a cat"], capsys) == \
        f"error: --model {tmp_path}: a directory without model_index.json, not a diffusers pipeline"


@needs_pipeline
@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_not_available_locally_is_one_clean_line(offline, capfd, monkeypatch):
    """Only the error on stderr, none of the hub's log lines (capfd: diffusers' log handler writes
    to the stderr it found on import), whether HF_HUB_OFFLINE is set or the network is just absent."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    hub_id = "rainfusion-tests/no-such-pipeline"
    code = main(["generate", "--model", hub_id, "--prompt", "a cat"])
    err = capfd.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --model {hub_id}: not found locally (not a directory, not fully in the Hugging "
                          "Face cache at ")
    assert f"download it where there is network (hf download {hub_id})" in err


def test_model_neither_a_directory_nor_a_hub_id_is_a_clean_error(capsys):
    assert one_line_error(["generate", "--model", "not a hub id!", "--prompt", "p"], capsys).startswith(
        "error: --model not a hub id!: neither a pipeline directory nor a hub id (Repo id must use alphanumeric chars")


@needs_pipeline
def test_broken_pipeline_directory_is_a_clean_error(tiny_wan_dir, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wan_dir, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert main(["generate", "--model", str(broken), "--prompt", "a cat"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: --model {broken}: cannot load this pipeline directory: ")


def test_generate_without_diffusers_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing it raises ImportError
    assert one_line_error(["generate", "--model", "m", "--prompt", "p"], capsys) == \
        'error: rainfusion generate needs diffusers: pip install "rainfusion[diffusers]"'


@pytest.mark.parametrize("load_fails", [False, True])
def test_logs_are_held_back_while_loading(load_fails, monkeypatch):
    """What a library logs during the load comes after a load that works, not at all after one that
    fails; its logger's handlers and propagation are as before either way."""
    monkeypatch.setitem(sys.modules, "some_library", types.ModuleType("some_library"))
    library = logging.getLogger("some_library")
    seen = []
    recorder = logging.Handler()
    recorder.emit = lambda record: seen.append(record.getMessage())
    monkeypatch.setattr(library, "handlers", [recorder])
    monkeypatch.setattr(library, "propagate", False)
    with pytest.raises(OSError) if load_fails else contextlib.nullcontext():
        with gen.logs_held_back(("some_library",)):
            library.getChild("hub").warning("Couldn't connect to the Hub")
            assert seen == []
            if load_fails:
                raise OSError("not cached")
    assert seen == ([] if load_fails else ["Couldn't connect to the Hub"])
    assert library.handlers == [recorder] and library.propagate is False


@needs_pipeline
def test_unsupported_pipeline_exits_2_with_the_supported_list(monkeypatch, capsys):
    unsupported = types.SimpleNamespace(transformer=torch.nn.Linear(4, 4), scheduler=None)
    monkeypatch.setattr(gen, "load_pipeline", lambda model, dtype: unsupported)
    code = main(["generate", "--model", "any", "--prompt", "a cat", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: rainfusion does not support Linear") and "WanTransformer3DModel" in err


def test_bad_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "x", "--prompt", "p", "--method", "sage"])
    assert exit_info.value.code == 2


# --- metrics -------------------------------------------------------------------------------


def test_psnr_and_ssim_of_identical_videos():
    video = torch.rand(3, 24, 20, 3, generator=torch.Generator().manual_seed(0))
    assert metrics.psnr(video, video.clone()) == math.inf
    assert metrics.ssim(video, video.clone()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level():
    g = torch.Generator().manual_seed(1)
    video = 0.1 + 0.8 * torch.rand(4, 32, 32, 3, generator=g)
    sign = torch.randint(0, 2, video.shape, generator=g) * 2 - 1
    # |error| = 0.01 everywhere: MSE = 1e-4, PSNR = 10 log10(1 / 1e-4) = 40 dB
    assert metrics.psnr(video, video + 0.01 * sign) == pytest.approx(40.0, abs=0.01)
    # data_range scales: the same error on a 0..255 scale is 255 times smaller relative to the range
    assert metrics.psnr(video * 255, (video + 0.01 * sign) * 255, data_range=255.0) == pytest.approx(40.0, abs=0.01)
    # Gaussian noise of sigma 0.05 (no clipping): PSNR = -20 log10(0.05) = 26.02 dB
    noise = 0.05 * torch.randn(8, 64, 64, 3, generator=g, dtype=torch.float64)
    assert metrics.psnr(video.double().repeat(2, 2, 2, 1), video.double().repeat(2, 2, 2, 1) + noise) == \
        pytest.approx(-20 * math.log10(0.05), abs=0.02)


def test_ssim_of_constant_images_has_the_closed_form():
    # no variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with C1 = 0.01^2
    a, b = torch.full((2, 16, 16, 3), 0.3), torch.full((2, 16, 16, 3), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_drops_with_noise_and_is_symmetric():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(32, 32, 1, generator=g)  # one image, one channel
    noisy = (image + 0.2 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    value = metrics.ssim(image, noisy)
    assert 0 < value < 0.9
    assert metrics.ssim(noisy, image) == pytest.approx(value, rel=1e-12)
    assert metrics.ssim(image, 1 - image) < 0  # anti-correlated structure


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(2, 16, 16, 3), torch.zeros(2, 16, 17, 3))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8, 3))
