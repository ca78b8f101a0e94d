"""torch.hub entry points: ``torch.hub.load("<checkout>", "vgim", run="<run dir or s3://...>", source="local")``
gives a trained run's encoder (docs/downstream.md); ``vgim_s3prl`` the same run as an s3prl upstream."""

dependencies = ["torch", "safetensors", "yaml", "fsspec"]


def vgim(run: str, step: int | None = None, modules=None, endpoint_url: str = ""):
    """`vgim_dist.downstream.load_encoder`: waveforms (B, samples) at 16 kHz -> each module's (B, frames, C)."""
    from vgim_dist.downstream import load_encoder  # noqa: PLC0415 - hub imports this file before the package

    return load_encoder(run, step, modules, endpoint_url)


def vgim_s3prl(run: str, step: int | None = None, layers=None, endpoint_url: str = ""):
    """`vgim_dist.downstream.Upstream`: a list of 1-D waveforms -> {"hidden_states": [(B, T, C), ...]}."""
    from vgim_dist.downstream import Upstream  # noqa: PLC0415

    return Upstream(run, step, layers, endpoint_url)
