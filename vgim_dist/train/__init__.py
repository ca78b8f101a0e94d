"""Training: stages, checkpoints, metrics, and the runners that drive them."""
