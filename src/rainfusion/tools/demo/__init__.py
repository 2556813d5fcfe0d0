"""A small video DiT trained here, for quality measurements on a model whose attention learned
real structure (no pretrained video model can be downloaded): procedural videos (``videos``),
the model (``model``: diffusers' WanTransformer3DModel on pixel latents), flow matching and
sampling (``flow``), the training loop (``training``), the quality run (``run``) and the attention
analysis (``analysis``). Needs the ``demo`` extra."""
