"""The method, checked against docs/method.md (Modules, InfoNCE, KL): shapes, parameter counts, InfoNCE, KL,
the two-sample rule, gradient isolation."""

import math

import pytest
import torch

from vgim_dist.config import load_config
from vgim_dist.model import build_module, describe
from vgim_dist.model.loss import gaussian_kl, info_nce

CONFIGS = "configs"


def vgim(*overrides):
    return load_config(f"{CONFIGS}/vgim.yaml", list(overrides))


@pytest.mark.parametrize("samples,frames", [(10240, [511, 129, 64, 64]), (20480, [1023, 257, 128, 128])])
def test_vgim_frames_and_hops(samples, frames):
    rows = describe(vgim().model, samples)
    assert [r["frames"] for r in rows] == frames
    assert [r["hop"] for r in rows] == [20, 80, 160, 160]
    assert [r["channels"] for r in rows] == [512, 512, 512, 256]


def test_vgim_parameter_counts():
    rows = describe(vgim().model, 20480)
    assert [r["params"] for r in rows] == [5_252_096, 5_246_976, 4_196_864, 1_902_080]
    assert sum(r["params"] for r in rows) == 16_598_016
    built = sum(p.numel() for i in range(4) for p in build_module(vgim().model, i, 0).parameters())
    assert built == 16_598_016


@pytest.mark.parametrize("name", ["vgim-thesis", "gim-thesis"])
def test_thesis_frames(name):
    cfg = load_config(f"{CONFIGS}/{name}.yaml")
    rows = describe(cfg.model, 10240)
    assert [(r["channels"], r["frames"]) for r in rows] == [(32, 52), (32, 13)]
    x = torch.randn(2, 1, 10240)
    for i in range(2):
        x = build_module(cfg.model, i, 0).encode(x.contiguous())
    assert x.shape == (2, 32, 13)


def test_real_forward_matches_describe():
    cfg = vgim()
    x = torch.randn(2, 1, 10240)
    for i, row in enumerate(describe(cfg.model, 10240)):
        x = build_module(cfg.model, i, 0).eval().encode(x)
        assert tuple(x.shape) == (2, row["channels"], row["frames"])


def loop_info_nce(context, target, weight, K, N, window, gen):
    """The InfoNCE definition of docs/method.md written out with plain loops, sharing only the RNG draw order."""
    B, L, D = target.shape
    W = min(L, window)
    start = int(torch.randint(0, L - W + 1, (1,), generator=gen)) if L > W else 0
    c, z = context[:, start:start + W], target[:, start:start + W]
    pool = target.reshape(B * L, D)
    perms = [torch.randperm(B * L, generator=gen) for _ in range(N)]
    per_k = []
    for k in range(1, K + 1):
        Wk = weight[(k - 1) * D:k * D]                      # (D, Dc)
        total = 0.0
        for b in range(B):
            for t in range(W - k):
                pred = Wk @ c[b, t]
                scores = [pred @ z[b, t + k]]
                for n in range(N):
                    row = perms[n][B * L - B * (W - k) + b * (W - k) + t]
                    scores.append(pred @ pool[row])
                total = total - torch.log_softmax(torch.stack(scores), 0)[0]
        per_k.append(total / ((W - k) * B))
    return torch.stack(per_k).mean()


@pytest.mark.parametrize("L,window", [(9, 128), (20, 12)])
def test_info_nce_matches_loop_definition(L, window):
    torch.manual_seed(0)
    B, Dc, D, K, N = 3, 5, 4, 4, 6
    context = torch.randn(B, L, Dc, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    predictor = torch.nn.Linear(Dc, D * K, bias=False).double()
    fast = info_nce(context, target, predictor, steps=K, negatives=N, window=window,
                    generator=torch.Generator().manual_seed(7))
    slow = loop_info_nce(context, target, predictor.weight, K, N, window, torch.Generator().manual_seed(7))
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast, [context, target, predictor.weight])
    g_slow = torch.autograd.grad(slow, [context, target, predictor.weight])
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_info_nce_gradient_is_repeatable_on_two_threads():
    # Rows of the negative pool are drawn many times over; their gradients must add up in a fixed order.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        B, L, D, K, N = 8, 256, 32, 10, 10
        target = torch.randn(B, L, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
        predictor = torch.nn.Linear(D, D * K, bias=False)
        grads = [torch.autograd.grad(info_nce(target, target, predictor, steps=K, negatives=N, window=128,
                                              generator=torch.Generator().manual_seed(1)), target)[0]
                 for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("variational", [True, False])
def test_zero_predictor_gives_ln11(variational):
    cfg = vgim(f"model.variational={str(variational).lower()}")
    x = torch.randn(2, 1, 10240)
    for i in range(4):
        m = build_module(cfg.model, i, 0)
        torch.nn.init.zeros_(m.predictor.weight)
        out = m(x, torch.Generator().manual_seed(i))
        assert abs(out.nce.item() - math.log(11)) < 1e-6
        x = out.output


@pytest.mark.slow  # full-size modules
def test_initial_nce_magnitudes_match_published_code():
    """docs/method.md, Training semantics: about 25.5 per V-GIM conv module, 9.3 for its GRU; 3.6 per GIM conv
    module, 2.85 for its GRU; KL per frame about 0.13."""
    expected = {True: [25.5, 25.5, 25.5, 9.3], False: [3.6, 3.6, 3.6, 2.85]}
    for variational, targets in expected.items():
        cfg = vgim(f"model.variational={str(variational).lower()}")
        x = torch.randn(4, 1, 10240, generator=torch.Generator().manual_seed(0))
        for i, want in enumerate(targets):
            out = build_module(cfg.model, i, 0)(x, torch.Generator().manual_seed(i))
            assert abs(out.nce.item() - want) / want < 0.1, (variational, i, out.nce.item())
            if variational and i < 3:
                assert 0.09 < out.kl.item() / out.output.shape[-1] < 0.17
            x = out.output


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    reference = torch.distributions.kl_divergence(q, p).sum(dim=-1).mean()  # sum over time, mean over B, C
    assert torch.allclose(gaussian_kl(mu, logvar), reference, atol=1e-5)


def test_gim_uses_mean_and_vgim_draws_two_samples(monkeypatch):
    x = torch.randn(2, 1, 10240)
    seen = {}

    def spy(context, target, *a, **k):
        seen["c"], seen["z"] = context.detach().clone(), target.detach().clone()
        return context.sum() * 0

    monkeypatch.setattr("vgim_dist.model.modules.info_nce", spy)
    for variational in (False, True):
        m = build_module(vgim(f"model.variational={str(variational).lower()}").model, 0, 0)
        out = m(x, torch.Generator().manual_seed(0))
        mu = m.mu(m.layers(x)).transpose(1, 2)
        if variational:
            assert not torch.equal(seen["c"], seen["z"])
            assert not torch.equal(seen["z"], mu)
            assert torch.equal(out.output, seen["z"].transpose(1, 2))   # the target sample goes on
        else:
            assert torch.equal(seen["c"], seen["z"]) and torch.allclose(seen["z"], mu)


@pytest.mark.slow  # full-size modules
def test_gradient_isolation_between_modules():
    cfg = vgim()
    mods = [build_module(cfg.model, i, 0) for i in range(4)]
    x = torch.randn(2, 1, 10240)
    outs = []
    for i, m in enumerate(mods):
        outs.append(m(x, torch.Generator().manual_seed(i)))
        x = outs[-1].output
    for k in range(1, 4):
        for m in mods:
            m.zero_grad(set_to_none=True)
        outs[k].loss.backward()
        for j in range(k):
            assert all(p.grad is None or not p.grad.any() for p in mods[j].parameters()), (k, j)
        assert any(p.grad is not None and p.grad.any() for p in mods[k].parameters())


def test_partial_batches_and_too_few_frames():
    cfg = vgim()
    m = build_module(cfg.model, 0, 0)
    for batch in (1, 3):
        assert torch.isfinite(m(torch.randn(batch, 1, 10240), torch.Generator().manual_seed(0)).loss)
    with pytest.raises(ValueError, match="frames"):
        build_module(cfg.model, 2, 0)(torch.randn(1, 512, 8), torch.Generator())
