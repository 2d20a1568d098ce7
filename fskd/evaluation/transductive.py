"""TransCLIP: transductive inference on top of any inductive head (Zanella, Gérin and Ben Ayed,
"Boosting Vision-Language Models with Transduction", NeurIPS 2024, arXiv:2406.01837).

Written without the authors' code (AGPL-3.0): from the paper's abstract (its full text could not
be read here) and a functional description of the authors' solver (its equations, constants and
schedule, no code) written by a session that read it; checked against their solver run on the same
inputs (``benchmarks/authors_inputs_transclip.py``, docs/bench/parity_transclip_authors.md).

Every test row is classified at once: a Gaussian mixture over the L2-normalised test features (one
unit-norm mean per class, one diagonal variance shared by all classes) whose soft assignments ``z``
are pulled

- toward the inductive predictions ``ŷ`` (the softmax of the head's logits) by a KL term of
  weight ``λ`` (the paper's text-knowledge penalty; here the "text" is whatever the head knows),
- toward the assignments of each row's nearest neighbours, and the labels of the shots whose
  nearest test rows it is, by a Laplacian term on a k-NN graph,

and fitted by block majorise-minimise (BMM) steps, each in closed form:

- **z-step** (all rows at once, ``Z_ITERS`` times with μ and σ² fixed):
  ``z_i ∝ ŷ_i^λ ⊙ exp(ℓ_i / 50 + Φ_i / (2k))``, where ``ℓ_ik = -1/2 Σ_d (x_id - μ_kd)^2 / σ²_d`` (the
  shared log-determinant cancels) and ``Φ_i = Σ_j (w_ij + w_ji) z_j + Σ_s w_si e(y_s)`` (``w``: the
  k-NN affinities, a shot s linked to its k nearest test rows);
- **μ-step**: each class mean is the L2-normalised sum of the test rows weighted ``z_ik / M`` and
  of the class's shots weighted ``50 γ / S`` (the shots together weigh 50 γ against 1 for the whole
  test set);
- **σ²-step**: the shared diagonal variance, the same weighted mean squared deviation from the new
  means.

For each shot weight γ of :data:`SHOT_WEIGHTS`, in order and each continuing from the previous
one's state, :data:`Z_STEPS` z-steps with a μ- then σ²-step between consecutive ones. After each γ,
the val rows (each classified as its nearest test row's assignment) score it; the prediction is
``argmax_k z_ik`` at the γ with the best val accuracy (the earliest on ties), as the authors report,
or, with no val rows, after the last γ. Zero-shot (no shot): λ = 1, one pass with no shot term, and
each class mean starts at the normalised ``ŷ``-weighted sum of its 8 most confident test rows.

Where fskd differs from the authors' solver (measured effects: the parity page): a shot is linked
to its k nearest test rows (theirs drops the nearest one, their graph's rule for a test row's own
self-similarity), the shots' messages reach the test rows they link to (theirs pairs the graph's
rows with the assignments by position, shots first against test rows first), the prediction is
the best-on-val γ's (their function returns the last γ's assignments and reports the
best-on-val γ's accuracy), ``ŷ`` is clamped at float32's smallest normal number (1.2e-38) in its
log, an assignment at e^-80 of its row's best (:func:`assignments`) and σ² at 1e-8; zero-shot, ``ŷ``
stays fixed (theirs, given ŷ from outside, overwrites it with z after every update).

Everything is batched tensor code: the k-NN graph is built by chunked matmul + topk and kept as
(M, k) indices and weights, then as a sparse matrix of 2 M k entries, so the Laplacian products
cost O(M k N) time and O(M N) memory (no dense M x M matrix); the variance step avoids the (M, N, D) tensor by expanding the square.
Deterministic (no sampling).

The realistic setting (``--batch B --active-classes C``, :func:`realistic_batches`): instead of
all rows at once, the test rows of a seed are split into batches of at most B rows from C classes
drawn at random, and TransCLIP runs on each batch alone, every class still a candidate (the
batch-adaptation setting of Zanella, Fuchs, De Vleeschouwer and Ben Ayed, "Realistic Test-Time
Adaptation of Vision-Language Models", CVPR 2025, whose Table 1 shows TransCLIP falling below
zero-shot when a batch holds few classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fskd.runtime import single_thread

#: nearest neighbours per row in the affinity graph (w_ij = f_i^T f_j for the 3 nearest test rows
#: of each test row and each shot, 0 otherwise)
KNN = 3
#: weight λ of the KL term in the few-shot setting (paper, Sec. 4, implementation details)
LAMBDA_FEW_SHOT = 0.5
#: weight λ of the KL term in the zero-shot setting, no labelled shot (paper, Sec. 4)
LAMBDA_ZERO_SHOT = 1.0
#: weight of the Gaussian log-likelihood in the z-step, against 1 for the KL term (the authors')
LIKELIHOOD_WEIGHT = 1 / 50
#: in the μ- and σ²-steps the shots together weigh SHOT_MASS x γ against 1 for all test rows
SHOT_MASS = 50.0
#: the shot weights γ, run one after another without reset; val data picks one (the authors')
SHOT_WEIGHTS = (0.002, 0.01, 0.02, 0.2)
#: z-steps per shot weight, with a μ- then σ²-step between consecutive ones (11 and 10)
Z_STEPS = 11
#: z updates per z-step (μ and σ² fixed)
Z_ITERS = 5
#: zero-shot: each class mean starts at the ŷ-weighted sum of its most confident test rows
ZERO_SHOT_INIT_TOP = 8

#: rows of the k-NN similarity computed at once: a (CHUNK, M) block, memory bounded whatever M
KNN_CHUNK = 2048
_EPS = 1e-12
#: an assignment more than this many nats below its row's best is held at e^-80 (1.8e-35, a normal
#: float32): smaller ones are subnormal, and subnormal arithmetic is 10-100x slower on a CPU
_LOG_RANGE = 80.0


def assignments(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over classes of ``logits`` (M, N), each entry at least e^-80 times its row's
    largest (:data:`_LOG_RANGE`; a change below float32's resolution of the sums it enters)."""
    top = logits.max(-1, keepdim=True).values
    return torch.softmax(torch.maximum(logits, top - _LOG_RANGE), dim=-1)


@dataclass
class TransclipOutput:
    """``pred`` (M,) the transductive class (way index) of every test row; ``scores`` (M, N) the
    log of the chosen soft assignments z (for top-k), ``z`` (M, N) those assignments, ``mu`` (N, D)
    and ``var`` (D,) the mixture after the last shot weight; ``shot_weight`` the γ whose
    assignments were kept (None zero-shot), ``val_accuracy`` the val accuracy after each γ (empty
    without val rows)."""

    pred: torch.Tensor
    scores: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor
    shot_weight: float | None = None
    val_accuracy: list[float] = field(default_factory=list)


def nearest(q: torch.Tensor, x: torch.Tensor, k: int, chunk: int = KNN_CHUNK, skip_self: bool = False):
    """The indices (R, k) of the k rows of ``x`` (M, D) most similar (dot product) to each row of
    ``q`` (R, D), and those similarities (R, k); ``skip_self``: ``q`` is ``x`` and a row is not its
    own neighbour. Block by block of rows (a (chunk, M) similarity at a time)."""
    k = min(k, x.shape[0] - (1 if skip_self else 0))
    if k < 1:
        return (torch.zeros(q.shape[0], 0, dtype=torch.long, device=x.device), q.new_zeros(q.shape[0], 0))
    idx, w = [], []
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ x.T  # (c, M)
        if skip_self:
            r = torch.arange(sim.shape[0], device=x.device)
            sim[r, r + s] = float("-inf")
        val, ind = sim.topk(k, dim=1)
        idx.append(ind)
        w.append(val)
    return torch.cat(idx), torch.cat(w)


def knn_graph(x: torch.Tensor, k: int = KNN, chunk: int = KNN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """TransCLIP's affinity among the test rows ``x`` (M, D), L2-normalised: for every row the
    indices (M, k) of its k most similar other rows and the weights (M, k) ``f_i^T f_j``."""
    return nearest(x, x, k, chunk, skip_self=True)


def affinity(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The symmetric affinity ``W + W^T`` (M, M) of the k-NN graph (``idx``, ``w``) of
    :func:`knn_graph` as a sparse (COO) matrix of at most 2 M k entries: ``affinity @ z`` is
    ``Σ_j (w_ij + w_ji) z_j``, each row's neighbours and the rows whose neighbour it is."""
    m, k = idx.shape
    rows = torch.arange(m, device=idx.device).repeat_interleave(k)
    cols = idx.reshape(-1)
    return torch.sparse_coo_tensor(
        torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
        torch.cat([w.reshape(-1), w.reshape(-1)]),
        (m, m),
        check_invariants=True,
    ).coalesce()


def shot_message(idx: torch.Tensor, w: torch.Tensor, onehot: torch.Tensor, m: int) -> torch.Tensor:
    """``Σ_s w_si e(y_s)`` (M, N): each shot's label sent to its k nearest test rows (``idx``,
    ``w`` (S, k) from :func:`nearest`), weighted by their similarity."""
    out = onehot.new_zeros(m, onehot.shape[1])
    for j in range(idx.shape[1]):
        out.index_add_(0, idx[:, j], w[:, j, None] * onehot)
    return out


def gaussian_log_likelihood(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``ℓ_ik`` (M, N) up to the log-determinant and 2π terms, which are the same for every class
    (the covariance is shared) and cancel in the z-step: ``-1/2 (x_i - μ_k)^T Σ^-1 (x_i - μ_k)``
    with Σ = diag(``var``), expanded as a matmul."""
    inv = 1.0 / var
    a = (x * x) @ inv  # (M,)
    b = x @ (mu * inv).T  # (M, N)
    c = (mu * mu) @ inv  # (N,)
    return -0.5 * (a[:, None] - 2 * b + c[None])


def z_logits(
    log_yhat: torch.Tensor,
    log_p: torch.Tensor,
    z: torch.Tensor,
    graph: torch.Tensor,
    lam: float,
    shots: torch.Tensor | float = 0.0,
    k: int = KNN,
) -> torch.Tensor:
    """The log of one assignment update before normalisation:
    ``λ log ŷ_i + ℓ_i / 50 + (Σ_j (w_ij + w_ji) z_j + shots_i) / (2k)``, ``log_p`` = ℓ, ``graph``
    :func:`affinity` and ``shots`` :func:`shot_message`; the update is their :func:`assignments`."""
    return lam * log_yhat + LIKELIHOOD_WEIGHT * log_p + (torch.sparse.mm(graph, z) + shots) / (2 * k)


def mu_step(
    x: torch.Tensor,
    z: torch.Tensor,
    shot_sum: torch.Tensor,
    shot_weight: float,
    previous: torch.Tensor,
    class_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class means: the L2-normalised ``Σ_i z_ik x_i / M + shot_weight Σ_{s in k} f_s``
    (``shot_sum`` (N, D) the class sums of the shots; ``shot_weight`` = 50 γ / S; ``class_sum``
    ``z^T x`` when already computed). A class left with no mass keeps its previous mean."""
    if class_sum is None:
        class_sum = z.T @ x
    num = class_sum / x.shape[0] + shot_weight * shot_sum  # (N, D)
    norm = num.norm(dim=-1, keepdim=True)
    return torch.where(norm > _EPS, num / norm.clamp_min(_EPS), previous)


def var_step(
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    support: torch.Tensor,
    support_onehot: torch.Tensor,
    gamma: float,
    class_sum: torch.Tensor | None = None,
    shot_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared diagonal variance: ``[Σ_i Σ_k z_ik (x_i - μ_k)^2 / M + (50 γ / S) Σ_s (f_s - μ_ys)^2]
    / (1 + 50 γ)``, element-wise (the shots' terms only when there are shots). The square expands to
    ``Σ_i x_i^2 - 2 Σ_k μ_k (Σ_i z_ik x_i) + Σ_k (Σ_i z_ik) μ_k^2`` (``Σ_k z_ik = 1``): the class sums
    ``z^T x`` (``class_sum``, the μ-step's; ``shot_sum`` the shots') and no (M, N, D) tensor."""

    def spread(rows: torch.Tensor, assign: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
        sums = assign.T @ rows if sums is None else sums  # (N, D)
        return (rows * rows).sum(0) - 2 * (mu * sums).sum(0) + assign.sum(0) @ (mu * mu)

    total = spread(x, z, class_sum) / x.shape[0]
    mass = 1.0
    if support.shape[0]:
        total = total + SHOT_MASS * gamma / support.shape[0] * spread(support, support_onehot, shot_sum)
        mass += SHOT_MASS * gamma
    return (total / mass).clamp_min(1e-8)


def transclip(
    test_x: torch.Tensor,
    yhat: torch.Tensor,
    support_x: torch.Tensor | None = None,
    support_y: torch.Tensor | None = None,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    lam: float | None = None,
    k: int = KNN,
    shot_weights: tuple[float, ...] = SHOT_WEIGHTS,
    z_steps: int = Z_STEPS,
    z_iters: int = Z_ITERS,
) -> TransclipOutput:
    """TransCLIP on the test features ``test_x`` (M, D), the inductive probabilities ``yhat``
    (M, N) (softmax of the head's logits), and the labelled shots ``support_x`` (S, D) with their
    way indices ``support_y`` (S,) in [0, N) (None or empty: the zero-shot setting). ``val_x``
    (V, D), ``val_y`` (V,) way indices: the val rows that choose the shot weight (module
    docstring); None: the last. Features are L2-normalised here. ``lam``: the KL weight, by default
    :data:`LAMBDA_FEW_SHOT` with shots and :data:`LAMBDA_ZERO_SHOT` without. Returns
    :class:`TransclipOutput`; ``pred`` is the transductive prediction (M,)."""
    # most of its ops are element-wise on (M, N): one thread below SMALL_STEP_WORK entries (ImageNet's
    # 50,000 x 1,000 keeps every thread); on 2 busy cores a 2-thread solve of Omniglot took 30 s, not 1
    with single_thread(test_x.shape[0] * yhat.shape[1]):
        x = F.normalize(test_x.float(), dim=-1)
        m, d = x.shape
        n = yhat.shape[1]
        yhat = yhat.to(x)
        few_shot = support_x is not None and support_y is not None and support_x.numel() > 0
        if few_shot:
            sx = F.normalize(support_x.float().to(x.device), dim=-1)
            sy = F.one_hot(support_y.to(x.device).long(), n).to(x)
        else:
            sx, sy = x.new_zeros(0, d), x.new_zeros(0, n)
            shot_weights = (0.0,)
        if lam is None:
            lam = LAMBDA_FEW_SHOT if few_shot else LAMBDA_ZERO_SHOT
        log_yhat = torch.log(yhat.clamp_min(torch.finfo(torch.float32).tiny))  # ŷ^λ of a 0 is held near 0
        graph = affinity(*knn_graph(x, k))
        shots: torch.Tensor | float = 0.0
        if few_shot:
            s_idx, s_w = nearest(sx, x, k)
            shots = shot_message(s_idx, s_w, sy, m)
        scored = val_x is not None and val_y is not None and len(val_y) > 0
        if scored:
            v_nn = nearest(F.normalize(val_x.float().to(x.device), dim=-1), x, 1)[0][:, 0]  # (V,)
            v_truth = val_y.to(x.device).long()

        # initialisation: z = ŷ; means from the shots (the normalised class sum) or, for a class
        # without shots, from the test rows the head is most confident of; σ² = 1/d
        z = assignments(log_yhat)
        top = min(ZERO_SHOT_INIT_TOP, m)
        conf_val, conf = z.topk(top, dim=0)  # (top, N): the most confident rows of each class
        mu = F.normalize(torch.einsum("tn,tnd->nd", conf_val, x[conf]), dim=-1)
        shot_sum = sy.T @ sx  # (N, D)
        if few_shot:
            has = sy.sum(0) > 0
            mu = torch.where(has[:, None], F.normalize(shot_sum, dim=-1), mu)
        var = x.new_full((d,), 1.0 / d)

        logits = log_yhat
        best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
        val_acc: list[float] = []
        for gamma in shot_weights:
            for t in range(z_steps):
                log_p = gaussian_log_likelihood(x, mu, var)
                for _ in range(z_iters):
                    logits = z_logits(log_yhat, log_p, z, graph, lam, shots, k)
                    z = assignments(logits)
                if t == z_steps - 1:
                    break
                class_sum = z.T @ x  # (N, D), shared by the μ- and σ²-steps
                mu = mu_step(x, z, shot_sum, SHOT_MASS * gamma / max(sx.shape[0], 1), mu, class_sum)
                var = var_step(x, z, mu, sx, sy, gamma, class_sum, shot_sum)
            if scored:
                acc = float((z[v_nn].argmax(-1) == v_truth).float().mean())
                val_acc.append(acc)
                if best is None or acc > best[0]:  # the earliest γ on ties
                    best = (acc, logits, z, gamma)
        if best is not None:
            _, logits, z_kept, gamma_kept = best
        else:
            z_kept, gamma_kept = z, shot_weights[-1]
        scores = torch.log_softmax(logits, dim=-1)  # log z without underflow: ranks every class
        return TransclipOutput(
            pred=scores.argmax(-1),
            scores=scores,
            z=z_kept,
            mu=mu,
            var=var,
            shot_weight=gamma_kept if few_shot else None,
            val_accuracy=val_acc,
        )


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
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float | None]]:
    """TransCLIP run on each batch of rows alone (its own k-NN graph, mixture and assignments;
    every class a candidate, the shots and val rows shared, each val row classified as its nearest
    row of the batch), one call per batch: ``pred`` (M,) and ``scores`` (M, N), each row's from its
    batch, and the shot weight each batch kept."""
    m, n = yhat.shape
    pred = torch.empty(m, dtype=torch.long, device=yhat.device)
    scores = torch.empty(m, n, dtype=torch.float32, device=yhat.device)
    kept: list[float | None] = []
    for rows in batches:
        r = torch.from_numpy(rows).to(yhat.device)
        out = transclip(test_x[r], yhat[r], support_x, support_y, val_x, val_y)
        pred[r], scores[r] = out.pred.to(pred.device), out.scores.to(scores.device)
        kept.append(out.shot_weight)
    return pred, scores, kept
