"""A trained run's encoder for use outside vgim-dist: `load_encoder` (also ``vgim_dist.load_encoder`` and the
``vgim`` entry of the repository's ``hubconf.py``) and an s3prl-style upstream, `Upstream` (docs/downstream.md).

Both read only the run directory (local or s3://): the config from its own ``config.yaml``, the weights from
safetensors files (never a pickle) that must match the checksums their commit recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vgim_dist.config import Config
from vgim_dist.model import describe
from vgim_dist.run_dir import RunDir
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.encoder import Encoder, load_encoder as load_modules, run_config

SAMPLE_RATE = 16000


class PretrainedEncoder(nn.Module):
    """Modules 0..max(``modules``) of a run, frozen, in eval mode: a batch of 16 kHz waveforms (B, samples)
    (or (B, 1, samples)) -> the output of each module in ``modules``, (B, frames, channels) each. A Gaussian
    module's output is its mean, an autoregressor's its GRU output, as the run's probes see them.

    Per output module, in the order of ``modules``: ``hops`` (input samples per output frame),
    ``receptive_fields`` (input samples one frame sees; None for an autoregressor and what lies above it,
    which see the whole utterance up to the frame) and ``channels``."""

    run: str
    step: int
    config: Config
    modules: tuple[int, ...]
    hops: tuple[int, ...]
    receptive_fields: tuple[int | None, ...]
    channels: tuple[int, ...]

    def __init__(self, run: str, step: int, cfg: Config, encoder: Encoder, modules: Sequence[int]):
        super().__init__()
        self.run, self.step, self.config, self.modules = run, step, cfg, tuple(modules)
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        geometry = module_geometry(cfg)
        self.hops = tuple(geometry[m]["hop"] for m in self.modules)
        self.receptive_fields = tuple(geometry[m]["receptive_field"] for m in self.modules)
        self.channels = tuple(geometry[m]["channels"] for m in self.modules)
        self.eval()

    def train(self, mode: bool = True) -> PretrainedEncoder:
        # Frozen: BatchNorm keeps the statistics of training whatever a caller's model.train() says.
        return super().train(False)

    def frames(self, samples: int) -> tuple[int, ...]:
        """Output frames of each module in ``modules`` for a waveform of ``samples`` samples."""
        rows = describe(self.config.model, samples)
        return tuple(rows[m]["frames"] for m in self.modules)

    @torch.no_grad()
    def forward(self, wavs: torch.Tensor) -> list[torch.Tensor]:
        if wavs.dim() == 2:
            wavs = wavs.unsqueeze(1)
        if wavs.dim() != 3 or wavs.shape[1] != 1:
            raise ValueError(f"expected waveforms (B, samples) or (B, 1, samples), got {tuple(wavs.shape)}")
        x, outs = wavs.float(), {}
        for i, m in enumerate(self.encoder.stack):
            x = m.encode(x, deterministic=True)
            outs[i] = x
        return [outs[m].transpose(1, 2) for m in self.modules]


def module_geometry(cfg: Config) -> list[dict]:
    """Per module of ``cfg``: ``hop``, ``receptive_field`` (None from the first autoregressor up) and
    ``channels``."""
    rows, recurrent = [], False
    for spec, row in zip(cfg.model.modules, describe(cfg.model, SAMPLE_RATE)):
        recurrent = recurrent or bool(spec.autoregressor)
        rows.append({"hop": row["hop"], "receptive_field": None if recurrent else row["receptive_field"],
                     "channels": row["channels"]})
    return rows


def load_encoder(run: str, step: int | None = None, modules: int | Sequence[int] | None = None,
                 endpoint_url: str = "") -> PretrainedEncoder:
    """The encoder of the run in directory ``run`` (a local path or s3://bucket/prefix) at checkpoint ``step``
    (default: the newest committed), returning the outputs of ``modules`` (default: every module; an int k is
    module k alone). A checkpoint file that does not match its recorded checksum is refused
    (`CorruptCheckpoint`, naming the file), never loaded and never passed over for an older one."""
    run_dir = RunDir(run, endpoint_url)
    cfg = run_config(run_dir)
    n = len(cfg.model.modules)
    wanted = list(range(n)) if modules is None else [modules] if isinstance(modules, int) else list(modules)
    if not wanted or any(not 0 <= m < n for m in wanted):
        raise ValueError(f"{run}: modules {wanted}: the run has modules 0..{n - 1}")
    steps = CheckpointManager(run_dir).steps()
    if not steps:
        raise FileNotFoundError(f"{run}: no committed checkpoint under {run.rstrip('/')}/checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{run}: no committed checkpoint for step {step}; it has {steps}")
    return PretrainedEncoder(run, step, cfg, load_modules(cfg, step, run_dir, upto=max(wanted)), wanted)


class Upstream(nn.Module):
    """An s3prl upstream over a run's encoder: a list of 1-D 16 kHz waveforms -> ``{"hidden_states": [...],
    "last_hidden_state": ...}``, each (B, frames, channels), the waveforms zero-padded to the longest.

    s3prl's ``Featurizer`` takes a weighted sum over the hidden states, so they must share one downsample rate
    and one width: by default the layers are the modules that share both with the last module (for
    ``configs/vgim.yaml`` the GRU alone; for ``configs/smoke.yaml`` modules 2 and 3); ``layers`` picks others,
    and a choice that mixes rates or widths is refused."""

    def __init__(self, run: str = "", step: int | None = None, layers: Sequence[int] | None = None,
                 endpoint_url: str = "", encoder: PretrainedEncoder | None = None):
        super().__init__()
        full = encoder or load_encoder(run, step, endpoint_url=endpoint_url)
        geometry = module_geometry(full.config)
        last = geometry[-1]
        layers = list(layers) if layers is not None else [
            m for m, g in enumerate(geometry) if (g["hop"], g["channels"]) == (last["hop"], last["channels"])]
        shapes = {(geometry[m]["hop"], geometry[m]["channels"]) for m in layers}
        if len(shapes) != 1:
            raise ValueError(f"layers {layers}: s3prl's Featurizer needs one downsample rate and one width, these "
                             f"have (hop, channels) {sorted(shapes)}")
        self.encoder = PretrainedEncoder(full.run, full.step, full.config, full.encoder, layers)
        self.layers = tuple(layers)
        (self.downsample_rate, self.hidden_size), = shapes

    # s3prl.nn.Featurizer reads these three
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def downsample_rates(self) -> list[int]:
        return [self.downsample_rate] * self.num_layers

    @property
    def hidden_sizes(self) -> list[int]:
        return [self.hidden_size] * self.num_layers

    def get_downsample_rates(self, key: str) -> int:
        """Input samples per frame of the features under ``key`` (s3prl's upstream interface)."""
        return self.downsample_rate

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        longest = max(len(w) for w in wavs)
        batch = torch.stack([F.pad(w.float(), (0, longest - len(w))) for w in wavs])
        hidden = self.encoder(batch.to(next(self.encoder.parameters()).device))
        return {"hidden_states": hidden, "last_hidden_state": hidden[-1]}
