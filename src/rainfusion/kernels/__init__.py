"""GPU kernels. ``block_sparse``: our Triton block-sparse forward (imports Triton on use);
``fa4``: the optional FlashAttention-4 backend. Import the submodules directly."""
