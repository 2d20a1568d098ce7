"""``linear``: a logistic-regression probe trained on each episode's support, batched over episodes.

The building block of the ``tuned`` recipes of ``linear-probe`` and ``lp++`` (fskd.methods.adapt):
full-batch Adam on the support features of E episodes at once (Adam is element-wise and the loss
is a sum over episodes, so every episode trains exactly as it would alone), with an L2 pull of the weights
towards their initialisation (the class prototypes), and checkpoints at several step counts so
the number of steps can be chosen on validation data from one run.

An optional text term gives LP++'s form ``s * (x W^T + alpha_c * x t_c^T) + b`` with class-wise
learnable blend ``alpha`` and fixed text weights ``t`` (class text features in image space).

Two forms, one objective (cross-entropy + ``weight_decay/2 * ||W - w0||^2``, full-batch Adam):

- **dual** (representer) form ``W = w0 + A x`` while the support is small: the parameters are
  the coefficients A (N x S) and the scores go through the S x S Gram matrix (O(S^2 N) per
  step, cheap for episodes, S = N*K rows). The regularised optimum lies in that set.
- **primal** form above ``DUAL_MAX_ROWS_PER_DIM * D`` support rows (2 D: 1,024 rows for 512-d
  features; all-way 16 shots x 1,000 classes is S = 16,000): the parameters are the weight
  change ``W - w0`` (N x D) itself, O(S D N) per step with no S x S matrix and half the
  multiply-adds of scoring through ``A x``. Adam is not invariant to that change of
  coordinates, so the two forms take different steps to the same optimum; where both reach
  it, they score alike (tests/test_scale.py states the tolerance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from fskd.classifiers.base import CLASSIFIERS, ClassContext, FittedHead, Head
from fskd.runtime import single_thread

T = TypeVar("T")

#: default logit scale of probes on L2-normalised features
SCALE = 10.0

#: the dual (Gram) form is used while S <= this * D, the primal form above (module docstring)
DUAL_MAX_ROWS_PER_DIM = 2.0

#: a batch of probe settings trains in groups whose score matrices (settings x S x N) stay under
#: this many values (the groups are independent, so grouping changes nothing but peak memory)
GROUP_VALUES = 2**26


def gram_form(rows: int, dim: int) -> bool:
    """Whether probes over ``rows`` support rows of ``dim``-d features use the dual (Gram) form."""
    return rows <= DUAL_MAX_ROWS_PER_DIM * dim


@dataclass
class LinearParams:
    """A probe: weights (E, N, D) ``w0 + a @ x`` (dual form: a (E, N, S) coefficients on the S
    support rows x (E or 1, S, D)) or ``w0 + delta`` (primal form: delta (E, N, D), a and x None),
    bias (E, N), alpha (E, N) or None (LP++ text blend)."""

    w0: torch.Tensor
    a: torch.Tensor | None
    x: torch.Tensor | None
    bias: torch.Tensor
    alpha: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        if self.delta is not None:
            return self.w0 + self.delta
        if self.x is None or not self.x.shape[1]:
            return self.w0
        return self.w0 + torch.matmul(self.a, self.x)


class FittedLinear(FittedHead):
    """Scores ``scale * (q W^T + alpha * q T^T) + b`` of queries embedded by ``embed``."""

    def __init__(self, params: LinearParams, embed, text: torch.Tensor | None = None, scale: float = SCALE) -> None:
        self.p, self.embed, self.text, self.scale = params, embed, text, scale
        self.weights = params.weights  # (E, N, D)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        x = self.embed(query)
        out = torch.bmm(x, self.weights.transpose(1, 2))
        if self.p.alpha is not None and self.text is not None:
            out = out + self.p.alpha[:, None, :] * torch.bmm(x, self.text.transpose(1, 2))
        return self.scale * out + self.p.bias[:, None, :]


@dataclass
class Projections:
    """Embedded queries projected once on what the probes are made of, so many probes (a grid,
    checkpoints) score cheaply: qw0 (E, M, N) = q w0^T, qx (E, M, S) = q x^T, qt = q t^T or None."""

    qw0: torch.Tensor | None  # None in the primal form (large S): ``q`` is kept instead
    qx: torch.Tensor | None
    qt: torch.Tensor | None = None
    q: torch.Tensor | None = None

    @classmethod
    def of(cls, q: torch.Tensor, w0: torch.Tensor, x: torch.Tensor, text: torch.Tensor | None = None) -> Projections:
        qt = None if text is None else torch.bmm(q, text.transpose(1, 2))
        if gram_form(x.shape[1], x.shape[2]):
            return cls(torch.bmm(q, w0.transpose(1, 2)), torch.bmm(q, x.transpose(1, 2)), qt)
        return cls(None, None, qt, q)

    def logits(self, p: LinearParams, scale: float = SCALE) -> torch.Tensor:
        if self.q is not None:  # primal form: the queries themselves against the weights
            out = torch.bmm(self.q, p.weights.transpose(1, 2))
        else:
            out = self.qw0 + torch.bmm(self.qx, p.a.transpose(1, 2)) if self.qx.shape[2] else self.qw0
        if p.alpha is not None and self.qt is not None:
            out = out + p.alpha[:, None, :] * self.qt
        return scale * out + p.bias[:, None, :]


def train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    w0: torch.Tensor,
    *,
    steps: Sequence[int],
    lr: float = 0.1,
    weight_decay: float = 1e-3,
    text: torch.Tensor | None = None,
    alpha0: float | None = None,
    scale: float = SCALE,
) -> dict[int, LinearParams]:
    """Train batched probes; return the parameters after each step count in ``steps``.

    x: (E, S, D) embedded support, y: (E, S) way index, w0: (E, N, D) initial weights (the
    L2 penalty ``weight_decay/2 * ||W - w0||^2`` pulls towards them), text: (E, N, D) class text
    weights for the LP++ term (with ``alpha0`` its initial class-wise blend). Step 0 returns
    the initialisation. Deterministic (full batch, no sampling).
    """
    E = x.shape[0]
    gram, p0, pt = dual_inputs(x, w0, text)
    dev = x.device
    wd = torch.full((E,), float(weight_decay), device=dev)
    a0 = None if text is None else torch.full((E,), float(alpha0 if alpha0 is not None else 1.0), device=dev)
    out = train_dual(
        gram, p0, pt, y, steps=steps, lr=lr, weight_decay=wd, alpha0=a0, scale=scale, x=x, w0=w0, text=text
    )
    return {s: params_of(w0, x, t) for s, t in out.items()}


def params_of(w0: torch.Tensor, x: torch.Tensor, trained: tuple) -> LinearParams:
    """LinearParams from one snapshot of :func:`train_dual` (its form decides the fields)."""
    coef, b, al, primal = trained
    return LinearParams(w0, None, None, b, al, coef) if primal else LinearParams(w0, coef, x, b, al)


def dual_inputs(x: torch.Tensor, w0: torch.Tensor, text: torch.Tensor | None):
    """What the dual form needs from the support: gram (E, S, S), x w0^T (E, S, N), x t^T or
    None; (None, None, None) above the dual form's size (the primal form needs none of them)."""
    if not gram_form(x.shape[1], x.shape[2]):
        return None, None, None
    return (
        torch.bmm(x, x.transpose(1, 2)),
        torch.bmm(x, w0.transpose(1, 2)),
        None if text is None else torch.bmm(x, text.transpose(1, 2)),
    )


def train_dual(
    gram: torch.Tensor | None,
    p0: torch.Tensor | None,
    pt: torch.Tensor | None,
    y: torch.Tensor,
    *,
    steps: Sequence[int],
    lr: float,
    weight_decay: torch.Tensor,
    alpha0: torch.Tensor | None,
    scale: float = SCALE,
    x: torch.Tensor | None = None,
    w0: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
):
    """The training loop; ``weight_decay`` and ``alpha0`` (None: no text term) are per probe
    (E,), so a grid of settings trains as one batch (episodes x settings). ``y`` (E or 1, S).

    - dual form (``gram`` (E or 1, S, S) given): parameters A (E, N, S); ``p0`` = x w0^T and
      ``pt`` = x t^T are (E or 1, S, N).
    - primal form (``gram`` None): parameters W - w0 (E, N, D); needs the support ``x`` (E or
      1, S, D: a batch of settings may share one support), ``w0`` and ``text`` (E or 1, N, D).
      Each step is one matrix product of the support with the effective weights
      ``scale (W + alpha t)`` with the bias added in the same call, then the cross-entropy: no
      (S, N) intermediate but the scores themselves.

    Returns {step: (coefficients, bias, alpha, primal)}."""
    E = len(weight_decay)
    primal = gram is None
    if primal and (x is None or w0 is None):
        raise ValueError("train_dual: the primal form needs the support x and the initial weights w0")
    S = y.shape[1]
    N = w0.shape[1] if primal else p0.shape[2]
    steps = sorted(set(int(s) for s in steps))
    dev = y.device
    coef = torch.zeros(E, N, x.shape[-1] if primal else S, device=dev, requires_grad=True)
    b = torch.zeros(E, N, device=dev, requires_grad=True)
    params = [coef, b]
    alpha = None
    if alpha0 is not None:
        alpha = alpha0[:, None].expand(E, N).clone().requires_grad_(True)
        params.append(alpha)

    def snap():
        return coef.detach().clone(), b.detach().clone(), None if alpha is None else alpha.detach().clone(), primal

    out = {0: snap()}
    if not steps or steps[-1] == 0 or S == 0:
        return {s: out[0] for s in steps}
    opt = torch.optim.Adam(params, lr=lr)
    shared = primal and x.shape[0] == 1 and E > 1
    if shared:  # scores laid out (S, E, N): row s of every probe, so the labels repeat per probe
        labels = y[0][:, None].expand(S, E).reshape(-1)
    else:
        labels = y.expand(E, -1).reshape(-1)

    def loss(step: int) -> torch.Tensor:
        if primal:
            w = w0 + coef
            if alpha is not None:
                w = w + alpha[:, :, None] * text
            logits = primal_scores(x, scale * w, b)
            reg = coef.square().sum((1, 2))
        else:
            change = torch.matmul(gram, coef.transpose(1, 2))  # (E, S, N): x (A x)^T (gram may be shared)
            reg = (coef * change.transpose(1, 2)).sum((1, 2))  # ||A x||^2 = tr(A G A^T)
            lin = p0 + change  # x W^T
            if alpha is not None:
                lin = lin + alpha[:, None, :] * pt
            logits = scale * lin + b[:, None, :]
        ce = F.cross_entropy(logits.reshape(-1, N), labels, reduction="none")
        ce = ce.reshape(S, E).mean(0) if shared else ce.reshape(E, -1).mean(1)
        return (ce + 0.5 * weight_decay * reg).sum()

    work = E * S * N * (2 * x.shape[-1] if primal else S)
    with torch.enable_grad(), single_thread(work):
        return train_steps(opt, loss, steps, snap, out)


def primal_scores(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scores ``x w^T + bias`` in one call: x (1, S, D) shared by E weight sets w (E, N, D) ->
    (S, E, N) (one (S, D) x (D, E*N) product); x (E, S, D) -> (E, S, N)."""
    E, N, D = w.shape
    if x.shape[0] == 1 and E > 1:
        return torch.addmm(bias.reshape(1, E * N), x[0], w.reshape(E * N, D).T).reshape(-1, E, N)
    return torch.baddbmm(bias[:, None, :], x.expand(E, -1, -1) if x.shape[0] != E else x, w.transpose(1, 2))


def train_steps(
    opt: torch.optim.Optimizer,
    loss: Callable[[int], torch.Tensor],
    steps: Sequence[int],
    snap: Callable[[], T],
    out: dict[int, T],
) -> dict[int, T]:
    """Optimiser steps 1..max(steps) on ``loss(step)``; ``snap()`` after each step count in the
    sorted ``steps``. ``out`` holds the snapshots taken so far (step 0). Returns {step: snapshot}."""
    for step in range(1, steps[-1] + 1):
        value = loss(step)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step in steps:
            out[step] = snap()
    return {s: out[s] for s in steps}


def way_labels(E: int, N: int, K: int, device) -> torch.Tensor:
    """(E, N*K) way index of each support row (support is class-major)."""
    return torch.arange(N, device=device).repeat_interleave(K)[None].expand(E, -1)


class LinearHead(Head):
    """Logistic regression on the support (centred on ``context.center`` or the support mean,
    L2-normalised), initialised at the prototypes; fixed defaults (the adapt method ``linear-probe
    --set recipe=tuned`` chooses them on validation data)."""

    name = "linear"

    def __init__(
        self, context: ClassContext | None = None, steps: int = 100, weight_decay: float = 1e-1, lr: float = 0.1
    ) -> None:
        self.center = context.center if context is not None else None
        self.steps, self.weight_decay, self.lr = steps, weight_decay, lr

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedLinear:
        E, N, K, _ = support.shape
        c = self.center if self.center is not None else support.mean(dim=(1, 2))[:, None]

        def embed(v: torch.Tensor) -> torch.Tensor:
            return F.normalize(v - c, dim=-1)

        s = embed(support.reshape(E, N * K, -1))
        w0 = F.normalize(s.reshape(E, N, K, -1).mean(2), dim=-1)
        p = train_linear(
            s, way_labels(E, N, K, s.device), w0, steps=[self.steps], lr=self.lr, weight_decay=self.weight_decay
        )[self.steps]
        return FittedLinear(p, embed)


CLASSIFIERS.register("linear", lambda ctx: LinearHead(ctx))
