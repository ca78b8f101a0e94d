"""A trained run's encoder outside vgim-dist: `vgim_dist.load_encoder` (local and S3, refusing a damaged
checkpoint), the torch.hub entry point and the s3prl-style upstream (against s3prl's own Featurizer where
s3prl imports, and against the interface as its source defines it either way)."""

from __future__ import annotations

import pytest
import s3fs
import torch

import vgim_dist
from vgim_dist.downstream import Upstream, load_encoder
from vgim_dist.run_dir import RunDir
from vgim_dist.train.checkpoint import CheckpointManager, CorruptCheckpoint
from vgim_dist.train.encoder import load_encoder as load_modules, run_config

from helpers import ROOT, small_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A 3-step smoke run (4 modules: BatchNorm, Gaussian heads, a GRU), checkpoints at steps 2 and 3."""
    return small_run(tmp_path_factory.mktemp("downstream") / "run")


def _reference(run: str, step: int, wav: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output as the run's own encoder gives it, (B, C, T) -> (B, T, C), its parameters frozen
    as load_encoder's are (on some CPUs torch's GRU takes another kernel, 1e-7 apart, when no parameter
    requires a gradient)."""
    cfg = run_config(RunDir(run))
    outs, x = [], wav.unsqueeze(1)
    modules = load_modules(cfg, step).requires_grad_(False)
    for m in modules.stack:
        x = m.encode(x)
        outs.append(x.transpose(1, 2))
    return outs


def test_load_encoder_gives_each_modules_output_hop_and_receptive_field(run):
    enc = vgim_dist.load_encoder(run)
    assert enc.step == 3 and enc.modules == (0, 1, 2, 3) and not enc.training
    assert enc.hops == (20, 80, 160, 160) and enc.receptive_fields == (45, 225, 465, None)
    assert enc.channels == (32, 32, 32, 32)
    wav = torch.randn(2, 4000) * 0.1
    outs = enc(wav)
    assert [o.shape for o in outs] == [(2, f, 32) for f in enc.frames(4000)]
    assert all(torch.equal(a, b) for a, b in zip(outs, _reference(run, 3, wav)))
    enc.train()     # frozen: BatchNorm keeps training's statistics
    assert not enc.training and all(torch.equal(a, b) for a, b in zip(enc(wav), outs))
    assert not any(p.requires_grad for p in enc.parameters())
    only = load_encoder(run, step=2, modules=[1])
    assert only.modules == (1,) and len(only.encoder.stack) == 2 and only.hops == (80,)
    assert torch.equal(only(wav)[0], _reference(run, 2, wav)[1])
    with pytest.raises(FileNotFoundError, match="no committed checkpoint for step 1"):
        load_encoder(run, step=1)
    with pytest.raises(ValueError, match=r"modules 0\.\.3"):
        load_encoder(run, modules=[4])


def test_load_encoder_from_s3(run, s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("encoders")
    fs.put(run, "encoders/run", recursive=True)
    enc = load_encoder("s3://encoders/run", endpoint_url=s3_endpoint)
    wav = torch.randn(1, 3000) * 0.1
    assert enc.step == 3 and all(torch.equal(a, b) for a, b in zip(enc(wav), load_encoder(run)(wav)))


def test_a_damaged_checkpoint_is_refused_not_passed_over(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = CheckpointManager(str(copy)).step_dir(3) + "/module-2.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-9, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(CorruptCheckpoint, match="module-2.safetensors: checksum mismatch"):
        load_encoder(str(copy))
    assert load_encoder(str(copy), modules=1).step == 3     # modules below the damage need only their files
    assert load_encoder(str(copy), step=2).step == 2


def test_torch_hub_entry_point(run):
    enc = torch.hub.load(str(ROOT), "vgim", run=run, source="local", modules=[3])
    wav = torch.randn(1, 3000) * 0.1
    assert enc.modules == (3,) and torch.equal(enc(wav)[0], load_encoder(run)(wav)[3])
    up = torch.hub.load(str(ROOT), "vgim_s3prl", run=run, source="local")
    assert up.layers == (2, 3)


def _check_upstream_interface(up, wavs: list[torch.Tensor]) -> None:
    """What s3prl's upstream/interfaces.py and nn/upstream.py ask of an upstream: a list of unpadded 1-D
    waveforms in, a dict with "hidden_states" out, each (batch, max frames, hidden size), a static downsample
    rate per feature key, and for the Featurizer one rate and one width across the layers."""
    out = up(wavs)
    assert isinstance(out["hidden_states"], list) and len(out["hidden_states"]) == up.num_layers
    rate = up.get_downsample_rates("hidden_states")
    assert up.downsample_rates == [rate] * up.num_layers and len(set(up.hidden_sizes)) == 1
    longest = max(len(w) for w in wavs)
    for h in out["hidden_states"]:
        assert h.dim() == 3 and h.shape[0] == len(wavs) and h.shape[2] == up.hidden_sizes[0]
        assert abs(h.shape[1] - round(longest / rate)) < 5    # s3prl's TOLERABLE_SEQLEN_DIFF
    assert torch.equal(out["last_hidden_state"], out["hidden_states"][-1])


def test_s3prl_upstream_interface(run):
    up = Upstream(run)
    assert up.layers == (2, 3) and up.downsample_rate == 160 and up.hidden_size == 32
    wavs = [torch.randn(16000) * 0.1, torch.randn(9000) * 0.1]
    _check_upstream_interface(up, wavs)
    # Each waveform's frames within its own length are the encoder's on that waveform alone, up to the
    # receptive field's reach into the padding (to rounding: a batch of another length runs other kernels).
    alone = up.encoder(wavs[1].unsqueeze(0))[-1]
    padded = up(wavs)["hidden_states"][-1][1]
    torch.testing.assert_close(padded[:alone.shape[1] - 3], alone[0, :-3], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one downsample rate and one width"):
        Upstream(run, layers=[1, 2])


def test_s3prls_own_featurizer(run):
    interfaces = pytest.importorskip("s3prl.upstream.interfaces", reason="s3prl is not installed")
    up = Upstream(run)
    featurizer = interfaces.Featurizer(up, upstream_device="cpu")
    assert featurizer.downsample_rate == 160 and featurizer.output_dim == 32 and featurizer.layer_num == 2
    wavs = [torch.randn(16000) * 0.1, torch.randn(8000) * 0.1]
    feats = featurizer(wavs, up(wavs))
    assert [f.shape for f in feats] == [(100, 32), (50, 32)]
    # s3prl.nn's newer Featurizer cannot be imported beside torchaudio 2.11: importing s3prl.nn imports every
    # upstream, one of which calls torchaudio.set_audio_backend (removed in torchaudio 2.9). Its three
    # attributes (num_layers, hidden_sizes, downsample_rates) are checked in _check_upstream_interface.
