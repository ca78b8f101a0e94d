"""InfoNCE between nearby frames (CPC / GIM definition, docs/method.md "InfoNCE") and the Gaussian KL term.

Shapes: B batch, L frames, W window frames, K prediction steps, N negatives, D target dim, Dc context dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgim_dist.parallel.data_parallel import Share


class _ContrastScores(torch.autograd.Function):
    """Scores of every offset k against its positive and its negatives, in one autograd node.

    A per-k autograd graph slices the (B, W, K, D) prediction and the negative pool once per k, and each
    slice's backward zero-fills a buffer of the full size: a large share of a CPU step. Here the backward
    accumulates every k into one gradient buffer per input instead. Same numbers, no per-k zero fill.

    pred (B, W, K, D): W_k c_t.  target (B, W, D): z in the window.  neg (N, B*(W-1), D): for each of N
    permutations of the pool, its last B*(W-1) rows; offset k uses the last B*(W-k) of them.
    Returns logits (B, W, K, 1 + N): [positive, negatives]; entries with t >= W - k are zero (masked later).
    """

    @staticmethod
    def forward(ctx, pred, target, neg, batch: int, offset: int):
        # pred and target hold rows offset .. offset + b of a batch of ``batch`` rows (b < batch for a
        # data-parallel replica); neg always covers the whole batch.
        b, W, K, D = pred.shape
        N = neg.shape[0]
        logits = pred.new_zeros(b, W, K, 1 + N)
        for k in range(1, K + 1):
            n = W - k
            p = pred[:, :n, k - 1]                                      # (b, n, D)
            logits[:, :n, k - 1, 0] = (p * target[:, k:]).sum(-1)
            logits[:, :n, k - 1, 1:] = torch.einsum("btd,nbtd->btn", p, _negatives(neg, k, batch, offset, b))
        ctx.save_for_backward(pred, target, neg)
        ctx.batch, ctx.offset = batch, offset
        return logits

    @staticmethod
    def backward(ctx, grad):
        pred, target, neg = ctx.saved_tensors
        b, W, K, D = pred.shape
        g_pred = torch.zeros_like(pred) if ctx.needs_input_grad[0] else None
        g_target = torch.zeros_like(target) if ctx.needs_input_grad[1] else None
        g_neg = torch.zeros_like(neg) if ctx.needs_input_grad[2] else None
        for k in range(1, K + 1):
            n = W - k
            p = pred[:, :n, k - 1]
            g_pos = grad[:, :n, k - 1, 0].unsqueeze(-1)                 # (b, n, 1)
            g_ng = grad[:, :n, k - 1, 1:]                               # (b, n, N)
            if g_pred is not None:
                negs = _negatives(neg, k, ctx.batch, ctx.offset, b)
                g_pred[:, :n, k - 1] += g_pos * target[:, k:] + torch.einsum("btn,nbtd->btd", g_ng, negs)
            if g_target is not None:
                g_target[:, k:] += g_pos * p
            if g_neg is not None:
                _negatives(g_neg, k, ctx.batch, ctx.offset, b).add_(torch.einsum("btn,btd->nbtd", g_ng, p))
        return g_pred, g_target, g_neg, None, None


class _PermutedRows(torch.autograd.Function):
    """``pool[perms]`` with a backward whose result does not depend on the thread count or the scheduling.

    Autograd's own backward of ``pool[perms]`` is one ``index_put_(accumulate=True)``: on CPU its threads add
    colliding rows in whatever order they reach them, so a run's numbers change from run to run. Each row of
    ``perms`` is part of one permutation and so names every pool row at most once: its scatter has no
    collisions, and the N rows are summed in order.

    pool (P, D), perms (N, T) with distinct entries in each row -> (N, T, D).
    """

    @staticmethod
    def forward(ctx, pool, perms):
        ctx.save_for_backward(perms)
        ctx.rows = pool.shape[0]
        return pool[perms]

    @staticmethod
    def backward(ctx, grad):
        (perms,) = ctx.saved_tensors
        g_pool = grad.new_zeros(ctx.rows, grad.shape[-1])                # (P, D)
        for n in range(perms.shape[0]):
            g_pool.index_add_(0, perms[n], grad[n])
        return g_pool, None


def _negatives(neg: torch.Tensor, k: int, batch: int, offset: int, rows: int) -> torch.Tensor:
    """View of the negatives for offset k and batch rows offset .. offset + rows: (N, rows, W - k, D).

    Offset k uses the last batch * (W - k) rows of each permuted pool, laid out batch-major.
    """
    N, tail, D = neg.shape
    n = tail // batch + 1 - k                                           # W - k
    view = neg[:, batch * (k - 1):].view(N, batch, n, D)
    return view if rows == batch else view[:, offset:offset + rows]


def info_nce(context: torch.Tensor, target: torch.Tensor, predictor: torch.nn.Linear, *, steps: int,
             negatives: int, window: int, generator: torch.Generator | None = None,
             share: Share | None = None) -> torch.Tensor:
    """InfoNCE of one module, averaged over the K offsets.

    context (B, L, Dc) and target (B, L, D) are frame-aligned. Draws from ``generator``, in this order:
    the window start (only when L > window), then one permutation of the B*L pool per negative.
    With ``share`` the inputs are this replica's rows; the pool is every replica's targets and the
    result is this replica's share of the whole batch's loss (the shares sum to the unreplicated loss).
    """
    b, L, D = target.shape
    pool, B, offset = target.reshape(b * L, D), b, 0
    if share is not None:
        B, offset = share.total, share.rows.start
        pool = share.gather(target).reshape(B * L, D)
    K = steps
    W = min(L, window)
    if W <= K:
        raise ValueError(f"InfoNCE needs more frames than prediction steps: {W} frames, K = {K}")
    start = 0
    if L > W:
        start = int(torch.randint(0, L - W + 1, (1,), generator=generator, device=generator.device
                                  if generator is not None else None))
    c_w, z_w = context[:, start:start + W], target[:, start:start + W]
    pred = predictor(c_w).view(b, W, K, D)                                # (b, W, K, D)

    # Negatives come from the whole (not sub-sampled) target sequence; gradients flow through them.
    tail = B * (W - 1)
    perms = torch.stack([torch.randperm(B * L, generator=generator, device=pool.device)[B * L - tail:]
                         for _ in range(negatives)])                      # (N, B*(W-1))
    neg = _PermutedRows.apply(pool, perms)                                # (N, B*(W-1), D)

    logits = _ContrastScores.apply(pred, z_w, neg, B, offset)             # (b, W, K, 1+N)
    log_p = -F.log_softmax(logits, dim=-1)[..., 0]                        # (b, W, K)
    t = torch.arange(W, device=pred.device).unsqueeze(1)
    k = torch.arange(1, K + 1, device=pred.device).unsqueeze(0)
    valid = (t < W - k).to(log_p.dtype)                                   # (W, K)
    per_k = (log_p * valid).sum(dim=(0, 1)) / ((W - k.squeeze(0)) * B)    # (K,)
    return per_k.mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) for (B, C, L) tensors.

    Reduction (the published code's): SUM over time frames, MEAN over channels and batch. Published
    kld_weight values (0.0033, 0.0035, 0.01) assume it. ``batch``: the whole batch's size when these are
    one replica's rows, so that the replicas' shares sum to the whole batch's KL.
    """
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    if batch is None:
        return kl.sum(dim=-1).mean()
    return kl.sum() / (batch * kl.shape[1])
