import pytest

from rainfusion import RainFusion2Config, RainFusionConfig, VideoLayout


def test_layout_counts_and_positions():
    layout = VideoLayout(13, 30, 45, text_len=226, text_position="before")
    assert layout.num_tokens == 13 * 30 * 45 + 226
    assert layout.video_start == 226 and layout.text_start == 0
    after = VideoLayout(33, 45, 80, text_len=256, text_position="after")
    assert after.video_start == 0 and after.text_start == 33 * 45 * 80
    after.check_sequence_length(after.num_tokens)
    with pytest.raises(ValueError, match=r"query has sequence length 10, but layout 33x45x80 \+ 256 text expects"):
        after.check_sequence_length(10)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(frames=0), ValueError, "frames must be >= 1, got 0"),
        (dict(height=-2), ValueError, "height must be >= 1, got -2"),
        (dict(width=2.5), TypeError, "width must be an int, got float"),
        (dict(text_len=5), ValueError, "text_len=5 needs text_position"),
        (dict(text_position="before"), ValueError, "needs text_len > 0"),
        (dict(text_len=4, text_position="middle"), ValueError, "text_position must be one of"),
    ],
)
def test_layout_rejects_bad_values(kwargs, error, match):
    args = dict(frames=2, height=3, width=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        VideoLayout(**args)


def test_config_defaults_and_presets():
    v1 = RainFusionConfig()
    assert (v1.sparsity, v1.alpha, v1.tau, v1.adaptive_bandwidth, v1.warmup_fraction, v1.sink_first_frame) == (
        0.5, 0.9, 2, False, 0.1, True)
    assert RainFusionConfig.rainfusion_plus().adaptive_bandwidth
    assert not RainFusionConfig.image().sink_first_frame
    v2 = RainFusion2Config()
    assert (v2.sparsity, v2.block_size, v2.permutation, v2.selection, v2.sink_first_frame, v2.refresh_interval,
            v2.warmup_fraction) == (0.8, 128, "window3d", "topk", True, 1, 0.3)
    image = RainFusion2Config.image()
    assert (image.sparsity, image.permutation, image.sink_first_frame) == (0.6, "tile2d", False)
    assert RainFusion2Config.video(sparsity=0.9).sparsity == 0.9


@pytest.mark.parametrize(
    "cls,kwargs,error,match",
    [
        (RainFusion2Config, dict(sparsity=1.0), ValueError, r"sparsity must be in \[0.0, 1.0\), got 1.0"),
        (RainFusion2Config, dict(sparsity=-0.1), ValueError, "sparsity must be in"),
        (RainFusionConfig, dict(sparsity="0.5"), TypeError, "sparsity must be a float, got str"),
        (RainFusion2Config, dict(block_size=96), ValueError, r"block_size must be one of \(64, 128\), got 96"),
        (RainFusionConfig, dict(block_size=256), ValueError, "block_size must be one of"),
        (RainFusion2Config, dict(permutation="hilbert"), ValueError, "permutation must be"),
        (RainFusion2Config, dict(selection="random"), ValueError, "selection must be"),
        (RainFusion2Config, dict(top_p=1.5), ValueError, "top_p must be in"),
        (RainFusion2Config, dict(refresh_interval=0), ValueError, "refresh_interval must be >= 1"),
        (RainFusionConfig, dict(alpha=1.2), ValueError, "alpha must be in"),
        (RainFusionConfig, dict(tau=0), ValueError, "tau must be >= 1"),
        (RainFusionConfig, dict(bandwidths=()), TypeError, "bandwidths must be a non-empty tuple"),
        (RainFusionConfig, dict(bandwidths=(0.5, 0.0)), ValueError, "bandwidths must be > 0"),
        (RainFusionConfig, dict(warmup_fraction=2.0), ValueError, "warmup_fraction must be in"),
        (RainFusionConfig, dict(sink_first_frame=1), TypeError, "sink_first_frame must be a bool"),
        (RainFusionConfig, dict(textural="no"), TypeError, "textural must be a bool, got str"),
        (RainFusion2Config, dict(forced_in_budget=0), TypeError, "forced_in_budget must be a bool, got int"),
    ],
)
def test_configs_reject_bad_values(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_configs_are_frozen():
    with pytest.raises(Exception):
        RainFusion2Config().sparsity = 0.5
