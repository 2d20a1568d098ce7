"""LP++ as published (Huang et al., CVPR 2024), batched over episodes.

The classifier is ``x W^T + b + alpha_c * x t_c^T`` on L2-normalised features ``x`` with fixed
class text weights ``t`` (no logit scale). Training follows the authors' code
(FereshteShakeri/FewShot-CLIP-Strong-Baseline, ``methods/linear_probe_p2.py``), re-derived here:

- ``W`` starts at the class *sums* of the support features (their centroid helper leaves the
  division by the count commented out), ``b`` at 0 (theirs keeps ``nn.Linear``'s random
  U(-1/sqrt(D), 1/sqrt(D)) draw: at most 0.044 at 512-d against logits of order K);
- ``alpha`` (class-wise) starts at one value for every class: 250 x the mean over classes of
  each class's mean affinity to its *own* text, ``x_i t_{y_i}`` (their ``calculate_init_alpha``:
  ``compute_centroids_alpha`` keeps the one-hot diagonal of ``features @ clip_weights``);
- full-batch SGD with momentum 0.9 on ``W`` and ``b`` at the step size ``4 S / lambda_max(X^T X)``
  (the Lipschitz bound of the mean cross-entropy's gradient in W, S support rows);
- every 10th epoch a plain gradient step on ``alpha`` of size ``S / (4 max_c sum_i (x_i t_c)^2)``.
  Their gradient of alpha is never reset (the optimiser zeroes only W and b), so that step uses
  the *sum* of alpha's gradients over every epoch so far; so does this one;
- 300 epochs, and the parameters of the epoch with the best accuracy on a labelled few-shot val
  set (ties: the later epoch) are the result (early stopping).

Everything is whole-tensor arithmetic on (E, S, D) batches: no autograd, no loop but the epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.runtime import single_thread

EPOCHS = 300
ALPHA_EVERY = 10
ALPHA_INIT = 250.0
MOMENTUM = 0.9


@dataclass
class LPPStart:
    """Initial parameters and step sizes of E probes: weights (E, N, D), bias (E, N), alpha
    (E, N), lr_w and lr_alpha (E,)."""

    weights: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    lr_w: torch.Tensor
    lr_alpha: torch.Tensor


@dataclass
class LPPResult:
    """Trained probes. ``last``: (weights, bias, alpha) after every epoch ran. With a val set:
    ``best`` the parameters of each episode's best epoch, ``best_epoch`` (E,) its epoch count
    (1-based: how many updates), ``curve`` (E, epochs) the val accuracy after each epoch."""

    last: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    best_epoch: torch.Tensor | None = None
    curve: torch.Tensor | None = None


def lambda_max(x: torch.Tensor) -> torch.Tensor:
    """(E,) largest eigenvalue of x^T x for x (E, S, D), from the smaller of the two Gram
    matrices, in float64 (the reference uses scipy's eigh)."""
    xd = x.double()
    g = xd.transpose(1, 2) @ xd if x.shape[2] <= x.shape[1] else xd @ xd.transpose(1, 2)
    return torch.linalg.eigvalsh(g)[:, -1]


def lpp_start(x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> LPPStart:
    """LP++'s initialisation and step sizes for support x (E, S, D), way labels y (E, S), class
    text weights text (E, N, D)."""
    E, S, D = x.shape
    N = text.shape[1]
    onehot = F.one_hot(y, N).to(x.dtype)  # (E, S, N)
    weights = onehot.transpose(1, 2) @ x  # class sums
    xt = x @ text.transpose(1, 2)  # (E, S, N)
    counts = onehot.sum(1).clamp_min(1)  # (E, N)
    own = (onehot * xt).sum(1) / counts  # (E, N): each class's mean affinity to its own text
    alpha = (ALPHA_INIT * own.mean(1))[:, None].expand(E, N).clone()
    lr_w = (4.0 * S / lambda_max(x)).to(x.dtype)
    lr_alpha = S / (4.0 * xt.square().sum(1).amax(1))
    return LPPStart(weights, torch.zeros(E, N, dtype=x.dtype, device=x.device), alpha, lr_w, lr_alpha)


def train_lpp(
    x: torch.Tensor,
    y: torch.Tensor,
    text: torch.Tensor,
    *,
    epochs: int = EPOCHS,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    start: LPPStart | None = None,
) -> LPPResult:
    """Train E LP++ probes for ``epochs`` epochs (module docstring).

    x (E, S, D) L2-normalised support, y (E, S) way labels, text (E, N, D) class text weights;
    val = (queries (E, M, D), way labels (E, M)) turns on early stopping. Deterministic.
    """
    E, S, D = x.shape
    N = text.shape[1]
    p = start or lpp_start(x, y, text)
    w, b, alpha = p.weights.clone(), p.bias.clone(), p.alpha.clone()
    onehot = F.one_hot(y, N).to(x.dtype)
    xt = x @ text.transpose(1, 2)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    grad_alpha = torch.zeros_like(alpha)
    lr_w, lr_a = p.lr_w[:, None, None], p.lr_alpha[:, None]
    best = best_epoch = curve = qt = None
    if val is not None:
        q, truth = val
        qt = q @ text.transpose(1, 2)
        curve = torch.zeros(E, epochs, device=x.device)
        best_acc = torch.full((E,), -1.0, device=x.device)
        best = (w.clone(), b.clone(), alpha.clone())
        best_epoch = torch.zeros(E, dtype=torch.long, device=x.device)
    with single_thread(E * S * N * D * 2):
        for epoch in range(epochs):
            z = torch.baddbmm(b[:, None, :], x, w.transpose(1, 2)) + alpha[:, None, :] * xt
            g = (torch.softmax(z, -1) - onehot) / S  # d(mean cross-entropy)/dz
            mw.mul_(MOMENTUM).add_(g.transpose(1, 2) @ x)
            mb.mul_(MOMENTUM).add_(g.sum(1))
            grad_alpha += (g * xt).sum(1)
            w -= lr_w * mw
            b -= p.lr_w[:, None] * mb
            if (epoch + 1) % ALPHA_EVERY == 0:
                alpha -= lr_a * grad_alpha
            if val is None:
                continue
            zq = torch.baddbmm(b[:, None, :], q, w.transpose(1, 2)) + alpha[:, None, :] * qt
            acc = (zq.argmax(-1) == truth).float().mean(1)
            curve[:, epoch] = acc
            better = acc >= best_acc
            best_acc = torch.where(better, acc, best_acc)
            best_epoch = torch.where(better, torch.full_like(best_epoch, epoch + 1), best_epoch)
            best = (
                torch.where(better[:, None, None], w, best[0]),
                torch.where(better[:, None], b, best[1]),
                torch.where(better[:, None], alpha, best[2]),
            )
    return LPPResult((w, b, alpha), best, best_epoch, curve)
