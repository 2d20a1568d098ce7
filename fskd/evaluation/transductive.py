"""TransCLIP: transductive inference on top of any inductive head (Zanella, Gérin and Ben Ayed,
"Boosting Vision-Language Models with Transduction", NeurIPS 2024, arXiv:2406.01837).

Written without the authors' code (AGPL-3.0, not read) and, so far, without the paper's full text
(only its abstract could be read here): see the note on the defaults below.
Every test row is classified at once: a Gaussian mixture over the test features (one mean per
class, one diagonal covariance shared by all classes) whose soft assignments ``z`` are pulled

- toward the inductive predictions ``ŷ`` (the softmax of the head's logits) by a KL term of
  weight ``λ`` (the paper's text-knowledge penalty; here the "text" is whatever the head knows),
- toward the assignments of each row's nearest neighbours by a Laplacian term on a k-NN graph
  of the test features,

and fitted by block majorise-minimise (BMM) steps, each in closed form:

- **z-step** (decoupled over rows, ``Z_ITERS`` times per outer iteration, with μ and Σ fixed):
  ``z_i ∝ ŷ_i^λ ⊙ exp(log p_i + Σ_j w_ij z_j)``, where ``p_ik`` is the Gaussian likelihood of row
  i under class k (the shared log-determinant cancels in the normalisation);
- **μ-step**: each class mean is the z-weighted mean of the test rows together with the labelled
  shots of that class (few-shot; a shot's assignment is its one-hot label);
- **Σ-step**: the shared diagonal covariance is the z-weighted mean squared deviation over the
  test rows and shots.

After ``OUTER_ITERS`` outer iterations the prediction is ``argmax_k z_ik``. Everything is batched
tensor code: the k-NN graph is built by chunked matmul + topk and kept as (M, k) indices and
weights, so the Laplacian products cost O(M k N) time and O(M N) memory (no M x M matrix); the
variance step avoids the (M, N, D) tensor by expanding the square. Deterministic (no sampling).

The defaults below are the paper's as its text gives them to the best of our reading; only the
abstract could be retrieved while this was written. Measured against the authors' solver on the
same inputs (``benchmarks/authors_inputs_transclip.py``, docs/bench/parity_transclip_authors.md),
this is not their algorithm: they weight the log-likelihood 1/50 against the KL term, run a
schedule of shot weights in the μ- and Σ-steps, renormalise the means after each update and start
them at the normalised class sum; with those four rules set to fskd's, their solver gives fskd's
predictions on 98.6% of the rows. Not changed yet.

The realistic setting (``--batch B --active-classes C``, :func:`realistic_batches`): instead of
all rows at once, the test rows of a seed are split into batches of at most B rows from C classes
drawn at random, and TransCLIP runs on each batch alone, every class still a candidate (the
batch-adaptation setting of Zanella, Fuchs, De Vleeschouwer and Ben Ayed, "Realistic Test-Time
Adaptation of Vision-Language Models", CVPR 2025, whose Table 1 shows TransCLIP falling below
zero-shot when a batch holds few classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: nearest neighbours per test row in the affinity graph (paper, Sec. 3: the affinity
#: w_ij = f_i^T f_j is kept for the 3 nearest neighbours of each sample and set to 0 otherwise)
KNN = 3
#: weight λ of the KL term in the few-shot setting (paper, Sec. 4, implementation details)
LAMBDA_FEW_SHOT = 0.5
#: weight λ of the KL term in the zero-shot setting, no labelled shot (paper, Sec. 4)
LAMBDA_ZERO_SHOT = 1.0
#: outer BMM iterations (z-, μ- then Σ-step) (paper, Sec. 4)
OUTER_ITERS = 10
#: z-step iterations per outer iteration (the inner loop of the paper's Sec. 3.3 procedure)
Z_ITERS = 5
#: zero-shot: each class mean starts at the mean of the test rows the head is most confident of
#: for that class (paper, Sec. 4: the 8 most confident samples per class)
ZERO_SHOT_INIT_TOP = 8

#: rows of the k-NN similarity computed at once: a (CHUNK, M) block, memory bounded whatever M
KNN_CHUNK = 2048
_EPS = 1e-12


@dataclass
class TransclipOutput:
    """``pred`` (M,) the transductive class (way index) of every test row; ``scores`` (M, N) the
    log of the final soft assignments z (for top-k), ``z`` (M, N) the assignments, ``mu`` (N, D)
    and ``var`` (D,) the fitted mixture."""

    pred: torch.Tensor
    scores: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor


def knn_graph(x: torch.Tensor, k: int = KNN, chunk: int = KNN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse affinity of TransCLIP's Laplacian term: for every row of ``x`` (M, D),
    L2-normalised, the indices (M, k) of its k most similar other rows and the weights (M, k)
    ``max(0, f_i^T f_j)``. Built block by block of rows (a (chunk, M) similarity at a time)."""
    m = x.shape[0]
    k = min(k, m - 1)
    if k < 1:
        return (torch.zeros(m, 0, dtype=torch.long, device=x.device), torch.zeros(m, 0, dtype=x.dtype, device=x.device))
    idx, w = [], []
    for s in range(0, m, chunk):
        sim = x[s : s + chunk] @ x.T  # (c, M)
        r = torch.arange(sim.shape[0], device=x.device)
        sim[r, r + s] = float("-inf")  # not its own neighbour
        val, ind = sim.topk(k, dim=1)
        idx.append(ind)
        w.append(val.clamp_min(0))
    return torch.cat(idx), torch.cat(w)


def affinity_product(idx: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sum_j w_ij z_j`` (M, N) for the k-NN graph (``idx``, ``w``) of :func:`knn_graph`: one
    gather per neighbour rank (k of them), never an (M, M) matrix."""
    out = torch.zeros_like(z)
    for j in range(idx.shape[1]):
        out += w[:, j, None] * z[idx[:, j]]
    return out


def gaussian_log_likelihood(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log p_ik`` (M, N) up to the log-determinant and 2π terms, which are the same for every
    class (the covariance is shared) and cancel in the z-step: ``-1/2 (x_i - μ_k)^T Σ^-1 (x_i - μ_k)``
    with Σ = diag(``var``), expanded as a matmul."""
    inv = 1.0 / var
    a = (x * x) @ inv  # (M,)
    b = x @ (mu * inv).T  # (M, N)
    c = (mu * mu) @ inv  # (N,)
    return -0.5 * (a[:, None] - 2 * b + c[None])


def z_logits(
    log_yhat: torch.Tensor, log_p: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, lam: float
) -> torch.Tensor:
    """The log of one decoupled assignment update before normalisation:
    ``λ log ŷ_i + log p_i + Σ_j w_ij z_j``; :func:`z_step` is its softmax over classes."""
    return lam * log_yhat + log_p + affinity_product(idx, w, z)


def z_step(
    log_yhat: torch.Tensor, log_p: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, lam: float
) -> torch.Tensor:
    """One decoupled assignment update: ``z_i ∝ ŷ_i^λ ⊙ exp(log p_i + Σ_j w_ij z_j)``."""
    return torch.softmax(z_logits(log_yhat, log_p, z, idx, w, lam), dim=-1)


def mu_step(
    x: torch.Tensor, z: torch.Tensor, support: torch.Tensor, support_onehot: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """Class means: the z-weighted mean of the test rows and the labelled shots (one-hot
    assignments). A class left with no mass at all keeps its previous mean."""
    num = z.T @ x + support_onehot.T @ support  # (N, D)
    den = z.sum(0) + support_onehot.sum(0)  # (N,)
    ok = den > _EPS
    return torch.where(ok[:, None], num / den.clamp_min(_EPS)[:, None], previous)


def var_step(
    x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, support: torch.Tensor, support_onehot: torch.Tensor
) -> torch.Tensor:
    """The shared diagonal covariance: ``mean_i sum_k z_ik (x_i - μ_k)^2`` over the test rows and
    the shots, element-wise. With ``sum_k z_ik = 1`` the square expands to ``x^2 - 2 x (z μ) + z μ^2``
    (O(M D) memory, no (M, N, D) tensor)."""
    total = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for rows, assign in ((x, z), (support, support_onehot)):
        if rows.shape[0]:
            total += (rows * rows).sum(0) - 2 * (rows * (assign @ mu)).sum(0) + (assign.sum(0) @ (mu * mu))
    n = x.shape[0] + support.shape[0]
    return (total / n).clamp_min(1e-8)


def transclip(
    test_x: torch.Tensor,
    yhat: torch.Tensor,
    support_x: torch.Tensor | None = None,
    support_y: torch.Tensor | None = None,
    lam: float | None = None,
    k: int = KNN,
    outer_iters: int = OUTER_ITERS,
    z_iters: int = Z_ITERS,
) -> TransclipOutput:
    """TransCLIP on the test features ``test_x`` (M, D), the inductive probabilities ``yhat``
    (M, N) (softmax of the head's logits), and the labelled shots ``support_x`` (S, D) with their
    way indices ``support_y`` (S,) in [0, N) (None or empty: the zero-shot setting). Features are
    L2-normalised here. ``lam``: the KL weight, by default :data:`LAMBDA_FEW_SHOT` with shots and
    :data:`LAMBDA_ZERO_SHOT` without. Returns :class:`TransclipOutput`; ``pred`` is the
    transductive prediction (M,)."""
    x = F.normalize(test_x.float(), dim=-1)
    m, d = x.shape
    n = yhat.shape[1]
    yhat = yhat.to(x)
    if support_x is None or support_y is None or support_x.numel() == 0:
        sx = x.new_zeros(0, d)
        sy = x.new_zeros(0, n)
    else:
        sx = F.normalize(support_x.float().to(x.device), dim=-1)
        sy = F.one_hot(support_y.to(x.device).long(), n).to(x)
    if lam is None:
        lam = LAMBDA_FEW_SHOT if sx.shape[0] else LAMBDA_ZERO_SHOT
    log_yhat = torch.log(yhat.clamp_min(_EPS))
    idx, w = knn_graph(x, k)

    # initialisation: z = ŷ; means from the shots (few-shot) or from the rows the head is most
    # confident of (zero-shot, or a class without shots); Σ = I / d
    z = yhat / yhat.sum(-1, keepdim=True).clamp_min(_EPS)
    top = min(ZERO_SHOT_INIT_TOP, m)
    conf = yhat.topk(top, dim=0).indices  # (top, N): the most confident rows of each class
    mu = x[conf].mean(0)  # (N, D)
    if sx.shape[0]:
        count = sy.sum(0)
        has = count > 0
        mu = torch.where(has[:, None], (sy.T @ sx) / count.clamp_min(1)[:, None], mu)
    var = x.new_full((d,), 1.0 / d)

    logits = log_yhat
    for _ in range(outer_iters):
        log_p = gaussian_log_likelihood(x, mu, var)
        for _ in range(z_iters):
            logits = z_logits(log_yhat, log_p, z, idx, w, lam)
            z = torch.softmax(logits, dim=-1)
        mu = mu_step(x, z, sx, sy, mu)
        var = var_step(x, z, mu, sx, sy)
    scores = torch.log_softmax(logits, dim=-1)  # log z without underflow: ranks every class
    return TransclipOutput(pred=scores.argmax(-1), scores=scores, z=z, mu=mu, var=var)


# --- the realistic setting: batches of a few classes ---------------------------------------------

#: salt of the batch draw's generator (seeded by the evaluation seed): the batches do not share
#: a stream with the shots of that seed
BATCH_SALT = 20250107


@dataclass(frozen=True)
class BatchSetting:
    """``--batch B --active-classes C``: the test rows of a seed are scored in batches of at most
    ``batch`` rows drawn from ``active_classes`` classes (:func:`realistic_batches`)."""

    batch: int
    active_classes: int


def realistic_batches(truth: np.ndarray, setting: BatchSetting, seed: int) -> list[np.ndarray]:
    """Split the test rows (way labels ``truth`` (M,)) into the batches of the realistic setting,
    every row in exactly one batch. Each batch draws ``active_classes`` classes uniformly without
    replacement among the classes with rows left (all of them when fewer are left), then ``batch``
    rows uniformly without replacement among those classes' rows left (all of them when fewer);
    until no row is left. A batch's rows are in ascending order, so one batch of every row (B >= M,
    C = every class) is the all-at-once setting exactly. The construction of a batch is StatA's
    (Zanella et al., CVPR 2025: C classes, then B rows among theirs); drawing without replacement
    until the split is used (their batches are independent draws) keeps top-1 and the per-class
    table over the whole test split. Seeded: ``seed`` and :data:`BATCH_SALT`."""
    rng = np.random.default_rng([int(seed), BATCH_SALT])
    left = np.ones(len(truth), dtype=bool)
    out = []
    while left.any():
        classes = np.unique(truth[left])
        if len(classes) > setting.active_classes:
            classes = rng.choice(classes, setting.active_classes, replace=False)
        pool = np.flatnonzero(left & np.isin(truth, classes))
        rows = pool if len(pool) <= setting.batch else np.sort(rng.choice(pool, setting.batch, replace=False))
        left[rows] = False
        out.append(rows)
    return out


def transclip_batches(
    test_x: torch.Tensor,
    yhat: torch.Tensor,
    support_x: torch.Tensor | None,
    support_y: torch.Tensor | None,
    batches: list[np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    """TransCLIP run on each batch of rows alone (its own k-NN graph, mixture and assignments;
    every class a candidate, the shots shared), one call per batch: ``pred`` (M,) and ``scores``
    (M, N), each row's from its batch."""
    m, n = yhat.shape
    pred = torch.empty(m, dtype=torch.long, device=yhat.device)
    scores = torch.empty(m, n, dtype=torch.float32, device=yhat.device)
    for rows in batches:
        r = torch.from_numpy(rows).to(yhat.device)
        out = transclip(test_x[r], yhat[r], support_x, support_y)
        pred[r], scores[r] = out.pred.to(pred.device), out.scores.to(scores.device)
    return pred, scores
