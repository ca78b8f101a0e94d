"""The encoder as greedy modules: conv blocks, Gaussian heads, a GRU, each module with its own loss.

A module maps (B, C_in, T_in) to (B, C_out, T_out). In training it returns its loss terms and the
detached tensor the next module trains on; no gradient ever leaves a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vgim_dist.config import LayerConfig, ModelConfig, ModuleConfig
from vgim_dist.model.loss import gaussian_kl, info_nce
from vgim_dist.parallel.data_parallel import ReplicaGroup
from vgim_dist.seeding import derive_seed


def conv_frames(length: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output frames of a Conv1d / MaxPool1d: floor((L + 2p - k) / s) + 1."""
    return (length + 2 * padding - kernel) // stride + 1


class ConvBlock(nn.Sequential):
    """Conv1d -> [BatchNorm1d] -> ReLU -> [MaxPool1d]."""

    def __init__(self, c_in: int, c_out: int, layer: LayerConfig, batch_norm: bool):
        parts: list[nn.Module] = [nn.Conv1d(c_in, c_out, layer.kernel, layer.stride, layer.padding)]
        if batch_norm:
            parts.append(nn.BatchNorm1d(c_out))
        parts.append(nn.ReLU())
        if layer.pool_kernel:
            parts.append(nn.MaxPool1d(layer.pool_kernel, layer.pool_stride or layer.pool_kernel))
        super().__init__(*parts)


@dataclass
class ModuleStep:
    """What one module's training forward pass produces."""

    loss: torch.Tensor   # nce + kld_weight * kl, the only thing backpropagated
    nce: torch.Tensor
    kl: torch.Tensor     # zero for deterministic modules
    output: torch.Tensor  # (B, C_out, T_out), detached: the next module's input


class GreedyModule(nn.Module):
    """One greedy unit: [conv blocks -> Gaussian head] and/or [GRU], plus its InfoNCE predictor.

    - conv only (V-GIM / GIM module): context c and target z are two samples of N(mu, sigma^2) (V-GIM),
      or both mu (GIM); the next module receives z.
    - GRU only (the autoregressor module): context = GRU(input), targets = the (detached) input.
    - conv + GRU (CPC): targets = the conv output (no Gaussian head), context = GRU(targets).
    """

    def __init__(self, spec: ModuleConfig, c_in: int, model: ModelConfig):
        super().__init__()
        C = model.channels
        self.variational = model.variational
        self.kld_weight = model.kld_weight if model.variational else 0.0
        self.steps, self.negatives, self.window = model.prediction_steps, model.negatives, model.subsample_frames
        self.layers = nn.Sequential(*[ConvBlock(c_in if i == 0 else C, C, layer, model.batch_norm)
                                      for i, layer in enumerate(spec.layers)])
        target_dim = C if spec.layers else c_in
        self.gaussian = bool(spec.layers) and not spec.autoregressor
        if self.gaussian:
            pad = model.head_kernel // 2
            self.mu = nn.Conv1d(C, C, model.head_kernel, 1, pad)
            self.logvar = nn.Conv1d(C, C, model.head_kernel, 1, pad)
        self.gru = nn.GRU(target_dim, spec.autoregressor, batch_first=True) if spec.autoregressor else None
        context_dim = spec.autoregressor or C
        self.predictor = nn.Linear(context_dim, target_dim * self.steps, bias=False)
        self.out_channels = spec.autoregressor or C

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C_in, T) -> mu, logvar (B, C, L); logvar is None without a Gaussian head."""
        h = self.layers(x)
        if not self.gaussian:
            return h, None
        return self.mu(h), self.logvar(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                replicas: ReplicaGroup | None = None) -> ModuleStep:
        """Loss terms on batch ``x`` (B, C_in, T); with ``replicas``, x is this replica's rows and the loss
        terms its share of the whole batch's."""
        mu, logvar = self.latents(x)
        share = replicas.share(x.shape[0], x.device) if replicas is not None else None
        kl = mu.new_zeros(())
        if self.gaussian and self.variational:
            std = torch.exp(0.5 * logvar)
            # With replicas: draw the whole batch's noise from the shared generator, keep this replica's rows.
            rows, batch = (share.rows, share.total) if share else (slice(None), None)
            shape = (batch or mu.shape[0], *mu.shape[1:])
            c = mu + std * torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)[rows]
            z = mu + std * torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)[rows]
            kl = gaussian_kl(mu, logvar, batch)
        else:
            c = z = mu
        target = z.transpose(1, 2)                                          # (B, L, D)
        if self.gru is not None:
            context, _ = self.gru(target)                                  # (B, L, H), zero initial state
            out = context.transpose(1, 2)                                  # (B, H, L)
        else:
            context, out = c.transpose(1, 2), z                            # (B, L, C), (B, C, L)
        nce = info_nce(context, target, self.predictor, steps=self.steps, negatives=self.negatives,
                       window=self.window, generator=generator, share=share)
        return ModuleStep(loss=nce + self.kld_weight * kl, nce=nce, kl=kl, output=out.detach())

    @torch.no_grad()
    def encode(self, x: torch.Tensor, deterministic: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Features for probes and decoders: mu (or one sample) for conv modules, the GRU output otherwise."""
        mu, logvar = self.latents(x)
        z = mu
        if self.gaussian and self.variational and not deterministic:
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=mu.device,
                                                           dtype=mu.dtype)
        if self.gru is not None:
            return self.gru(z.transpose(1, 2))[0].transpose(1, 2)
        return z


def module_geometry(spec: ModuleConfig, model: ModelConfig) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of every length-changing op of a module, in order (heads included)."""
    ops = []
    for layer in spec.layers:
        ops.append((layer.kernel, layer.stride, layer.padding))
        if layer.pool_kernel:
            ops.append((layer.pool_kernel, layer.pool_stride or layer.pool_kernel, 0))
    if spec.layers and not spec.autoregressor:
        ops.append((model.head_kernel, 1, model.head_kernel // 2))
    return ops


def loss_terms(model: ModelConfig, index: int) -> tuple[str, ...]:
    """The loss terms module ``index`` reports: its KL only where it is not 0 by construction (a Gaussian
    head of a variational model; never a GRU or a GIM module)."""
    spec = model.modules[index]
    gaussian = bool(spec.layers) and not spec.autoregressor
    return ("nce", "kl", "loss") if gaussian and model.variational else ("nce", "loss")


def out_channels(model: ModelConfig, index: int) -> int:
    """Channels module ``index`` emits (index -1: the raw waveform's single channel)."""
    return 1 if index < 0 else (model.modules[index].autoregressor or model.channels)


def build_module(model: ModelConfig, index: int, seed: int) -> GreedyModule:
    """Module ``index``, initialised from its own seed: the same weights whatever the stage split."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", index))
        return GreedyModule(model.modules[index], out_channels(model, index - 1), model)


def describe(model: ModelConfig, samples: int) -> list[dict]:
    """Per module: layers, parameters, output channels and frames for a ``samples`` input, hop, receptive field."""
    rows, frames, hop, field = [], samples, 1, 1
    for i, spec in enumerate(model.modules):
        for k, s, p in module_geometry(spec, model):
            frames = conv_frames(frames, k, s, p)
            field += (k - 1) * hop
            hop *= s
        with torch.device("meta"):
            m = GreedyModule(spec, out_channels(model, i - 1), model)
        rows.append({
            "module": i,
            "layers": [f"conv k{c.kernel} s{c.stride} p{c.padding}"
                       + (f" pool k{c.pool_kernel}" if c.pool_kernel else "") for c in spec.layers]
                      + ([f"gru {spec.autoregressor}"] if spec.autoregressor else []),
            "params": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "channels": m.out_channels,
            "frames": frames,
            "hop": hop,
            "receptive_field": field,
        })
    return rows
