"""Flow-matching building blocks for FMA: the velocity network, the straight-line path with
noise augmentation, training on cached pairs, and ODE solvers with early stopping.

Everything works on batches of feature vectors; nothing here knows about stores or classes.
A *field* is any callable ``field(z (n, D), t (n,)) -> v (n, D)``; :class:`VelocityField` is the
learned one, :func:`mixture_field` the exact one for a known Gaussian mixture (a ground truth
for benchmarks), tests pass oracles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fskd.errors import ConfigError
from fskd.runtime import autocast

log = logging.getLogger(__name__)

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("euler", "heun")
#: network evaluations per solver step
NFE_PER_STEP = {"euler": 1, "heun": 2}
#: the clamp of sqrt(t (1 - t)) in the noise part of the path's velocity (see straight_path)
PATH_EPS = 1e-3


class TimeEmbedding(nn.Module):
    """t (n,) in [0, 1] -> (n, width): sinusoids at octave frequencies, then a linear layer."""

    def __init__(self, width: int, frequencies: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False)
        self.proj = nn.Linear(2 * frequencies + 1, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None].float() * self.freqs
        return F.silu(self.proj(torch.cat([t[:, None].float(), a.sin(), a.cos()], dim=1)))


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 LN(h) + Wt temb): a pre-norm residual MLP block with an additive time shift."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.time(temb)))


def trunk(field: nn.Module, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared body of both velocity networks: time embedding, input projection and the
    residual blocks. Returns the hidden rows and the time embedding (a scalar t is broadcast)."""
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    temb = field.temb(t)
    h = field.inp(z)
    for block in field.blocks:
        h = block(h, temb)
    return h, temb


class VelocityField(nn.Module):
    """v(z, t): a residual MLP conditioned on time. z (n, dim), t (n,) -> (n, dim).

    The output layer starts at zero, so an untrained field transports nothing (the flow starts
    as the plain cosine classifier and learns to move away from it).
    """

    def __init__(self, dim: int, width: int = 512, depth: int = 2, frequencies: int = 8) -> None:
        super().__init__()
        self.dim, self.width, self.depth = dim, width, depth
        self.inp = nn.Linear(dim, width)
        self.temb = TimeEmbedding(width, frequencies)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, _ = trunk(self, z, t)
        return self.out(F.silu(self.out_norm(h)))


class SinusoidalTime(nn.Module):
    """t (n,) in [0, 1] -> (n, width) as the FMA reference (after DiT): t scaled to [0, 1000],
    ``frequencies`` cos/sin features at geometric frequencies 1 .. 1/10000, then Linear-SiLU-Linear."""

    def __init__(self, width: int, frequencies: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = frequencies // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = 1000.0 * t[:, None].float() * self.freqs
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=1))


class AdaLNBlock(nn.Module):
    """h + gate * MLP(LN(h) (1 + scale) + shift), with (shift, scale, gate) = Linear(SiLU(temb)):
    the reference's adaLN-gated residual block (its modulation starts at zero, so every block
    starts as the identity)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(temb).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1.0 + scale) + shift)


class AdaLNField(nn.Module):
    """v(z, t) in the FMA reference's form (HKUST-LongGroup/FMA ``DeepFlowMatchingNet``, after
    MAR/DiT): input projection to ``width`` (the reference: the feature dimension), ``depth``
    adaLN-gated residual blocks (the reference: 12), a final adaLN layer (LayerNorm without
    affine, shift/scale) and a linear output. Xavier-uniform linear weights with zero biases,
    N(0, 0.02) time-MLP weights, and zero modulation and output layers: an untrained field
    transports nothing. z (n, dim), t (n,) -> (n, dim)."""

    def __init__(self, dim: int, width: int | None = None, depth: int = 12, frequencies: int = 256) -> None:
        super().__init__()
        width = width or dim
        self.dim, self.width, self.depth = dim, width, depth
        self.inp = nn.Linear(dim, width)
        self.temb = SinusoidalTime(width, frequencies)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.temb.mlp[0], self.temb.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.out_ada[-1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, temb = trunk(self, z, t)
        shift, scale = self.out_ada(temb).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1.0 + scale) + shift)


#: velocity network forms: ``adaln`` the FMA reference's, ``mlp`` fskd's small pre-norm residual MLP
ARCHS = {"adaln": AdaLNField, "mlp": VelocityField}


def make_field(arch: str, dim: int, width: int, depth: int) -> nn.Module:
    """A velocity network of form ``arch`` (see ARCHS); ``width`` 0 means the feature dimension
    (the reference's choice)."""
    if arch not in ARCHS:
        raise ConfigError(f"fma option arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch](dim, width or dim, depth)


def straight_path(
    x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, gamma: float = 0.0, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A point on the path image -> text and the velocity to regress there.

    x0 (n, D) image features, x1 (n, D) their class text features (fixed coupling), t (n,).
    Returns ``x_t = (1 - t) x0 + t x1 + gamma sqrt(t (1 - t)) noise`` (a Brownian-bridge style
    augmentation: zero at both ends, widest mid-way) and the target ``d x_t / dt = x1 - x0 +
    gamma (1 - 2t) / (2 sqrt(t (1 - t))) noise``: the derivative of the very path sampled (the
    FMA reference's target), so the field learns the ODE it is integrated along. The noise term
    of the target is unbounded at the ends; ``sqrt(t (1 - t))`` is clamped at ``PATH_EPS``.
    """
    tt = t[:, None]
    xt = (1.0 - tt) * x0 + tt * x1
    target = x1 - x0
    if gamma and noise is not None:
        root = torch.sqrt(tt * (1.0 - tt))
        xt = xt + gamma * root * noise
        target = target + gamma * (1.0 - 2.0 * tt) / (2.0 * root.clamp_min(PATH_EPS)) * noise
    return xt, target


def lr_factor(i: int, total: int, warm: int | None) -> float:
    """The learning-rate multiplier of step ``i`` (0-based) of ``total``.

    ``warm`` None (the iteration schedule): linear warm-up over 5% of the steps times a cosine
    over all of them. ``warm`` given (the epoch schedule): the FMA reference's schedule exactly as
    its ``train.py`` runs it. Its first step runs at the full rate; after step j (1-based) it sets
    ``lr = base * j / warm`` while j < warm, and from then on steps a ``CosineAnnealingLR(T_max =
    total - warm)``, whose chainable update continues from the last warm-up value: the cosine
    starts from ``(warm - 1) / warm`` of the base rate, not from it (half of it when an epoch is 2
    batches, as at 1 shot x 35 classes with batches of 32), and reaches 0 at the last step.
    """
    if warm is None:
        w = max(1, total // 20)
        return min(1.0, (i + 1) / w) * 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total))
    w = max(warm, 1)  # no warm-up steps behaves as one: the scheduler takes over after the first step
    if i == 0:
        return 1.0
    if i < w:
        return i / w
    start = (w - 1) / w if w > 1 else 1.0
    t_max = max(1, total - warm)
    return start * 0.5 * (1.0 + math.cos(math.pi * min(i - w + 1, t_max) / t_max))


def train_field(
    field: nn.Module,
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    iters: int = 0,
    epochs: int = 0,
    warmup_epochs: float = 0.0,
    batch_size: int,
    lr: float,
    weight_decay: float,
    gamma: float,
    seed: int,
    progress: Callable[[str, int, int, dict], None] | None = None,
    x0_views: torch.Tensor | None = None,
) -> list[float]:
    """Regress ``field`` on the straight-line velocities of the pairs (x0[i], x1[i]).

    ``x0_views`` (n, V, D): augmented views of each source (``fskd extract --augment-views``);
    each time a pair is visited its source is one of its V views drawn at random (the FMA
    reference re-encodes a freshly augmented image every epoch). Their draws come from a stream of
    their own, so orders, times and noise are those of the run without views.

    x0, x1: (n, D) on the field's device. Two schedules:

    - ``iters`` > 0: ``iters`` steps of ``batch_size`` pairs drawn with replacement; linear
      warm-up over the first 5% of the steps and a cosine to 0 over all of them.
    - else ``epochs`` (the FMA reference's): each epoch visits every pair once in a fresh random
      order, in batches of ``batch_size`` (the last one smaller); the learning rate warms up over
      the first ``warmup_epochs`` epochs, then follows a cosine to 0 (:func:`lr_factor`: the
      reference's schedule, step for step).

    Orders, times and noise come from a CPU generator seeded with ``seed`` (same seed -> same
    field, on any device). The noise is N(0, I) in the coordinates of ``x0`` (as the FMA
    reference draws it in CLIP's feature space), so at ``gamma`` its norm is about
    ``gamma sqrt(D)`` times ``sqrt(t (1 - t))`` against unit-norm features. Returns the loss
    averaged over each tenth of training.
    """
    device = x0.device
    n, dim = x0.shape
    g = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    if iters > 0:
        total, warm = iters, None
    elif epochs > 0:
        per_epoch = -(-n // b)
        total, warm = epochs * per_epoch, int(round(warmup_epochs * per_epoch))
    else:
        raise ConfigError(f"train_field needs epochs > 0 or iters > 0, got epochs={epochs}, iters={iters}")
    opt = torch.optim.AdamW(field.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, warm))

    def batches():
        if warm is not None:
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                yield from order.split(b)
        else:
            for _ in range(iters):
                yield torch.randint(n, (b,), generator=g)

    field.train()
    report_every = max(1, total // 10)
    curve, running = [], torch.zeros((), device=device)
    g_views = torch.Generator().manual_seed(seed + 1_000_003)
    for it, idx in enumerate(batches()):
        m = len(idx)
        src = None if x0_views is None else torch.randint(x0_views.shape[1], (m,), generator=g_views).to(device)
        idx = idx.to(device)
        t = torch.rand(m, generator=g).to(device)
        noise = torch.randn(m, dim, generator=g).to(device) if gamma else None
        start = x0[idx] if src is None else x0_views[idx, src]
        xt, target = straight_path(start, x1[idx], t, gamma, noise)
        with autocast(device):
            pred = field(xt, t)
        loss = (pred.float() - target).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()
        if (it + 1) % report_every == 0 or it + 1 == total:
            k = (it % report_every) + 1
            curve.append(float(running) / k)
            running.zero_()
            if progress is not None:
                progress("fma: train field", it + 1, total, {"loss": curve[-1]})
    field.eval()
    return curve


def mixture_field(
    centres: torch.Tensor,
    targets: torch.Tensor,
    sigma: float,
    log_weights: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> Field:
    """The exact field a perfectly trained FMA learns (gamma = 0) when images come from a known
    isotropic Gaussian mixture: component k has mean ``centres[k]`` (K, D), standard deviation
    ``sigma`` per dimension and weight ``softmax(log_weights)[k]`` (equal by default), and its
    images are coupled to ``targets[k]`` (K, D) (their class text feature).

    On the straight path ``x_t = (1 - t) x0 + t x1`` component k is N((1 - t) c_k + t x1_k,
    ((1 - t) sigma)^2 I), so the marginal velocity ``E[x1 - x0 | x_t = z]`` is
    ``(sum_k p(k | z, t) x1_k - z) / (1 - t)`` with the posterior p(k | z, t) in closed form.
    One Euler step from t = 0 therefore lands on the posterior-weighted mean of the targets.
    A ground truth for benchmarks and an oracle for the solvers; ``1 - t`` is clamped at ``eps``.
    """
    c, x1 = centres.float(), targets.float()
    lw = torch.zeros(len(c), device=c.device) if log_weights is None else log_weights.float().to(c.device)

    def field(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (1.0 - t.float()).clamp_min(eps)[:, None]  # (n, 1)
        means = s[:, :, None] * c[None] + (1.0 - s)[:, :, None] * x1[None]  # (n, K, D)
        d2 = (z.float()[:, None, :] - means).pow(2).sum(-1)  # (n, K)
        post = torch.softmax(lw[None] - d2 / (2.0 * (s * sigma) ** 2), dim=1)
        return ((post @ x1 - z.float()) / s).to(z.dtype)

    return field


@torch.no_grad()
def trajectory(
    field: Field,
    z: torch.Tensor,
    steps: int,
    stop: int | None = None,
    solver: str = "euler",
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Integrate dz/dt = field(z, t) from t = 0 with ``steps`` steps of size 1/steps, stopping
    after ``stop`` steps (early stopping; default: all). Returns [z_0, z_1, ..., z_stop], each (n, D).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if steps < 1:
        raise ConfigError(f"the number of solver steps must be >= 1, got {steps}")
    stop = steps if stop is None else stop
    if not 0 <= stop <= steps:
        raise ConfigError(f"early stop {stop} must be between 0 and the {steps} solver steps")
    device = device or z.device
    h = 1.0 / steps
    out = [z]

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        with autocast(device):
            return field(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)).float()

    for k in range(stop):
        t = k * h
        if solver == "euler":
            z = z + h * v(z, t)
        else:  # heun: trapezoid of the slopes at both ends of an Euler predictor step
            v1 = v(z, t)
            v2 = v(z + h * v1, t + h)
            z = z + 0.5 * h * (v1 + v2)
        out.append(z)
    return out


def transport(
    field: Field, z: torch.Tensor, steps: int, stop: int | None = None, solver: str = "euler", chunk: int = 16384
) -> torch.Tensor:
    """The feature after ``stop`` of ``steps`` solver steps: (n, D) -> (n, D), in row chunks."""
    if z.shape[0] <= chunk:
        return trajectory(field, z, steps, stop, solver)[-1]
    return torch.cat([trajectory(field, z[s : s + chunk], steps, stop, solver)[-1] for s in range(0, len(z), chunk)])
