"""The trained encoder as one nn.Module, rebuilt from a run directory (local or s3://) and a checkpoint, so
that any runner's run can be exported: its config from the run's own ``config.yaml``, its weights from
safetensors files verified against the checksums their commit recorded."""

from __future__ import annotations

import torch
from torch import nn

from vgim_dist.config import Config, config_from_text
from vgim_dist.data.audio import SAMPLE_RATE
from vgim_dist.model import GreedyModule, build_module, describe
from vgim_dist.run_dir import RunDir
from vgim_dist.train.checkpoint import CheckpointManager


class Encoder(nn.Module):
    """Every greedy module in order, in eval mode: waveform (B, 1, T) -> the last module's features
    (mu of a Gaussian module, the GRU output of an autoregressor), as `GreedyModule.encode` gives them."""

    def __init__(self, modules: list[GreedyModule]):
        super().__init__()
        self.stack = nn.ModuleList(modules)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.stack:
            x = m.encode(x, deterministic=True)
        return x


def initial_encoder(cfg: Config) -> Encoder:
    """The encoder as training initialises it (step 0): the same seeded build, no checkpoint; modules frozen
    from another run (data.lower_run, train/lower.py) as loaded from it."""
    modules = [build_module(cfg.model, i, cfg.seed) for i in range(len(cfg.model.modules))]
    if cfg.data.lower_run:
        lower = CheckpointManager(RunDir(cfg.data.lower_run, cfg.data.endpoint_url))
        for i in range(cfg.data.lower_module + 1):
            _load(modules[i], lower, cfg.data.lower_step, i)
    return Encoder(modules)


def _load(module: GreedyModule, ckpt: CheckpointManager, step: int, i: int) -> None:
    prefix = f"module.{i}."
    module.load_state_dict({k[len(prefix):]: v for k, v in ckpt.load_weights(step, i).items()})


class ChunkedEncoder:
    """Modules 0..K of ``encoder`` in eval mode: a waveform (samples,) -> module K's output (frames, width),
    float32. ``params``: a variational Gaussian module K gives its mean and log-variance side by side (width
    2C, `data.latents.parts`); otherwise the output the run's probes see (the mean, or the GRU output).

    The conv modules below the first autoregressor run ``chunk`` samples at a time (a multiple of their hop);
    an autoregressor, and what lies above it, over the whole utterance (it sees the utterance so far)."""

    def __init__(self, cfg: Config, encoder: Encoder, params: bool, chunk: int):
        self.cfg, self.stack, self.params = cfg, list(encoder.stack), params
        self.top = len(self.stack) - 1
        self.conv = next((i for i, m in enumerate(self.stack) if m.gru is not None), len(self.stack))
        row = describe(cfg.model, SAMPLE_RATE)[self.conv - 1] if self.conv else {"hop": 1, "receptive_field": 1}
        self.hop, self.field = row["hop"], row["receptive_field"]
        self.chunk = max(self.hop, chunk // self.hop * self.hop)
        self.margin = -(-self.field // self.hop) * self.hop     # a receptive field, in whole hops

    def frames(self, samples: int) -> int:
        return describe(self.cfg.model, samples)[self.top]["frames"]

    def _conv_part(self, x: torch.Tensor) -> torch.Tensor:
        for i, m in enumerate(self.stack[:self.conv]):
            if i == self.top and self.params:
                return torch.cat(m.latents(x), 1)
            x = m.encode(x)
        return x

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        samples = x.shape[-1]
        if samples <= self.chunk:
            return self._conv_part(x)
        total = describe(self.cfg.model, samples)[self.conv - 1]["frames"]
        outs = []
        for s in range(0, samples, self.chunk):
            # The window [a, b) holds every sample the frames of [s, s + chunk) see (a frame's field starts
            # at most a field before it and ends at most a field after); a is a multiple of the hop, so the
            # window's frame j is the whole utterance's frame j + a / hop.
            a, b = max(0, s - self.margin), min(samples, s + self.chunk + self.margin)
            first, last = s // self.hop, min((s + self.chunk) // self.hop, total)
            outs.append(self._conv_part(x[..., a:b])[..., first - a // self.hop:last - a // self.hop])
        return torch.cat(outs, -1)

    @torch.no_grad()
    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        # oneDNN picks its convolution kernels by input length, and they round differently (by up to 3e-8 on
        # the smoke config): without it the chunked forward stays closer to the whole-utterance forward
        # (bitwise on AVX-512 CPUs; within 1e-6 on AVX2 ones, whose plain kernels also round by length).
        onednn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
        try:
            x = self._chunked(audio.reshape(1, 1, -1).float()) if self.conv else audio.reshape(1, 1, -1).float()
            for m in self.stack[self.conv:]:
                x = m.encode(x)
        finally:
            torch.backends.mkldnn.enabled = onednn
        return x[0].T.contiguous()


def run_config(run_dir: RunDir) -> Config:
    """The config a run trained with (the ``config.yaml`` it wrote), with ``run.dir`` the directory as given
    now, not as it was when training started."""
    try:
        text = run_dir.read(run_dir.config).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir.uri.rstrip('/')}/config.yaml: not found; is {run_dir.uri} a run "
                                "directory written by `vgim train`?") from None
    cfg = config_from_text(text, f"{run_dir.uri.rstrip('/')}/config.yaml")
    cfg.run.dir = run_dir.uri
    return cfg


def load_encoder(cfg: Config, step: int, run_dir: RunDir | None = None, upto: int | None = None) -> Encoder:
    """Modules 0..``upto`` (default: all) of ``cfg``'s run (in ``run_dir``, default ``cfg``'s) at checkpoint
    ``step``, on the CPU. A file that does not match its recorded checksum raises `CorruptCheckpoint`."""
    ckpt = CheckpointManager(run_dir or RunDir.of(cfg))
    modules = []
    for i in range(len(cfg.model.modules) if upto is None else upto + 1):
        modules.append(build_module(cfg.model, i, cfg.seed))
        _load(modules[-1], ckpt, step, i)
    return Encoder(modules)
