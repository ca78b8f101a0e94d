"""vgim-dist: greedy, module-wise self-supervised speech models (V-GIM, GIM, CPC), trained as a pipeline."""

__version__ = "0.1.0"
