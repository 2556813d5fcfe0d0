"""What is built on the library and imported by none of it: the ``rainfusion`` command (``cli``),
its benchmark (``bench``), plots, synthetic attention data, video quality metrics, the diffusers
``generate`` command and the demo model (``demo/``, with its trained weights)."""
