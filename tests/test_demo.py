"""The demo model's pieces on CPU at tiny sizes: procedural videos, latents, checkpoint,
training, sampling with rainfusion applied to its (real diffusers) transformer."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout, apply_rainfusion, remove_rainfusion  # noqa: E402
from rainfusion.demo.flow import sample, training_loss  # noqa: E402
from rainfusion.demo.model import DemoVideoModel, from_latents, load_checkpoint, save_checkpoint, to_latents  # noqa: E402
from rainfusion.demo.training import train  # noqa: E402
from rainfusion.demo.videos import VOCAB, VideoSpec, caption_text, contact_sheet, sample_videos  # noqa: E402
from rainfusion.reference import relative_l2  # noqa: E402

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
    from rainfusion.demo.videos import render

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
    from rainfusion.cli import main
    from rainfusion.demo.run import Variant, run_demo

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

    exact = [Variant("dense", None), Variant("v2 at 0", RainFusion2Config(sparsity=0.0, block_size=64))]
    report, videos = run_demo(path, variant_list=exact, clips=2, steps=3, log=lambda _: None)
    assert report["rows"][1]["psnr"] > 60 and report["rows"][1]["sparse_density"] == 1.0
    assert videos["v2 at 0"].shape == (2, 4, 64, 64, 3)


def test_demo_bad_input_says_what_to_do(tmp_path, capsys):
    from rainfusion.cli import main
    from rainfusion.demo.run import Variant, run_demo

    assert main(["demo", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "no demo checkpoint at" in capsys.readouterr().err
    path = tmp_path / "small.safetensors"
    save_checkpoint(DemoVideoModel(VideoSpec(frames=2, size=16), TINY), str(path))
    assert main(["demo", "--checkpoint", str(path), "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must start with the dense variant"):
        run_demo(path, variant_list=[Variant("v2", RainFusion2Config())])
    with pytest.raises(ValueError, match="steps and batch must be >= 1"):
        train(VideoSpec(frames=2, size=16), steps=0, batch=2, device="cpu")


def test_attention_analysis_matches_a_direct_computation(tmp_path):
    """Per layer and head: the frame-to-frame mass and the ARM verdict of the recorded q, k equal
    a direct float64 computation on the same q, k; one figure per layer."""
    from rainfusion.arm import recognise_heads
    from rainfusion.demo.analysis import _RecordSelfAttention, analyse, layout_of, plot_layer

    spec = VideoSpec(frames=3, size=32)  # 3 x 4 x 4 = 48 tokens
    model = DemoVideoModel(spec, TINY).eval()
    layers = analyse(model, noise=0.6, seed=1)
    assert len(layers) == TINY["num_layers"]
    layout = layout_of(model)
    assert layout == VideoLayout(3, 4, 4)
    # the same forward, recorded again: q and k of layer 1
    from rainfusion.demo.model import to_latents

    generator = torch.Generator().manual_seed(1)
    videos, captions = sample_videos(1, spec, generator)
    latents = to_latents(videos)
    noisy = 0.4 * latents + 0.6 * torch.randn(latents.shape, generator=generator)
    recorder = _RecordSelfAttention(layout.num_tokens)
    with recorder, torch.no_grad():
        model(noisy, torch.tensor([600.0]), captions)
    q, k = (t.double() for t in recorder.calls[1])
    probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8.0, -1)  # head dim 64
    mass = torch.stack([probs[:, 16 * i:16 * (i + 1)].view(2, 16, 3, 16).sum(-1).mean(1) for i in range(3)], 1)
    assert torch.allclose(layers[1].frame_mass.double(), mass, atol=1e-5)
    assert torch.allclose(layers[1].frame_mass.sum(-1), torch.ones(2, 3), atol=1e-5)
    verdict = recognise_heads(q.float(), k.float(), layout, RainFusionConfig(sink_first_frame=False), scale=0.125)
    assert layers[1].patterns == [["spatial", "temporal", "textural"][p] for p in verdict.pattern[0].tolist()]
    assert layers[1].spatial.shape == (2, 7, 7)
    middle = torch.arange(16, 32)  # frame 1's tokens: the centre offset is each query's weight on itself
    assert torch.allclose(layers[1].spatial[:, 3, 3].double(), probs[:, middle, middle].mean(-1), atol=1e-5)
    pytest.importorskip("matplotlib")
    plot_layer(layers[1], "test", tmp_path / "layer1.png")
    assert (tmp_path / "layer1.png").read_bytes()[:4] == b"\x89PNG"
