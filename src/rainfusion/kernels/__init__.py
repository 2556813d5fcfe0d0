"""GPU kernels, each launcher (a torch custom op) beside its private Triton kernel: ``block_sparse``
(the block-sparse forward; its Gluon version for Hopper), ``gather_rows`` (token permutations),
``block_means`` (v2's pooled Q and K), ``top_blocks`` (v2's top-N key blocks), and ``fa4``, the
optional FlashAttention-4 backend. Only ``backends`` imports them; import the submodules directly."""
