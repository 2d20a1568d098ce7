"""Distillation losses at three levels, each switchable and weighted.

instance  ``logit``       KL(teacher || student) of class logits at temperature T (times T^2)
          ``feature``     1 - cos(projection head(student feature), teacher embedding)
batch     ``affinity``    sample-sample affinity mimicking: row-softmax KL of the batch's
                          student cosine similarities toward the teacher's (diagonal masked)
          ``image_text``  TinyCLIP affinity mimicking: image->text and text->image softmax KL,
                          text = class text features in the teacher's image space (through the
                          bridge when the spaces differ)
class     ``prototype``   student class prototypes of the batch (projected) classified against
                          the teacher's class anchors (its head weights, text-initialised)

``task`` (cross-entropy on the labelled rows) is always on; ``--losses none`` keeps only it.
Every function takes the teacher side as constants: no gradient ever reaches the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fskd.errors import ConfigError

TERMS = ("logit", "feature", "affinity", "image_text", "prototype")
LEVELS = {"instance": ("logit", "feature"), "batch": ("affinity", "image_text"), "class": ("prototype",)}
#: terms whose student side is the projection head into the teacher's space
PROJECTED = ("feature", "image_text", "prototype")
#: terms that read only the teacher's features (``logit`` and ``prototype`` read its head, fitted on the
#: labels): the student's loss under SynTrans's label-free proxy (mtkd ``--set proxy=label-free``)
LABEL_FREE = ("feature", "affinity", "image_text")


def parse_losses(text: str) -> tuple[str, ...]:
    """``all`` | ``none`` | comma list of terms and levels -> the enabled terms, in TERMS order."""
    text = (text or "").strip()
    if text == "all":
        return TERMS
    if text == "none":
        return ()
    chosen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if part in LEVELS:
            chosen.update(LEVELS[part])
        elif part in TERMS:
            chosen.add(part)
        else:
            raise ConfigError(
                f"--losses: unknown loss {part!r}; use all, none, or a comma list of levels "
                f"({', '.join(LEVELS)}) and terms ({', '.join(TERMS)})"
            )
    return tuple(t for t in TERMS if t in chosen)


@dataclass
class LossWeights:
    task: float = 1.0
    logit: float = 1.0
    feature: float = 1.0
    affinity: float = 1.0
    image_text: float = 1.0
    prototype: float = 1.0


@dataclass
class TeacherBatch:
    """The teacher's side of one batch (constants).

    embedded: (B, D_t) centred, L2-normalised teacher features
    logits:   (B, C) teacher head logits over the training classes
    labels:   (B,) class index in [0, C) of labelled rows, -1 for unlabelled ones
    """

    embedded: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) along ``dim``."""
    t = F.log_softmax(teacher_logits, dim=dim)
    s = F.log_softmax(student_logits, dim=dim)
    return (t.exp() * (t - s)).sum(dim).mean()


class DistillLoss:
    """Computes the loss dict ``{loss, kd_loss, task_loss, <term>...}`` for one batch.

    text_anchors:  (C_text, D_t) normalised class text features in the teacher's image space, or None
    class_anchors: (C, D_t) normalised teacher class weights (class-level targets)
    """

    def __init__(
        self,
        terms: tuple[str, ...],
        weights: LossWeights,
        temperature: float = 4.0,
        tau_affinity: float = 0.1,
        tau_text: float = 0.05,
        tau_class: float = 0.1,
        text_anchors: torch.Tensor | None = None,
        class_anchors: torch.Tensor | None = None,
    ) -> None:
        if "image_text" in terms and text_anchors is None:
            raise ConfigError(
                "loss 'image_text' needs class text features; the teacher store has none (drop it from --losses)"
            )
        if "prototype" in terms and class_anchors is None:
            raise ConfigError("loss 'prototype' needs the teacher's class anchors")
        self.terms, self.w = terms, weights
        self.temperature, self.tau_affinity, self.tau_text, self.tau_class = (
            temperature,
            tau_affinity,
            tau_text,
            tau_class,
        )
        self.text_anchors, self.class_anchors = text_anchors, class_anchors

    def __call__(
        self, feats: torch.Tensor, logits: torch.Tensor, proj: torch.Tensor | None, teacher: TeacherBatch
    ) -> dict[str, torch.Tensor]:
        """feats (B, D_s) student features, logits (B, C) student logits, proj (B, D_t)
        normalised projections (None when no projected term is on)."""
        feats, logits = feats.float(), logits.float()
        proj = proj.float() if proj is not None else None
        e_t = teacher.embedded.detach().float()
        l_t = teacher.logits.detach().float()
        y = teacher.labels
        zero = logits.sum() * 0.0  # keeps the graph (DDP) when a term has nothing to score
        lab = y >= 0
        out: dict[str, torch.Tensor] = {}
        out["task_loss"] = F.cross_entropy(logits[lab], y[lab]) if bool(lab.any()) else zero
        for term in TERMS:
            out[term] = (
                getattr(self, f"_{term}")(feats, logits, proj, e_t, l_t, y) if term in self.terms else zero.detach()
            )
        kd = sum((getattr(self.w, t) * out[t] for t in self.terms), zero)
        out["kd_loss"] = kd
        out["loss"] = self.w.task * out["task_loss"] + kd
        return out

    # -- instance level ----------------------------------------------------------------------------
    def _logit(self, feats, logits, proj, e_t, l_t, y):
        T = self.temperature
        return kl_rows(l_t / T, logits / T) * T * T

    def _feature(self, feats, logits, proj, e_t, l_t, y):
        return (1.0 - (proj * e_t).sum(-1)).mean()

    # -- batch level -------------------------------------------------------------------------------
    def _affinity(self, feats, logits, proj, e_t, l_t, y):
        z = F.normalize(feats, dim=-1)
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        a_s = (z @ z.T / self.tau_affinity).masked_fill(eye, -1e4)
        a_t = (e_t @ e_t.T / self.tau_affinity).masked_fill(eye, -1e4)
        return kl_rows(a_t, a_s)

    def _image_text(self, feats, logits, proj, e_t, l_t, y):
        txt = self.text_anchors.to(proj.device, proj.dtype)
        s = proj @ txt.T / self.tau_text  # (B, C_text)
        t = e_t @ txt.T / self.tau_text
        return 0.5 * (kl_rows(t, s, dim=1) + kl_rows(t, s, dim=0))  # image->text and text->image

    # -- class level -------------------------------------------------------------------------------
    def _prototype(self, feats, logits, proj, e_t, l_t, y):
        # classes: the label where known, else the teacher's prediction (pseudo-label)
        cls = torch.where(y >= 0, y, l_t.argmax(1))
        anchors = self.class_anchors.to(proj.device, proj.dtype)
        sums = torch.zeros(anchors.shape[0], proj.shape[1], dtype=proj.dtype, device=proj.device).index_add(
            0, cls, proj
        )
        present = torch.unique(cls)
        protos = F.normalize(sums[present], dim=-1)
        return F.cross_entropy(protos @ anchors.T / self.tau_class, present)
