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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _ridge(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||a W - b||^2 + lam ||W||^2 for a (n, p), b (n, q): (p, q), in float64."""
    a64, b64 = a.double(), b.double()
    p = a64.shape[1]
    if a64.shape[0] < p:  # dual form is cheaper when there are fewer rows than features
        k = a64 @ a64.T
        alpha = torch.linalg.solve(k + lam * torch.eye(len(k), dtype=k.dtype, device=k.device), b64)
        return (a64.T @ alpha).float()
    g = a64.T @ a64 + lam * torch.eye(p, dtype=a64.dtype, device=a64.device)
    return torch.linalg.solve(g, a64.T @ b64).float()


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
        t = F.normalize(text, dim=-1)[y]
        grid = (ridge,) if ridge is not None else RIDGE_GRID
        best, best_acc = None, -1.0
        for lam in grid:
            cand = cls(mean=mean, t2i=_ridge(t, e, lam), ridge=lam)
            if val is None or len(grid) == 1:
                best = cand
                break
            acc = cand.zero_shot_accuracy(val[0], val[1], text)
            if acc > best_acc:
                best, best_acc = cand, acc
        best.i2t = _ridge(e, t, best.ridge)
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


def bridge_for_store(store, classes: list[int] | None = None, val_classes: list[int] | None = None,
                     splits: tuple[str, ...] | None = None, device: torch.device | str = "cpu") -> Bridge:
    """The identity for a joint encoder, else a bridge fitted on ``classes`` (default: the base
    classes, every sample split) with the ridge chosen on ``val_classes`` (default: val classes)."""
    from fskd.errors import StoreError

    text = store.text_embeddings()
    if text is None:
        raise StoreError(f"{store.path} has no class text features (encoder {store.encoder_spec!r} has no text tower)")
    if store.joint:
        return Bridge.identity(store.dim, device)
    classes = store.class_split("base") if classes is None else classes
    val_classes = store.class_split("val") if val_classes is None else val_classes
    x, y = store.gather(classes, splits)
    val = None
    if val_classes:
        xv, yv = store.gather(val_classes, splits)
        val = (torch.from_numpy(xv).to(device), torch.from_numpy(yv).to(device))
    return Bridge.fit(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                      torch.from_numpy(np.asarray(text)).to(device), val=val)
