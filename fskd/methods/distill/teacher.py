"""The teacher: the store's encoder (cached features, or run online) plus a few-shot head.

The head is a cosine classifier over the teacher's centred, L2-normalised features. Its class
weights start from the class text features mapped into image space through the bridge (SynTrans
bridging; the identity for a joint encoder), or from the class means when the store has no
text, and are fine-tuned on the labelled rows; the number of steps is chosen on held-out
labelled rows (the val split), never on test rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from fskd.encoders import Encoder, build_encoder
from fskd.methods.distill.data import resize_views

log = logging.getLogger(__name__)


@dataclass
class TeacherHead:
    """weight (C, D) L2-normalised class weights; logits = scale * cos(embedded x, weight)."""

    weight: torch.Tensor
    scale: float
    steps: int
    val_accuracy: float | None

    def logits(self, embedded: torch.Tensor) -> torch.Tensor:
        """(n, D) centred + normalised teacher features -> (n, C)."""
        return self.scale * embedded @ self.weight.T.to(embedded.device, embedded.dtype)


def class_means(e: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n, D), (n,) in [0, C) -> (C, D) L2-normalised class means (zero rows for absent classes)."""
    sums = torch.zeros(n_classes, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, y, e)
    return F.normalize(sums, dim=-1)


def fit_teacher_head(
    e: torch.Tensor,
    y: torch.Tensor,
    init: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float = 16.0,
    max_steps: int = 300,
    lr: float = 1e-3,
    every: int = 10,
    seed: int = 0,
) -> TeacherHead:
    """Fine-tune cosine class weights from ``init`` (C, D) on (e (n, D), y (n,)) with full-batch
    cross-entropy; keep the step count with the best val accuracy (the last one without val)."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(F.normalize(init.clone().float(), dim=-1))
    opt = torch.optim.Adam([w], lr=lr)

    def acc(ev: torch.Tensor, yv: torch.Tensor, weight: torch.Tensor) -> float:
        return float(((ev @ F.normalize(weight, dim=-1).T).argmax(1) == yv).float().mean())

    best_w, best_acc, best_step = F.normalize(w.detach().clone(), dim=-1), -1.0, 0
    if val is not None:
        best_acc = acc(val[0], val[1], w.detach())
    for step in range(1, max_steps + 1):
        loss = F.cross_entropy(scale * e @ F.normalize(w, dim=-1).T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if val is not None and step % every == 0:
            a = acc(val[0], val[1], w.detach())
            if a > best_acc:
                best_w, best_acc, best_step = F.normalize(w.detach().clone(), dim=-1), a, step
    if val is None:
        best_w, best_step = F.normalize(w.detach().clone(), dim=-1), max_steps
    return TeacherHead(weight=best_w, scale=scale, steps=best_step, val_accuracy=None if val is None else best_acc)


class OnlineTeacher:
    """The store's encoder run on augmented views: frozen, eval mode, no gradients.

    Views come in as [0, 1] float images; they are resized to the teacher's input size and
    normalised with the per-channel affine map its own preprocessing applies (measured once by
    preprocessing a black and a white image, which fits every resize/crop + normalise pipeline).
    """

    def __init__(self, spec: str, device: torch.device) -> None:
        self.encoder: Encoder = build_encoder(spec, device)
        for m in self.encoder.modules():
            m.eval()
            m.requires_grad_(False)
        black = self.encoder.preprocess(Image.new("RGB", (256, 256), (0, 0, 0)))
        white = self.encoder.preprocess(Image.new("RGB", (256, 256), (255, 255, 255)))
        self.size = int(black.shape[-1])
        self.offset = black.mean((1, 2)).view(1, 3, 1, 1).to(device)
        self.gain = (white - black).mean((1, 2)).view(1, 3, 1, 1).to(device)
        self.device = device

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.encoder.modules() for p in m.parameters()]

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) [0, 1] -> (B, image_dim) raw teacher features (float32)."""
        x = resize_views(views.to(self.device), self.size) * self.gain + self.offset
        return self.encoder.encode_images(x).float()
