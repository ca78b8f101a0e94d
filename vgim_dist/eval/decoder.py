"""Decoders (docs/method.md "Evaluation"): from a frozen module's features back to the waveform.

The decoder mirrors the encoder: one ConvTranspose1d for every length-changing op of modules 0..M (conv,
max-pool, Gaussian head), in reverse order, ReLU between them and nothing after the last, so that its
output is a free-ranging waveform. Transposed convolutions cannot know the few samples a strided conv
dropped, so the output is cut or zero-padded to the input length.

The encoder is frozen and stays in eval mode the whole time (docs/method.md, published-code defect 2: the
published code put its BatchNorm back into train mode while training the decoder).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import save_file
from torch import nn

from vgim_dist.config import ModelConfig
from vgim_dist.data.audio import SAMPLE_RATE
from vgim_dist.data.loader import iter_utterances
from vgim_dist.data.source import build_source
from vgim_dist.eval.features import FeatureMode, Run, audio_uri, load_run
from vgim_dist.eval.names import LOSSES
from vgim_dist.eval.track import eval_dir, log_evaluation
from vgim_dist.model.modules import module_geometry, out_channels
from vgim_dist.progress import progress
from vgim_dist.seeding import derive_seed

N_FFT = 1024
N_MELS = 128

log = logging.getLogger(__name__)


class Decoder(nn.Module):
    """Features of module ``module`` (B, C_M, T_M) -> waveform (B, 1, length)."""

    def __init__(self, model: ModelConfig, module: int):
        super().__init__()
        ops = [op for i in range(module + 1) for op in module_geometry(model.modules[i], model)]
        if not ops:
            raise ValueError(f"module {module}: nothing to mirror (no conv layers up to it)")
        layers: list[nn.Module] = []
        c_in = out_channels(model, module)
        for j, (k, s, p) in enumerate(reversed(ops)):
            last = j == len(ops) - 1
            layers.append(nn.ConvTranspose1d(c_in, 1 if last else model.channels, k, s, p))
            if not last:
                layers.append(nn.ReLU())
            c_in = model.channels
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        y = self.net(z)                                                   # (B, 1, ~length)
        return F.pad(y, (0, length - y.shape[-1])) if y.shape[-1] < length else y[..., :length]


class ReconstructionLoss(nn.Module):
    """``mse`` (waveform), ``spectral`` (STFT power), ``mel`` (dB mel), or a ``+`` sum of them."""

    def __init__(self, name: str):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"decoder loss {name!r}: expected one of {list(LOSSES)}")
        self.parts = name.split("+")
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)
        self.db = torchaudio.transforms.AmplitudeToDB("power")

    def _power(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x.squeeze(1), N_FFT, window=self.window, return_complex=True).abs() ** 2

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction y and original x, both (B, 1, T)."""
        total = y.new_zeros(())
        for part in self.parts:
            if part == "mse":
                total = total + F.mse_loss(y, x)
            elif part == "spectral":
                total = total + F.mse_loss(self._power(y), self._power(x))
            else:
                total = total + F.mse_loss(self.db(self.mel(y)), self.db(self.mel(x)))
        return total


def train_decoder(run: Run, module: int, loss: ReconstructionLoss, data: str, steps: int, batch_size: int,
                  lr: float, mode: FeatureMode, seed: int, log_every: int = 10) -> tuple[Decoder, list[dict]]:
    """A decoder for ``module`` trained on random crops of the train split; returns it and its loss curve."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "decoder", module))
        decoder = Decoder(run.cfg.model, module)
    source = build_source(replace(run.cfg.data, uri=data, batch_size=batch_size), derive_seed(seed, "decoder-data"))
    gen = torch.Generator().manual_seed(derive_seed(seed, "decoder-features"))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    curve, last = [], [float("nan")]
    try:
        for step in progress(range(1, steps + 1), f"decoder module {module}", unit="step",
                             note=lambda _: f"loss {last[0]:.4f}", every=max(1, steps // 20)):
            x = source.batch(step)                                        # (B, 1, crop)
            z = run.encode(x, module, mode, gen)[-1]                      # frozen, no graph
            value = loss(decoder(z, x.shape[-1]), x)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            last[0] = value.item()
            if step % log_every == 0 or step == steps:
                curve.append({"step": step, "loss": last[0]})
    finally:
        source.close()
    return decoder, curve


def test_clips(uri: str, split: str, crop: int, endpoint_url: str = "") -> tuple[list[str], torch.Tensor]:
    """Every utterance of ``split`` in the fixed order, its first ``crop`` samples (zero-padded): (N, 1, crop)."""
    ids, clips = [], []
    for u in iter_utterances(uri, split, endpoint_url):
        clip = np.zeros(crop, np.float32)
        clip[:min(crop, len(u.audio))] = u.audio[:crop]
        ids.append(u.id)
        clips.append(torch.from_numpy(clip))
    if not ids:
        raise ValueError(f"{uri}: split {split!r} has no utterances")
    return ids, torch.stack(clips).unsqueeze(1)


@torch.no_grad()
def interpolation_scores(decoder: Decoder, z1: torch.Tensor, z2: torch.Tensor, length: int) -> dict[str, float]:
    """Copy the top-n most different channels of z2 into z1 (pairs (P, C, T)), decode, and compare with
    decode(z2): the MSE summed over pairs, relative to the same sum at n = 0. 1 at n = 0, 0 at n = C; a curve
    that falls fast means a few channels carry what tells two clips apart. A ratio of sums, not a mean of
    per-pair ratios: a pair whose two clips decode alike has no ratio. Empty when every pair does."""
    C = z1.shape[1]
    order = (z1 - z2).abs().mean(dim=2).argsort(dim=1, descending=True)  # (P, C): most different first
    target = decoder(z2, length)

    def err(z: torch.Tensor) -> float:
        return ((decoder(z, length) - target) ** 2).sum().item()

    base = err(z1)
    if base == 0:
        return {}
    scores = {}
    for n in sorted({0, C, *(2 ** k for k in range(C.bit_length()) if 2 ** k < C)}):
        take = torch.zeros_like(z1[:, :, :1]).scatter_(1, order[:, :n, None], 1.0)  # (P, C, 1)
        scores[str(n)] = err(z1 * (1 - take) + z2 * take) / base
    return scores


def write_wav(path: Path, x: torch.Tensor) -> None:
    sf.write(path, x.flatten().clamp(-1, 1).numpy(), SAMPLE_RATE, subtype="PCM_16")


def decoder_run(run_dir: str, module: int, loss_name: str, data: str = "", steps: int = 1000,
                batch_size: int = 64, lr: float = 2e-4, mode: FeatureMode = "mean", examples: int = 4,
                draws: int = 4, seed: int = 0, step: int | None = None, test_split: str = "test",
                track: bool = True) -> dict:
    """Train a decoder for ``module``; write its weights, reconstructions beside originals, decodes of
    N(0, I) draws and the interpolation scores under ``<run>/eval/decoder-m<M>-<loss>/``."""
    started = time.monotonic()
    run = load_run(run_dir, step)
    run.check_module(module)
    loss = ReconstructionLoss(loss_name)
    data = data or audio_uri(run.cfg)
    if data == "noise://":
        raise ValueError(f"{run_dir}: trained on noise://; pass --data with a shard directory")
    decoder, curve = train_decoder(run, module, loss, data, steps, batch_size, lr, mode, seed)
    decoder.eval()

    crop = run.cfg.data.crop
    ids, x = test_clips(data, test_split, crop, run.cfg.data.endpoint_url)         # (N, 1, crop)
    with torch.no_grad():
        z = torch.cat([run.encode(b, module)[-1] for b in x.split(64)])             # mu: (N, C, T)
        y = torch.cat([decoder(b, crop) for b in z.split(64)])                      # (N, 1, crop)
        test_loss = loss(y, x).item()
        gen = torch.Generator().manual_seed(derive_seed(seed, "prior"))
        prior = decoder(torch.randn((draws, *z.shape[1:]), generator=gen), crop)   # (draws, 1, crop)
    pairs = min(8, len(ids) // 2)
    interp = interpolation_scores(decoder, z[0:2 * pairs:2], z[1:2 * pairs:2], crop) if pairs else {}

    out = eval_dir(run_dir) / f"decoder-m{module}-{loss_name}"
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(min(examples, len(ids))):
        write_wav(audio / f"{ids[i]}.original.wav", x[i])
        write_wav(audio / f"{ids[i]}.reconstruction.wav", y[i])
        files.append({"id": ids[i], "original": f"audio/{ids[i]}.original.wav",
                      "reconstruction": f"audio/{ids[i]}.reconstruction.wav"})
    for k in range(draws):
        write_wav(audio / f"prior-{k}.wav", prior[k])
    save_file(decoder.state_dict(), out / "decoder.safetensors")
    result = {"run_dir": run_dir, "checkpoint_step": run.step, "module": module, "loss": loss_name,
              "data": data, "test_split": test_split, "features": mode, "steps": steps, "batch_size": batch_size,
              "lr": lr, "seed": seed, "curve": curve, "test_loss": test_loss, "n_test": len(ids),
              "interpolation": interp, "interpolation_pairs": pairs, "examples": files,
              "prior": [f"audio/prior-{k}.wav" for k in range(draws)], "seconds": round(time.monotonic() - started, 2)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    log.info("decoder module %d (%s): train loss %.4g -> %.4g, test loss %.4g", module, loss_name,
             curve[0]["loss"], curve[-1]["loss"], test_loss)
    if track:
        metrics = {"test_loss": test_loss, "train_loss": curve[-1]["loss"],
                   **{f"interpolation.n{n}": v for n, v in interp.items()}}
        log_evaluation(run_dir, out.name, metrics, [out / "result.json", audio])
    return result
