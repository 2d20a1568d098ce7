"""The visual-semantic bridge between text and image spaces (SynTrans's bridging module).

For a joint encoder (CLIP) it is the identity. When the spaces differ (the offline pair, a
student), it is a pair of ridge regressions learned from (image feature, class text feature)
pairs: text -> image gives class weights in image space for zero-shot and semantic heads;
image -> text maps images to the text space. Both work on *centred, L2-normalised* image
features; ``embed_images`` puts raw store features into that space.

The ridge strength is chosen on held-out classes (zero-shot accuracy of the text -> image map
on validation classes) when the caller gives them, never on test data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: rows per block when the primal ridge sums its normal equations
RIDGE_BLOCK = 65536


def _ridge(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||a W - b||^2 + lam ||W||^2 for a (n, p), b (n, q): (p, q), in float64."""
    return ridge_path(a, b, (lam,))[0]


def ridge_path(a: torch.Tensor, b: torch.Tensor, lams) -> list[torch.Tensor]:
    """Ridge solutions (p, q) for every strength in ``lams``, in the primal (n >= p) or dual
    (n < p) form; float64 inside, float32 out. A few strengths: one Cholesky solve each; many:
    one eigendecomposition shared by all (an eigh costs several Cholesky factorisations)."""
    n, p = a.shape
    dual = n < p
    if dual:
        a64, b64 = a.double(), b.double()
        gram, rhs = a64 @ a64.T, b64
    else:  # (p, p) and (p, q) sums over row blocks: no float64 copy of a 360,000-row a or b
        gram = torch.zeros(p, p, dtype=torch.float64, device=a.device)
        rhs = torch.zeros(p, b.shape[1], dtype=torch.float64, device=a.device)
        for s in range(0, n, RIDGE_BLOCK):
            ab, bb = a[s : s + RIDGE_BLOCK].double(), b[s : s + RIDGE_BLOCK].double()
            gram += ab.T @ ab
            rhs += ab.T @ bb
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    out = []
    if len(lams) <= 4:
        for lam in lams:
            sol = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + lam * eye))
            out.append((a64.T @ sol if dual else sol).float())
        return out
    evals, u = torch.linalg.eigh(gram)
    ur = u.T @ rhs
    for lam in lams:
        sol = u @ (ur / (evals.clamp_min(0) + lam)[:, None])
        out.append((a64.T @ sol if dual else sol).float())
    return out


def _class_sums(e: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classes present in y, their row counts and the per-class sums of e: (c,), (c,), (c, D)."""
    classes, inv = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(classes), e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, inv, e)
    counts = torch.bincount(inv, minlength=len(classes)).to(e.dtype)
    return classes, counts, sums


def _t2i_path(t_cls: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, lams) -> list[torch.Tensor]:
    """Text -> image ridge maps from class-aggregated data. Every row of a class has the same
    text t_c, so a^T a = sum_c n_c t_c t_c^T and a^T b = sum_c t_c (sum of the class's images):
    the same solution as regressing row by row, at the cost of the number of classes."""
    a = t_cls.double() * counts.double().sqrt()[:, None]  # (c, d_t): a^T a = sum n_c t t^T
    b = sums.double() / counts.double().sqrt()[:, None]  # a^T b = sum t_c sums_c
    return ridge_path(a, b, lams)


def batched_text_to_image(
    e: torch.Tensor, t_classes: torch.Tensor, lam: float, leave_out: bool = False
) -> torch.Tensor:
    """Per-episode ridge text -> image maps applied to the class texts (Bridge.fit, batched).

    e: (E, N, K, D) embedded support, t_classes: (E, N, d_t) class texts -> (E, N, D) L2-normalised
    class weights in image space. All K rows of a class share its text, so the regression is
    solved on class-aggregated data (rows t_c sqrt(K), targets sum_k e_k / sqrt(K)): the same
    solution as row by row, in the dual form over the N classes.

    ``leave_out``: class c's weight comes from a bridge fitted without class c (exact
    leave-one-out of kernel ridge: f_-c(a_c) = (f(a_c) - H_cc b_c) / (1 - H_cc), H = K (K + lam)^-1),
    so it is predicted from its text alone: a zero-shot weight, not its own prototype.
    """
    K = e.shape[2]
    a = t_classes.double() * math.sqrt(K)  # (E, N, d_t)
    b = e.double().sum(2) / math.sqrt(K)  # (E, N, D)
    n = a.shape[1]
    gram = torch.bmm(a, a.transpose(1, 2))
    coef = torch.linalg.solve(gram + lam * torch.eye(n, dtype=a.dtype, device=a.device), b)  # W = a^T coef
    if not leave_out:
        return F.normalize(torch.bmm(torch.bmm(t_classes.double(), a.transpose(1, 2)), coef).float(), dim=-1)
    fitted = torch.bmm(gram, coef)  # f(a_c) for every class row
    h = torch.linalg.solve(gram + lam * torch.eye(n, dtype=a.dtype, device=a.device), gram).diagonal(dim1=1, dim2=2)
    loo = (fitted - h[..., None] * b) / (1.0 - h).clamp_min(1e-12)[..., None]
    return F.normalize(loo.float(), dim=-1)


@dataclass
class Bridge:
    """Maps between the store's image space (d_i) and its text space (d_t).

    mean:     (d_i,) image mean subtracted before normalising (zeros for the identity)
    t2i:      (d_t, d_i) or None (identity)
    i2t:      (d_i, d_t) or None (identity)
    """

    mean: torch.Tensor
    t2i: torch.Tensor | None = None
    i2t: torch.Tensor | None = None
    ridge: float | None = None

    @classmethod
    def identity(cls, dim: int, device: torch.device | str = "cpu") -> Bridge:
        return cls(mean=torch.zeros(dim, device=device))

    @property
    def is_identity(self) -> bool:
        return self.t2i is None

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Raw image features (..., d_i) -> centred, L2-normalised (..., d_i)."""
        return F.normalize(x - self.mean.to(x.device), dim=-1)

    def text_to_image(self, t: torch.Tensor) -> torch.Tensor:
        """Class text features (C, d_t) -> L2-normalised class weights in image space (C, d_i)."""
        t = F.normalize(t, dim=-1)
        return F.normalize(t if self.t2i is None else t @ self.t2i.to(t.device), dim=-1)

    def image_to_text(self, x: torch.Tensor) -> torch.Tensor:
        """Raw image features (n, d_i) -> L2-normalised text-space features (n, d_t)."""
        e = self.embed_images(x)
        return F.normalize(e if self.i2t is None else e @ self.i2t.to(e.device), dim=-1)

    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        text: torch.Tensor,
        ridge: float | None = None,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        mean: torch.Tensor | None = None,
    ) -> Bridge:
        """Learn both maps from images ``x`` (n, d_i) with class labels ``y`` (n,) and the class
        text table ``text`` (C, d_t) indexed by those labels.

        ``ridge`` fixed, or chosen from RIDGE_GRID by zero-shot accuracy on ``val`` = (x_val,
        y_val) whose classes are disjoint from or equal to the training ones (never test data).
        """
        mean = x.mean(0) if mean is None else mean
        e = F.normalize(x - mean, dim=-1)
        tn = F.normalize(text, dim=-1)
        grid = (ridge,) if ridge is not None else RIDGE_GRID
        classes, counts, sums = _class_sums(e, y)
        maps = _t2i_path(tn[classes], counts, sums, grid)
        best, best_acc = None, -1.0
        if val is not None and len(grid) > 1:  # embed the validation rows once for every candidate
            val_classes = torch.unique(val[1])
            ev = F.normalize(val[0] - mean.to(val[0].device), dim=-1)
        for lam, t2i in zip(grid, maps, strict=True):
            cand = cls(mean=mean, t2i=t2i, ridge=lam)
            if val is None or len(grid) == 1:
                best = cand
                break
            w = cand.text_to_image(text[val_classes])
            acc = float((val_classes[(ev @ w.T).argmax(1)] == val[1]).float().mean())
            if acc > best_acc:
                best, best_acc = cand, acc
        best.i2t = _ridge(e, tn[y], best.ridge)
        return best

    def zero_shot_accuracy(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> float:
        """Accuracy of cosine(embed(x), text_to_image(text[c])) over the classes present in y."""
        classes = torch.unique(y)
        w = self.text_to_image(text[classes])
        pred = classes[(self.embed_images(x) @ w.T).argmax(1)]
        return float((pred == y).float().mean())

    # -- (de)serialisation into a state's tensor dict ---------------------------------------------
    def tensors(self, prefix: str = "bridge.") -> dict[str, torch.Tensor]:
        out = {f"{prefix}mean": self.mean}
        if self.t2i is not None:
            out[f"{prefix}t2i"] = self.t2i
            out[f"{prefix}i2t"] = self.i2t
            out[f"{prefix}ridge"] = torch.tensor(float(self.ridge))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "bridge.") -> Bridge:
        r = tensors.get(f"{prefix}ridge")
        return cls(
            mean=tensors[f"{prefix}mean"],
            t2i=tensors.get(f"{prefix}t2i"),
            i2t=tensors.get(f"{prefix}i2t"),
            ridge=None if r is None else float(r),
        )


def bridge_for_store(
    store,
    classes: list[int] | None = None,
    val_classes: list[int] | None = None,
    splits: tuple[str, ...] | None = None,
    device: torch.device | str = "cpu",
) -> Bridge:
    """The identity for a joint encoder, else a bridge fitted on ``classes`` (default: the base
    classes, every sample split) with the ridge chosen on ``val_classes`` (default: val classes)."""
    from fskd.errors import StoreError
    from fskd.store import sampling

    text = store.text_embeddings()
    if text is None:
        raise StoreError(f"{store.path} has no class text features (encoder {store.encoder_spec!r} has no text tower)")
    if store.joint:
        return Bridge.identity(store.dim, device)
    classes = store.class_split("base") if classes is None else classes
    val_classes = store.class_split("val") if val_classes is None else val_classes
    x, y = store.gather(classes, splits, max_per_class=sampling.CLASS_ROWS)
    val = None
    if val_classes:
        xv, yv = store.gather(val_classes, splits, max_per_class=sampling.CLASS_ROWS)
        val = (torch.from_numpy(xv).to(device), torch.from_numpy(yv).to(device))
    return Bridge.fit(
        torch.from_numpy(x).to(device),
        torch.from_numpy(y).to(device),
        torch.from_numpy(np.asarray(text)).to(device),
        val=val,
    )
