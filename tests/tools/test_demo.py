"""The demo model's pieces on CPU at tiny sizes: procedural videos, latents, checkpoint,
training, sampling with rainfusion applied to its (real diffusers) transformer."""

import dataclasses
import json
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout, apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.attention import sparse_attention  # noqa: E402
from rainfusion.tools.demo.flow import noise_levels, sample, shifted, training_loss  # noqa: E402
from rainfusion.tools.demo.model import DemoVideoModel, from_latents, load_checkpoint, save_checkpoint, to_latents  # noqa: E402
from rainfusion.tools.demo.training import train  # noqa: E402
from rainfusion.tools.demo.videos import VOCAB, VideoSpec, caption_text, contact_sheet, sample_videos  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402
from rainfusion.steps import AttentionState  # noqa: E402
from test_cli import one_line_error  # noqa: E402

TINY = dict(num_layers=2, ffn_dim=128, num_attention_heads=2, text_dim=32, freq_dim=32)


def test_videos_are_reproducible_and_in_range():
    spec = VideoSpec(frames=6, size=32)
    a, captions = sample_videos(5, spec, torch.Generator().manual_seed(3))
    b, again = sample_videos(5, spec, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(captions, again)
    assert a.shape == (5, 3, 6, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert captions.shape == (5, spec.caption_length) and (captions[:, 1] != 0).all()  # an object in every clip
    assert all(VOCAB[int(c)] in ("still", "pan-left", "pan-right", "pan-up", "pan-down") for c in captions[:, 0])
    assert caption_text(captions[0]).count(";") == 1
    assert contact_sheet(a, frames=3).shape == (5 * 32, 3 * 32, 3)


@pytest.mark.parametrize("motion,axis,sign", [("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)])
def test_an_object_moves_as_its_caption_says(motion, axis, sign):
    spec = VideoSpec(frames=8, size=64, max_objects=1)
    caption = torch.tensor([[VOCAB.index(w) for w in ("still", "disc", "white", motion)]])
    from rainfusion.tools.demo.videos import render

    video = render(caption, spec, torch.Generator().manual_seed(0))
    bright = (video.mean(1)[0] > 0.3).float()  # [T, S, S]: the white disc (the background is dark)
    coords = torch.arange(64.0)
    mass = bright.sum((1, 2))
    centre = torch.stack([(bright.sum(1) * coords).sum(-1), (bright.sum(2) * coords).sum(-1)], -1) / mass[:, None]
    assert (mass > 20).all()
    assert sign * (centre[-1, axis] - centre[0, axis]) > 20  # pixels travelled along the caption's direction
    assert (centre[-1, 1 - axis] - centre[0, 1 - axis]).abs() < 4


def test_latents_round_trip_exactly():
    videos = torch.rand(2, 3, 3, 16, 24) * 2 - 1
    latents = to_latents(videos)
    assert latents.shape == (2, 48, 3, 4, 6) and torch.equal(from_latents(latents), videos)
    with pytest.raises(ValueError, match="multiples of 4"):
        to_latents(videos[..., :10])


def test_checkpoint_round_trip(tmp_path):
    spec = VideoSpec(frames=2, size=16)
    model = DemoVideoModel(spec, TINY).eval()
    path = str(tmp_path / "demo.safetensors")
    save_checkpoint(model, path, dtype=torch.float32)
    again = load_checkpoint(path)
    videos, captions = sample_videos(2, spec, torch.Generator().manual_seed(1))
    latents, t = to_latents(videos), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        assert torch.equal(again(latents, t, captions), model(latents, t, captions))
    assert again.spec == spec


def test_training_lowers_the_loss_on_held_out_clips():
    spec = VideoSpec(frames=2, size=16)
    held_out = sample_videos(16, spec, torch.Generator().manual_seed(99))

    def loss(model):
        with torch.no_grad():
            return float(training_loss(model, to_latents(held_out[0]), held_out[1], torch.Generator().manual_seed(5),
                                       drop_caption=0.0))

    torch.manual_seed(0)
    untrained = DemoVideoModel(spec, TINY)
    trained, log = train(spec, steps=60, batch=8, lr=2e-3, warmup=5, ema=0.9, device="cpu", log_every=20,
                         transformer_config=TINY, init=untrained)
    assert [row["step"] for row in log] == [20, 40, 60]
    assert loss(trained) < 0.8 * loss(untrained)
    _, log = train(spec, steps=60, stop_at=25, batch=2, device="cpu", log_every=20, transformer_config=TINY)
    assert [row["step"] for row in log] == [20, 25] and log[-1]["lr"] > 0  # cut inside the 60-step schedule


def test_noise_shift_moves_levels_towards_one():
    sigma = torch.rand(1000)
    assert torch.equal(shifted(sigma, 1.0), sigma)
    assert bool((shifted(sigma, 6.0) >= sigma).all())
    assert shifted(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])
    levels = noise_levels(10)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and bool((levels[1:] < levels[:-1]).all())


def test_sampling_with_rainfusion_at_sparsity_zero_matches_dense():
    spec = VideoSpec(frames=4, size=64)  # 4 x 8 x 8 = 256 tokens: one 64-token block per frame
    model = DemoVideoModel(spec, TINY).eval()
    captions = sample_videos(2, spec, torch.Generator().manual_seed(2))[1]
    dense = sample(model, captions, torch.Generator().manual_seed(4), steps=4)
    controller = apply_rainfusion(model.transformer, RainFusion2Config(sparsity=0.0, block_size=64,
                                                                       warmup_fraction=0.25), num_steps=4)
    sparse = sample(model, captions, torch.Generator().manual_seed(4), steps=4)
    remove_rainfusion(model.transformer)
    assert relative_l2(sparse, dense) < 1e-4
    assert sorted({step for step, *_ in controller.history}) == [0, 1, 2, 3]
    assert [s.dense for step, *_, s in controller.history if step == 0] == [True, True]
    assert not any(s.dense for step, *_, s in controller.history if step > 0)


def test_demo_command_on_a_small_checkpoint(tmp_path, capsys):
    """`rainfusion demo --quick` end to end on a small random-weight checkpoint: the table, the
    JSON, the GIF; dense against itself is exact, and v2 at sparsity 0 matches dense."""
    from rainfusion.tools.cli import main
    from rainfusion.tools.demo.run import Variant, run_demo, sensitivity_variants

    spec = VideoSpec(frames=4, size=64)
    path = tmp_path / "small.safetensors"
    save_checkpoint(DemoVideoModel(spec, TINY).eval(), str(path), dtype=torch.float32)
    code = main(["demo", "--checkpoint", str(path), "--quick", "--steps", "3", "--block-size", "64",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rainfusion2 0.8" in out and "rainfusion 0.5" in out
    report = __import__("json").loads((tmp_path / "out" / "demo.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["dense", "rainfusion 0.5", "rainfusion2 0.8"]
    dense = report["rows"][0]
    assert dense["psnr"] == 99.0 and dense["ssim"] == pytest.approx(1.0) and dense["density"] == 1.0
    assert all(r["density"] < 1.0 for r in report["rows"][1:])
    assert (tmp_path / "out" / "demo.gif").read_bytes()[:3] == b"GIF"

    assert main(["demo", "--checkpoint", str(path), "--sensitivity", "--clips", "1", "--steps", "2", "--block-size", "64",
                 "--out", str(tmp_path / "sensitivity")]) == 0
    report = __import__("json").loads((tmp_path / "sensitivity" / "demo.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["dense", "rainfusion2 0.8 layer 0 only", "rainfusion2 0.8 layer 1 only",
                                                      "rainfusion2 0.8 warm-up 0.5", "rainfusion 0.5 warm-up 0.5"]
    assert [v.skip_layers for v in sensitivity_variants(3)[1:4]] == [(1, 2), (0, 2), (0, 1)]

    exact = [Variant("dense", None), Variant("v2 at 0", RainFusion2Config(sparsity=0.0, block_size=64))]
    report, videos = run_demo(path, variant_list=exact, clips=2, steps=3, log=lambda _: None)
    assert report["rows"][1]["psnr"] > 60 and report["rows"][1]["sparse_density"] == 1.0
    assert videos["v2 at 0"].shape == (2, 4, 64, 64, 3)
    assert report["tokens"] == 4 * 8 * 8  # 64 px / 4 px per cell / patch 2, per frame


def test_demo_bad_input_says_what_to_do(tmp_path, capsys):
    from rainfusion.tools.cli import main
    from rainfusion.tools.demo.run import Variant, run_demo

    assert main(["demo", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "no demo checkpoint at" in capsys.readouterr().err
    path = tmp_path / "small.safetensors"
    save_checkpoint(DemoVideoModel(VideoSpec(frames=2, size=16), TINY), str(path))
    assert one_line_error(["demo", "--checkpoint", str(path), "--steps", "0"], capsys) == \
        "error: argument --steps: expected an integer >= 1, got '0'"
    not_a_checkpoint = tmp_path / "garbage.safetensors"
    not_a_checkpoint.write_bytes(b"not a safetensors file")
    assert one_line_error(["demo", "--checkpoint", str(not_a_checkpoint)], capsys).startswith(
        f"error: --checkpoint {not_a_checkpoint}: not a demo checkpoint (SafetensorError: ")
    with pytest.raises(ValueError, match="must start with the dense variant"):
        run_demo(path, variant_list=[Variant("v2", RainFusion2Config())])
    with pytest.raises(ValueError, match="steps and batch must be >= 1"):
        train(VideoSpec(frames=2, size=16), steps=0, batch=2, device="cpu")
    with pytest.raises(ValueError, match=r"stop_at must be in \[1, steps=5\], got 6"):
        train(VideoSpec(frames=2, size=16), steps=5, stop_at=6, batch=2, device="cpu")


@pytest.mark.parametrize("module", ["diffusers", "safetensors"])
def test_demo_without_its_packages_names_the_extra(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    assert one_line_error(["demo", "--quick"], capsys) == \
        f'error: rainfusion demo needs {module}: pip install "rainfusion[demo]"'


def test_demo_without_matplotlib_runs_and_says_the_plot_is_skipped(tmp_path, monkeypatch, capsys):
    from rainfusion.tools.cli import main

    path = tmp_path / "small.safetensors"
    save_checkpoint(DemoVideoModel(VideoSpec(frames=2, size=32), TINY).eval(), str(path), dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it raises ImportError
    out_dir = tmp_path / "out"
    assert main(["demo", "--checkpoint", str(path), "--quick", "--steps", "1", "--block-size", "64",
                 "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    skipped = [line for line in printed if "demo-quality.png" in line]
    assert skipped == [f'skipped {out_dir / "demo-quality.png"}: the quality plot needs matplotlib: '
                       'pip install "rainfusion[demo]"']
    assert not (out_dir / "demo-quality.png").exists()
    assert len(json.loads((out_dir / "demo.json").read_text())["rows"]) == 3


def test_attention_analysis_matches_a_direct_computation(tmp_path):
    """Per layer and head: the frame-to-frame mass and the ARM verdict of the recorded q, k equal
    a direct float64 computation on the same q, k; one figure per layer."""
    from rainfusion.arm import recognise_heads
    from rainfusion.tools.demo.analysis import analyse, capture_self_attention, plot_layer

    spec = VideoSpec(frames=3, size=32)  # 3 x 4 x 4 = 48 tokens
    model = DemoVideoModel(spec, TINY).eval()
    layers = analyse(model, noise=0.6, seed=1)
    assert len(layers) == TINY["num_layers"]
    layout = model.layout
    assert layout == VideoLayout(3, 4, 4)
    q, k, v = (t.double() for t in capture_self_attention(model, noise=0.6, seed=1)[1])  # the same forward, layer 1
    assert v.shape == q.shape
    probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8.0, -1)  # head dim 64
    mass = torch.stack([probs[:, 16 * i:16 * (i + 1)].view(2, 16, 3, 16).sum(-1).mean(1) for i in range(3)], 1)
    assert torch.allclose(layers[1].frame_mass.double(), mass, atol=1e-5)
    assert torch.allclose(layers[1].frame_mass.sum(-1), torch.ones(2, 3), atol=1e-5)
    verdict = recognise_heads(q.float(), k.float(), layout, RainFusionConfig(sink_first_frame=False), scale=0.125)
    assert layers[1].patterns == [["spatial", "temporal", "textural"][p] for p in verdict.pattern[0].tolist()]
    assert layers[1].spatial.shape == (2, 7, 7)
    assert layers[1].mask_recall["rainfusion2 0.8"] == pytest.approx([1.0, 1.0])  # 48 tokens: one block
    middle = torch.arange(16, 32)  # frame 1's tokens: the centre offset is each query's weight on itself
    assert torch.allclose(layers[1].spatial[:, 3, 3].double(), probs[:, middle, middle].mean(-1), atol=1e-5)
    pytest.importorskip("matplotlib")
    plot_layer(layers[1], "test", tmp_path / "layer1.png")
    assert (tmp_path / "layer1.png").read_bytes()[:4] == b"\x89PNG"


def test_attention_analysis_mask_recall_is_the_mass_inside_the_mask():
    """Mask recall per head equals the exact attention mass inside the predicted block mask,
    summed directly (raster order: 4 blocks of 64 tokens = one frame each), and the best recall
    the mass of each row's heaviest blocks at the same counts; all of it at sparsity 0."""
    from rainfusion.tools.demo.analysis import analyse, capture_self_attention

    spec = VideoSpec(frames=4, size=64)  # 4 x 8 x 8 = 256 tokens
    model = DemoVideoModel(spec, TINY).eval()
    masks = {"v2": RainFusion2Config(sparsity=0.5, block_size=64, permutation="none", sink_first_frame=False),
             "v2 at 0": RainFusion2Config(sparsity=0.0, block_size=64)}
    layers = analyse(model, noise=0.3, seed=2, masks=masks)
    layout = model.layout
    for layer, (query, key, _) in zip(layers, capture_self_attention(model, noise=0.3, seed=2)):
        q, k = query[:1].double(), key[:1].double()
        probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8.0, -1)  # [H, N, N]
        state = AttentionState()
        sparse_attention(q.float(), k.float(), k.float(), layout=layout, config=masks["v2"], state=state, scale=0.125)
        kept = state.cache.plan.mask.to_dense()[0].repeat_interleave(64, 1).repeat_interleave(64, 2)  # [H, N, N]
        direct = (probs * kept).sum(-1).mean(-1)
        assert layer.mask_recall["v2"] == pytest.approx(direct.tolist(), abs=1e-5)
        assert all(r < 0.999 for r in direct)
        assert layer.mask_recall["v2 at 0"] == pytest.approx([1.0, 1.0], abs=1e-9)
        # the best mask with the same block count per row: each row's heaviest frames, summed directly
        mass = probs.view(2, 4, 64, 4, 64).sum((2, 4))  # [H, query frame, key frame]
        counts = state.cache.plan.mask.counts[0].long()  # [H, 4]
        best = [sum(float(mass[h, i].sort(descending=True).values[:counts[h, i]].sum()) for i in range(4)) / 256
                for h in range(2)]
        assert layer.best_recall["v2"] == pytest.approx(best, abs=1e-5)
        assert all(b >= r - 1e-9 for b, r in zip(layer.best_recall["v2"], layer.mask_recall["v2"]))
        assert layer.best_recall["v2 at 0"] == pytest.approx([1.0, 1.0], abs=1e-9)


@pytest.mark.parametrize("name, frames, size", [("EMBEDDED", 16, 128), ("EMBEDDED_16K", 16, 256)])
def test_the_embedded_models_are_trained(name, frames, size):
    """Each checkpoint shipped in the package loads at its clip size, fits the 13 MB budget, and
    predicts the flow of held-out clips far better than the same architecture untrained (the
    16,384-token one on 4-frame clips of its size, to keep the test short)."""
    from rainfusion.tools.demo import run

    path = getattr(run, name)
    assert path.is_file() and path.stat().st_size <= 13 * 10**6
    model = load_checkpoint(path).eval()
    assert (model.spec.frames, model.spec.size) == (frames, size)
    spec = dataclasses.replace(model.spec, frames=4 if size > 128 else frames)
    untrained = DemoVideoModel(spec).eval()
    videos, captions = sample_videos(2, spec, torch.Generator().manual_seed(123))
    with torch.no_grad():
        losses = [float(training_loss(m, to_latents(videos), captions, torch.Generator().manual_seed(7), drop_caption=0.0))
                  for m in (model, untrained)]
    assert losses[0] < 0.2 * losses[1], losses
