"""Real diffusers pipelines of tiny random components, built offline for tests."""

import importlib.util

import pytest
import torch

# the tiny WanPipeline needs transformers (text encoder, tokenizer), tokenizers, and accelerate
# (diffusers loads WanTransformer3DModel, which keeps modules in fp32, only through it)
PIPELINE_DEPS = ("diffusers", "transformers", "tokenizers", "accelerate")
missing = [name for name in PIPELINE_DEPS if importlib.util.find_spec(name) is None]
needs_pipeline = pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")

WORDS = ["<pad>", "</s>", "<unk>", *"a an the cat dog runs on beach in snow red car video of slowly".split()]


def build_tiny_wan_pipeline(seed: int = 0, boundary_ratio: float | None = None):
    """A real WanPipeline of tiny random components; the tokenizer is a word-level one built here.
    With ``boundary_ratio``, a Wan2.2 A14B-style pipeline: a second transformer denoises the steps
    whose timestep is below boundary_ratio x 1000."""
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, num_heads=4, num_layers=1, d_ff=64, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    ))
    # 8x spatial / 4x temporal compression, 16 latent channels, as the real Wan VAE
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    transformers = [diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    ) for _ in range(1 if boundary_ratio is None else 2)]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    second = dict(transformer_2=transformers[1], boundary_ratio=boundary_ratio) if boundary_ratio is not None else {}
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=transformers[0], **second)
