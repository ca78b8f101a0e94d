"""vgim-dist: greedy, module-wise self-supervised speech models (V-GIM, GIM, CPC), trained as a pipeline."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``vgim_dist.load_encoder`` without importing torch for every ``import vgim_dist`` (the CLI's help).
    if name == "load_encoder":
        from vgim_dist.downstream import load_encoder  # noqa: PLC0415

        return load_encoder
    raise AttributeError(f"module 'vgim_dist' has no attribute {name!r}")
