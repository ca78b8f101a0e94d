"""Floating-point operations of one training step, counted from the model's shapes (for MFU).

A multiply-add is 2 FLOPs. Counted: convolutions, the Gaussian heads, the GRU, the InfoNCE predictor and the
InfoNCE scores (positive and negatives); not counted: BatchNorm, ReLU, pooling, softmax, the KL term,
reparameterisation (elementwise, a few percent at most). Backward costs twice the forward (input and weight
gradients), except where no input gradient exists: the first layer of every module (its input is the raw
audio or the previous module's detached output), where it costs once the forward. `docs/performance.md`
gives the method and its check against torch's FlopCounterMode.
"""

from __future__ import annotations

from vgim_dist.config import ModelConfig
from vgim_dist.model.modules import conv_frames, out_channels


def module_flops(model: ModelConfig, index: int, batch: int, frames_in: int) -> tuple[float, int]:
    """(training-step FLOPs of module ``index`` on ``batch`` rows of ``frames_in`` input frames, its output frames)."""
    spec, C = model.modules[index], model.channels
    c_in, L = out_channels(model, index - 1), frames_in
    total, first = 0.0, True
    for layer in spec.layers:
        L = conv_frames(L, layer.kernel, layer.stride, layer.padding)
        fwd = 2.0 * batch * L * C * c_in * layer.kernel
        total += fwd * (2 if first else 3)
        first, c_in = False, C
        if layer.pool_kernel:
            L = conv_frames(L, layer.pool_kernel, layer.pool_stride or layer.pool_kernel)
    gaussian = bool(spec.layers) and not spec.autoregressor
    if gaussian:
        L = conv_frames(L, model.head_kernel, 1, model.head_kernel // 2)
        total += 2 * 3 * (2.0 * batch * L * C * C * model.head_kernel)              # mu and log-variance
    D = C if spec.layers else c_in                                                  # target dim
    Dc = spec.autoregressor or C                                                    # context dim
    if spec.autoregressor:
        H = spec.autoregressor
        total += (2 if first else 3) * 2.0 * batch * L * 3 * H * D + 3 * 2.0 * batch * L * 3 * H * H
    W, K, N = min(L, model.subsample_frames), model.prediction_steps, model.negatives
    total += 3 * 2.0 * batch * W * Dc * D * K                                       # predictor W_k c_t
    pairs = sum(W - k for k in range(1, K + 1))
    total += 3 * 2.0 * batch * pairs * (1 + N) * D                                  # scores
    return total, L


def step_flops(model: ModelConfig, batch: int, samples: int) -> list[float]:
    """Training-step FLOPs of each module for a batch of ``batch`` windows of ``samples`` samples."""
    out, L = [], samples
    for i in range(len(model.modules)):
        f, L = module_flops(model, i, batch, L)
        out.append(f)
    return out
