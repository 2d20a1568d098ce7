"""``mtkd``: teacher -> student knowledge distillation (MTKD stage 1 / SynTrans proxy task).

The teacher is the store's encoder (its cached features; ``--online-teacher`` runs it frozen on
the augmented views instead) plus a cosine head fine-tuned on the labelled rows and initialised
from the class text features through the bridge. The student is a timm backbone trained on the
images themselves, decoded once at low resolution into a cache file on disk and read by batch
(memory independent of the dataset size; :mod:`fskd.methods.distill.data`).

Regimes
- ``semi`` (MTKD stage 1, DHO): K labelled shots per class from the train split (seeded); the
  rest of the train split is unlabelled. The student learns the labels and the teacher on every
  train image. The epoch and the head's classifier weight beta are chosen on the val split.
- ``base-novel`` (SynTrans): the student learns the base classes (all their rows, labels) plus
  the distillation proxy task toward the teacher's semantic-aligned features; the epoch is chosen
  on 5-way K-shot episodes over the val classes. It is judged on novel-class episodes.

``--teacher-state DIR`` makes any fitted all-way state of the same store (an adapt or align state:
tip-adapter-f, coop, fma, lp++, gda, ...) the teacher: its all-way head (the one ``fskd predict``
uses, :class:`fskd.methods.allway.AllwayHead`) scores the store's cached teacher features of the
training rows (or, with ``--online-teacher``, the teacher's features of the augmented views) and
its logits over the training classes are the soft targets (``logit`` loss) and the pseudo-labels
(``prototype`` loss). The built-in head is then fitted only when the ``prototype`` loss is on:
its weights stay the class anchors (they live in the embedded teacher space the student's
projection targets; a state's head has no class weights there in general). The state's path,
method, shots, seed and the SHA-256 of its ``state.json`` are recorded in hparams ``teacher`` /
``teacher_state``.

Losses (``--losses``, weights ``--set w_<term>=...``): see :mod:`fskd.methods.distill.losses`.
``--losses none`` trains the same student on the labels alone, for the same number of steps.

The state directory holds the best student (``student.*`` tensors), its projection and
classifier heads, the teacher head and bridge, the config, and the per-epoch training log
(``metrics.log``). While training, the last epoch's checkpoint lives beside it in
``.<DIR>.distill-resume/`` (never inside DIR, which is replaced atomically at the end); a killed
run started again with the same config resumes from it. Evaluate with
``fskd extract --encoder student:DIR`` then ``fskd eval --store S_student --state DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fskd.classifiers.base import FittedHead, Head
from fskd.config import Config, DistillConfig
from fskd.encoders.student import (
    STUDENT_PREFIX,
    StudentSpec,
    build_student_backbone,
    center_view,
    model_norm,
    normalize_images,
    stored_size,
    tensor_digest,
)
from fskd.errors import ConfigError, StateError, StoreError
from fskd.fsutil import from_tree, read_bundle, remove_bundle, sha256_file, to_tree, write_bundle
from fskd.methods.adapt.method import parse_options
from fskd.methods.allway import AllwayHead
from fskd.methods.base import (
    METHODS,
    STATE_JSON,
    Method,
    MethodState,
    TrainProgress,
    load_state,
    save_state,
)
from fskd.methods.bridge import Bridge, bridge_for_store
from fskd.methods.distill.data import (
    Episodes,
    crop_views,
    dataset_of,
    decode_images,
    episode_accuracy,
    random_boxes,
    sample_shots,
    sample_val_episodes,
)
from fskd.methods.distill.losses import (
    LABEL_FREE,
    PROJECTED,
    TERMS,
    DistillLoss,
    LossWeights,
    TeacherBatch,
    parse_losses,
)
from fskd.methods.distill.teacher import OnlineTeacher, TeacherHead, class_means, fit_teacher_head
from fskd.runtime import autocast, barrier, init_distributed, resolve_device, seed_everything
from fskd.store import StoreView
from fskd.store.sampling import validation_rows

log = logging.getLogger(__name__)

RESUME_VERSION = 1


@dataclass(frozen=True)
class MTKDOptions(Config):
    """``--set key=value`` options of mtkd. Defaults were chosen on validation data (val split /
    val classes of cub35), see the README's distill section."""

    image_size: int = 64  # student input side (the stored square is image_size / 0.875)
    batch_size: int = 64
    epochs: int = 20  # used when --epochs is not given
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear learning-rate warm-up before the cosine decay, in epochs
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area range of the random crops (RandomResizedCrop)
    temperature: float = 4.0  # softmax temperature of the logit (instance-level) distillation
    tau_affinity: float = 0.1  # temperature of the batch affinity (TinyCLIP-style) mimicking
    tau_text: float = 0.05  # temperature of the image-text (class text anchor) loss
    tau_class: float = 0.1  # temperature of the class-prototype loss
    w_task: float = 1.0  # weight of the cross-entropy on the labelled shots
    w_logit: float = 4.0  # weight of the teacher-logit KL (instance level)
    w_feature: float = 1.0  # weight of the projected-feature cosine to the teacher (instance level)
    w_affinity: float = 2.0  # weight of the batch affinity mimicking (batch level)
    w_image_text: float = 2.0  # weight of the image-to-class-text loss (batch level)
    w_prototype: float = 1.0  # weight of the teacher class-prototype loss (class level)
    proxy: str = "labelled"  # label-free: SynTrans's label-free proxy, the feature, affinity and image_text terms only and w_task 0
    proj_hidden: int = 1024  # hidden width of the projection into the teacher space
    classifier_scale: float = 16.0  # logit scale of the student's cosine classifier
    teacher_scale: float = 16.0  # logit scale of the teacher's cosine head
    teacher_steps: int = 300  # most fine-tuning steps of the teacher head (best on val is kept)
    beta_grid: tuple[float, ...] = (
        0.0,
        0.25,
        0.5,
        1.0,
        2.0,
    )  # candidate weights of the classifier beside prototypes (val)
    val_every: int = 1  # validate every this many epochs (the best epoch is kept)
    val_episodes: int = 300
    val_query: int = 15
    center_rows: int = 256  # training rows whose mean centres the student features
    decode_threads: int = 2  # threads decoding the images once into the cache file before training
    image_cache: str = (
        ""  # folder of the decoded-image cache files (default: $FSKD_CACHE_DIR/images or ~/.cache/fskd/images)
    )
    student_kwargs: dict = field(default_factory=dict)  # keyword arguments of timm.create_model for the student

    RANGES = {
        "warmup_epochs": (">=", 0),
        "weight_decay": (">=", 0),
        "teacher_steps": (">=", 0),
        "decode_threads": (">=", 1),
        "val_query": (">=", 1),
        "beta_grid": (">=", 0),
    }

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "epochs", "proj_hidden", "val_every", "val_episodes", "center_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mtkd option {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(f"mtkd option batch_size must be >= 2 (batch-level losses), got {self.batch_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"mtkd option crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("lr", "temperature", "tau_affinity", "tau_text", "tau_class", "classifier_scale", "teacher_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mtkd option {name} must be > 0, got {getattr(self, name)}")
        for t in ("task",) + TERMS:
            if getattr(self, f"w_{t}") < 0:
                raise ConfigError(f"mtkd option w_{t} must be >= 0, got {getattr(self, f'w_{t}')}")
        if not isinstance(self.student_kwargs, dict):
            raise ConfigError(f"mtkd option student_kwargs must be a JSON object, got {self.student_kwargs!r}")
        if self.proxy not in ("labelled", "label-free"):
            raise ConfigError(f"mtkd option proxy must be labelled or label-free, got {self.proxy!r}")
        if self.proxy == "label-free":  # no label term: the student learns the teacher's features only
            if self.w_task not in (0, type(self).w_task):
                raise ConfigError(
                    f"mtkd options proxy=label-free and w_task={self.w_task}: the label-free proxy has "
                    f"no label term (its w_task is 0); drop w_task"
                )
            object.__setattr__(self, "w_task", 0.0)

    def weights(self) -> LossWeights:
        return LossWeights(**{t: float(getattr(self, f"w_{t}")) for t in ("task",) + TERMS})


class StudentNet(torch.nn.Module):
    """Backbone + cosine classifier over the training classes + projection into the teacher space."""

    def __init__(
        self, backbone: torch.nn.Module, n_classes: int, teacher_dim: int, hidden: int, scale: float, projected: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        d = int(backbone.num_features)
        self.classifier = torch.nn.Parameter(torch.randn(n_classes, d) * d**-0.5)
        self.proj = (
            torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, teacher_dim))
            if projected
            else None
        )
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, 3, R, R) -> features (B, D_s), logits (B, C), normalised projections (B, D_t) or None."""
        f = self.backbone(x)
        logits = self.scale * F.normalize(f, dim=-1) @ F.normalize(self.classifier, dim=-1).T
        p = F.normalize(self.proj(f), dim=-1) if self.proj is not None else None
        return f, logits, p


@dataclass
class _Plan:
    """Everything the training loop needs, indexed into one decoded image tensor."""

    refs: list[str]  # all rows to decode (training rows first)
    n_train: int  # rows [0, n_train) are the training rows
    labels: np.ndarray  # (n_train,) class index in [0, C) or -1 (unlabelled)
    classes: list[int]  # store class index of each training class
    teacher_x: torch.Tensor  # (n_train, D_t) raw teacher features of the training rows
    bridge: Bridge | None
    mean: torch.Tensor  # (D_t,) centring of teacher features
    head_rows: np.ndarray  # training rows the teacher head is fitted on
    head_val: tuple[torch.Tensor, np.ndarray] | None  # (raw feats, class index) held-out for the head
    text: torch.Tensor | None  # (C, D_t) class text in teacher image space, normalised
    # student validation
    val_kind: str  # "split" (semi), "episodes" (base-novel) or "none"
    val_support: np.ndarray | None = None  # rows (into refs) of the labelled shots (semi)
    val_query: np.ndarray | None = None  # rows of the val split (semi) / val classes (base-novel)
    val_labels: np.ndarray | None = None  # class index of val_query rows (semi: in [0, C))
    episodes: Episodes | None = None
    center_rows: np.ndarray | None = None
    selected_on: str = "val split"


def _rows(store, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, labels, raw features in the store's precision) of one sample split's valid rows."""
    y = store.labels(split)
    keep = y >= 0
    return store.sample_ids(split)[keep], y[keep], store.features(split, store.attrs["dtype"])[keep]


def _mean(x: np.ndarray) -> torch.Tensor:
    """Column mean of (n, D) features, accumulated in float64 without a float32 copy of x."""
    return torch.from_numpy(x.mean(0, dtype=np.float64).astype(np.float32))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _embed(x: torch.Tensor, bridge: Bridge | None, mean: torch.Tensor) -> torch.Tensor:
    return bridge.embed_images(x) if bridge is not None else F.normalize(x - mean.to(x.device), dim=-1)


def _plan_semi(store, cfg: DistillConfig, opts: MTKDOptions, text_np: np.ndarray | None) -> _Plan:
    if not store.has_split("train"):
        raise StoreError(
            f"{store.path} has no 'train' sample split (it has {store.splits}); the semi regime takes the "
            f"K labelled shots and the unlabelled images from it. Re-extract with --sample-split, or use "
            f"--regime base-novel"
        )
    if cfg.shots < 1:
        raise ConfigError("--regime semi needs --shots >= 1 (labelled samples per class)")
    ids, y, x = _rows(store, "train")
    classes = [int(c) for c in np.unique(y)]
    local = {c: i for i, c in enumerate(classes)}
    shots = sample_shots(y, classes, cfg.shots, cfg.seed, store.class_names, "train")
    labels = np.full(len(y), -1, np.int64)
    labels[shots] = [local[int(c)] for c in y[shots]]
    xt = torch.from_numpy(x)  # the store's precision (float16: 1 KiB per 512-d row); embedded per batch
    mean = _mean(x)  # no labels needed: the whole (mostly unlabelled) train split
    val = None
    refs = list(ids)
    plan_val: dict = {"val_kind": "none", "selected_on": "fixed (no val split: last epoch)"}
    if cfg.hp_selection == "none":
        plan_val["selected_on"] = "fixed (--hp-selection none: no validation data; the last epoch)"
    elif store.has_split("val"):
        vids, vy, vx = _rows(store, "val")
        keep = validation_rows(vy, classes, cfg.shots, cfg.seed, cfg.hp_selection)
        vids, vy, vx = vids[keep], vy[keep], vx[keep]
        if len(vy):
            vloc = np.array([local[int(c)] for c in vy])
            val = (_float(torch.from_numpy(vx)), vloc)
            plan_val = {
                "val_kind": "split",
                "val_support": shots,
                "val_query": np.arange(len(refs), len(refs) + len(vy)),
                "val_labels": vloc,
                "selected_on": "val split"
                if cfg.hp_selection == "full-val"
                else f"val split ({len(vy)} rows: min(K, 4) per class, CoOp's few-shot validation)",
            }
            refs += list(vids)
    bridge = None
    text = None
    if text_np is not None:
        tt = torch.from_numpy(text_np)
        bv = (val[0], torch.from_numpy(np.asarray(classes)[val[1]])) if val is not None else None
        bridge = Bridge.fit(_float(xt[shots]), torch.from_numpy(y[shots]), tt, val=bv, mean=mean)
        text = bridge.text_to_image(tt[classes])
    rng = np.random.default_rng(cfg.seed + 7)
    return _Plan(
        refs=refs,
        n_train=len(y),
        labels=labels,
        classes=classes,
        teacher_x=xt,
        bridge=bridge,
        mean=mean,
        head_rows=shots,
        head_val=val,
        text=text,
        center_rows=np.sort(rng.choice(len(y), size=min(getattr(opts, "center_rows", 0), len(y)), replace=False)),
        **plan_val,
    )  # dho: no centring rows


def _plan_base_novel(store, cfg: DistillConfig, opts: MTKDOptions, text_np: np.ndarray | None) -> _Plan:
    base = store.class_split("base")
    if not base:
        raise StoreError(f"{store.path}: the base class split is empty; --regime base-novel trains on base classes")
    if cfg.shots < 1:
        raise ConfigError("--regime base-novel needs --shots >= 1 (the shot count of the validation episodes)")
    if cfg.hp_selection == "none":
        raise ConfigError(
            "--regime base-novel has no validation-free form: its bridge and epoch are chosen on the val "
            "classes (--hp-selection few-shot-val; --hp-selection none works with --regime semi)"
        )
    local = {c: i for i, c in enumerate(base)}
    ids_l, y_l, x_l, in_train = [], [], [], []
    val_ids, val_y = [], []
    head_val_x, head_val_y = [], []
    val_classes = store.class_split("val")
    for split in store.splits:
        ids, y, x = _rows(store, split)
        b = np.isin(y, base)
        ids_l.append(ids[b])
        y_l.append(y[b])
        x_l.append(x[b])
        in_train.append(np.full(int(b.sum()), split == "train" or not store.has_split("train")))
        if split == "val" and store.has_split("train"):
            head_val_x.append(x[b])
            head_val_y.append(y[b])
        v = np.isin(y, val_classes)
        val_ids.append(ids[v])
        val_y.append(y[v])
    ids, y, x = np.concatenate(ids_l), np.concatenate(y_l), np.concatenate(x_l)
    labels = np.array([local[int(c)] for c in y], np.int64)
    xt = torch.from_numpy(x)
    bridge = None
    text = None
    if text_np is not None:
        bridge = bridge_for_store(store)  # base classes, ridge chosen on the val classes
        text = bridge.text_to_image(torch.from_numpy(text_np)[base])
        mean = bridge.mean
    else:
        mean = _mean(x)
    head_val = None
    if head_val_x and len(np.concatenate(head_val_y)):
        hy = np.concatenate(head_val_y)
        head_val = (_float(torch.from_numpy(np.concatenate(head_val_x))), np.array([local[int(c)] for c in hy]))
    refs = list(ids)
    vy = np.concatenate(val_y) if val_y else np.zeros(0, np.int64)
    plan_val: dict = {"val_kind": "none", "selected_on": "fixed (no val classes: last epoch)"}
    if len(np.unique(vy)) >= 2:
        way = min(5, len(np.unique(vy)))
        eps = sample_val_episodes(
            vy, sorted(np.unique(vy).tolist()), way, cfg.shots, opts.val_query, opts.val_episodes, cfg.seed
        )
        plan_val = {
            "val_kind": "episodes",
            "val_query": np.arange(len(refs), len(refs) + len(vy)),
            "val_labels": vy,
            "episodes": eps,
            "selected_on": f"val classes ({way}-way {cfg.shots}-shot episodes)",
        }
        refs += list(np.concatenate(val_ids))
    rng = np.random.default_rng(cfg.seed + 7)
    return _Plan(
        refs=refs,
        n_train=len(y),
        labels=labels,
        classes=list(base),
        teacher_x=xt,
        bridge=bridge,
        mean=mean,
        head_rows=np.flatnonzero(np.concatenate(in_train)),
        head_val=head_val,
        text=text,
        center_rows=np.sort(rng.choice(len(y), size=min(opts.center_rows, len(y)), replace=False)),
        **plan_val,
    )


@dataclass
class StateTeacher:
    """``--teacher-state DIR``: a fitted all-way state's head (:class:`fskd.methods.allway.AllwayHead`,
    the head ``fskd predict`` uses) as the teacher. Its logits over the student's training classes,
    on raw store-encoder features, are the soft targets; ``provenance`` is what the student's
    state records about it."""

    head: AllwayHead
    columns: torch.Tensor  # (C_train,) column of each training class in the head's scores
    provenance: dict
    batch: int = 8192  # rows per head call (the all-way protocol's query batch)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """(n, D) raw store-encoder features -> (n, C_train) logits on raw's device, in batches
        (deterministic; the head is row-wise, so batching changes a row's logits by float rounding only)."""
        cols = self.columns.to(self.head.device)
        out = [self.head.logits(raw[s : s + self.batch])[:, cols] for s in range(0, len(raw), self.batch)]
        return (torch.cat(out) if out else torch.zeros(0, len(cols))).to(raw.device)

    def describe(self) -> str:
        p = self.provenance
        return (
            f"state {p['path']} ({p['method']}, {p['shots']} shots, seed {p['seed']}, sha256 {p['state_json_sha256']})"
        )


def load_teacher_state(path: str, store, cfg: DistillConfig, classes: list[int], device: torch.device) -> StateTeacher:
    """The state in ``path`` as the teacher of a student trained on the store classes ``classes``
    (the regime's training classes) of ``store``; refused, naming both, when it was fitted on
    another store, is a student, has no all-way head, or does not cover ``classes``."""
    who = f"--teacher-state {path}"
    directory = Path(path).expanduser()
    state = load_state(directory)
    if state.kind == "distill":
        raise ConfigError(
            f"{who} is a distilled student ({state.method}): an encoder, not a classifier of the classes. "
            f"Give an adapt or align state fitted on {store.path} (e.g. fskd adapt --store {store.path} "
            f"--method tip-adapter-f --shots 16 --out DIR)"
        )
    if state.store_fingerprint != store.fingerprint:
        raise StateError(
            f"{who} was fitted on store {state.store_path} (fingerprint {state.store_fingerprint}), not on "
            f"the distill store {store.path} (fingerprint {store.fingerprint}); its head reads the distill "
            f"store's features: fit the teacher on {store.path} (fskd adapt/align --store {store.path})"
        )
    names = store.class_names
    covered = list(range(store.num_classes))
    if state.config.get("base_to_new"):  # fitted on the base half's shots only: its head covers that half
        covered = [int(c) for c in (state.hparams.get("class_split") or {}).get("base", [])]
    missing = [c for c in classes if c not in set(covered)]
    if missing:
        raise ConfigError(
            f"{who} was fitted for base-to-new on the first half of the classes only ({len(covered)} of the {store.num_classes} classes of {store.path}); the "
            f"{cfg.regime} student trains on {len(classes)} classes, {len(missing)} of which the state never "
            f"learned ({', '.join(names[c] for c in missing[:5])}{', ...' if len(missing) > 5 else ''}). "
            f"Fit the teacher on every class (without --base-to-new)"
        )
    # the state's own view of the store (every row, the state's class split); the distill store keeps its own
    own = store.whole_store if isinstance(store, StoreView) else store
    try:
        head = AllwayHead(state, directory, own, device, classes=covered)
    except StateError as e:
        raise StateError(f"{who}: {e}") from None
    if head.class_names != [names[c] for c in covered]:
        raise StateError(
            f"{who}: the state's classes ({len(head.class_names)}) differ from those of {store.path} "
            f"({store.num_classes}); fit the teacher on {store.path} again"
        )
    pos = {c: i for i, c in enumerate(covered)}
    prov = {
        "path": str(directory.absolute()),
        "method": state.method,
        "kind": state.kind,
        "shots": head.shots,
        "seed": head.seed,
        "state_json_sha256": sha256_file(directory / STATE_JSON),
        "store_fingerprint": state.store_fingerprint,
        "classes": len(classes),
        "base_to_new": bool(state.config.get("base_to_new")),
    }
    return StateTeacher(head=head, columns=torch.tensor([pos[c] for c in classes], dtype=torch.int64), provenance=prov)


def _resume_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.distill-resume")


RESUME_JSON, RESUME_STEM, RESUME_LOG = "checkpoint.json", "checkpoint", "log.jsonl"


def _save_resume(resume_dir: Path, tree: dict) -> None:
    """The resume checkpoint as safetensors + JSON (never a pickle: a file planted there is data,
    not code), committed atomically by the manifest (``fskd.fsutil.write_bundle``)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"tree": to_tree(tree, "", tensors)}
    resume_dir.mkdir(parents=True, exist_ok=True)
    write_bundle(resume_dir, RESUME_JSON, RESUME_STEM, meta, tensors, point="resume")


def _load_resume(resume_dir: Path) -> dict | None:
    if not (resume_dir / RESUME_JSON).exists():
        return None
    try:
        meta, tensors = read_bundle(resume_dir, RESUME_JSON, what="distill resume checkpoint")
        return from_tree(meta["tree"], tensors)
    except (StateError, KeyError, TypeError, ValueError) as e:  # a damaged checkpoint: start over rather than fail
        log.warning("cannot use the resume checkpoint in %s (%s); starting from scratch", resume_dir, e)
        return None


def _config_key(cfg: DistillConfig) -> dict:
    d = cfg.to_dict()
    for k in ("out", "device", "force"):
        d.pop(k, None)
    return d


class MTKD(Method):
    """Teacher (store encoder + text-initialised few-shot head) -> timm student; semi or base-novel."""

    name = "mtkd"
    kind = "distill"
    options = MTKDOptions

    # -- fitting ------------------------------------------------------------------------------------
    def bound_to_shots(self, state: MethodState) -> bool:
        # a semi-regime student was trained on the labels of the state's own K shots of its seed
        return state.hparams.get("regime") == "semi"

    # -- what a student distiller built on this fit overrides (dho: fskd.methods.distill.dho) ------------
    def _terms(self, store, cfg: DistillConfig) -> tuple[str, ...]:
        """The enabled loss terms (``losses.TERMS``); the teacher head is fitted for ``prototype``
        (or when no --teacher-state gives the logits)."""
        terms = parse_losses(cfg.losses)
        if "image_text" in terms and store.text_embeddings() is None:
            if cfg.losses != "all":
                raise ConfigError(
                    f"--losses {cfg.losses}: 'image_text' needs class text features and {store.path} has none"
                )
            terms = tuple(t for t in terms if t != "image_text")
            log.info("store %s has no class text: image_text loss off", store.path)
        if cfg.options.get("proxy") == "label-free":  # only the terms that read the teacher's features
            learned = [t for t in terms if t not in LABEL_FREE]
            if learned and cfg.losses != "all":
                raise ConfigError(
                    f"--losses {cfg.losses} with proxy=label-free: {', '.join(learned)} learn(s) from the "
                    f"teacher's head, fitted on the labels; the label-free terms are {', '.join(LABEL_FREE)}"
                )
            terms = tuple(t for t in terms if t in LABEL_FREE)
            if not terms:
                raise ConfigError(
                    f"--losses {cfg.losses} with proxy=label-free leaves no loss term (label-free terms: "
                    f"{', '.join(LABEL_FREE)}); the student would learn nothing"
                )
        return terms

    def _plan(self, store, cfg: DistillConfig, opts, text_np: np.ndarray | None) -> _Plan:
        return (_plan_semi if cfg.regime == "semi" else _plan_base_novel)(store, cfg, opts, text_np)

    def _student(
        self, backbone, n_cls: int, store, terms, opts, plan: _Plan, teacher_head: TeacherHead | None
    ) -> tuple[torch.nn.Module, Callable]:
        """The student network and its loss: ``loss(train_net, x, tb)`` maps the (possibly DDP-wrapped)
        network, a batch of normalised views x (B, 3, R, R) and its TeacherBatch to the loss dict
        (``loss``, ``task_loss``, ``kd_loss``, ...)."""
        net = StudentNet(
            backbone,
            n_cls,
            store.dim,
            opts.proj_hidden,
            opts.classifier_scale,
            projected=any(t in PROJECTED for t in terms),
        )
        criterion = DistillLoss(
            terms,
            opts.weights(),
            opts.temperature,
            opts.tau_affinity,
            opts.tau_text,
            opts.tau_class,
            text_anchors=plan.text,
            class_anchors=None if teacher_head is None else teacher_head.weight,
        )

        def loss(train_net: torch.nn.Module, x: torch.Tensor, tb: TeacherBatch) -> dict[str, torch.Tensor]:
            with autocast(x.device):
                f, lg, pj = train_net(x)
            return criterion(f, lg, pj, tb)

        return net, loss

    def _shown(self, terms: tuple[str, ...]) -> tuple[str, ...]:
        """Loss-dict keys the progress bar shows beside loss, task_loss and kd_loss."""
        return terms

    def _batching(self, plan: _Plan, opts) -> tuple[int, int]:
        """(global batch size, optimiser steps per epoch)."""
        gbatch = max(2, min(opts.batch_size, plan.n_train))
        return gbatch, max(1, plan.n_train // gbatch)

    def _optimizer(self, net: torch.nn.Module, opts, steps: int, total: int):
        """(optimiser, per-step LambdaLR schedule): AdamW without decay on biases and norms, linear
        warm-up then cosine decay."""
        decay, no_decay = [], []
        for p in net.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opts.lr,
        )
        warm = max(1, int(opts.warmup_epochs * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
        )
        return opt, sched

    def _epoch_batches(
        self, plan: _Plan, cfg: DistillConfig, terms, epoch: int, steps: int, gbatch: int
    ) -> list[np.ndarray]:
        """The training rows of each step of ``epoch`` (global batches; each rank takes every
        world_size-th row)."""
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        labelled = np.flatnonzero(plan.labels >= 0)
        if terms or len(labelled) == plan.n_train:
            order = rng.permutation(np.arange(plan.n_train))
        else:  # labels alone: the same number of steps, drawn from the labelled rows only
            reps = math.ceil(steps * gbatch / max(1, len(labelled)))
            order = np.concatenate([rng.permutation(labelled) for _ in range(reps)])
        return [order[s * gbatch : (s + 1) * gbatch] for s in range(steps)]

    def _default_choice(self) -> dict:
        """The validated choices of the head when no validation chooses them."""
        return {"beta": 0.0}

    def fit(self, store, config: DistillConfig, progress: TrainProgress | None = None) -> MethodState:
        cfg = config
        opts = parse_options(self.options, cfg)
        terms = self._terms(store, cfg)
        spec = StudentSpec.parse(cfg.student)
        text_np = store.text_embeddings()
        device = resolve_device(cfg.device)
        dist = init_distributed(device)
        if dist.world_size > 1 and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        seed_everything(cfg.seed)
        t_start = time.perf_counter()

        # a bad student spec fails before any image is decoded
        backbone = build_student_backbone(spec.name, opts.image_size, opts.student_kwargs, spec.weights)
        plan = self._plan(store, cfg, opts, text_np)
        n_cls = len(plan.classes)

        # --teacher-state: a fitted all-way state's head gives the teacher logits
        given = None
        if cfg.teacher_state:
            if Path(cfg.teacher_state).expanduser().absolute() == Path(cfg.out or "").expanduser().absolute():
                raise ConfigError(f"--out {cfg.out} is the --teacher-state directory; write the student elsewhere")
            given = load_teacher_state(cfg.teacher_state, store, cfg, plan.classes, device)
            log.info("teacher: %s", given.describe())
        source = dataset_of(store, cfg.root)

        # the built-in teacher head: text-initialised cosine classifier, fine-tuned on the labelled
        # rows. With --teacher-state it is fitted only for the prototype loss (its weights are the
        # class anchors, in the embedded teacher space the student's projection targets)
        teacher_head = None
        if given is None or "prototype" in terms:
            hr = plan.head_rows
            e_head = _embed(_float(plan.teacher_x[torch.from_numpy(hr)]), plan.bridge, plan.mean)
            y_head = torch.from_numpy(plan.labels[hr])
            init = plan.text if plan.text is not None else class_means(e_head, y_head, n_cls)
            hv = None
            if plan.head_val is not None:
                hv = (_embed(plan.head_val[0], plan.bridge, plan.mean), torch.from_numpy(plan.head_val[1]))
            teacher_head = fit_teacher_head(
                e_head, y_head, init, hv, scale=opts.teacher_scale, max_steps=opts.teacher_steps, seed=cfg.seed
            )

        def teacher_logits(raw: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            """Teacher logits (n, C) of raw store-encoder features ``raw`` (embedded: ``emb``)."""
            return given.logits(raw) if given is not None else teacher_head.logits(emb)

        def teacher_batch(it: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Embedded teacher features and teacher logits of training rows ``it`` (computed per
            batch: nothing of size n_train x classes is ever held)."""
            raw = _float(plan.teacher_x[it])
            emb = _embed(raw, plan.bridge, plan.mean)
            return emb, teacher_logits(raw, emb)

        teacher_train_acc = None
        if cfg.regime == "base-novel":
            hits = sum(
                int(
                    (
                        teacher_batch(torch.arange(s, min(s + 65536, plan.n_train)))[1].argmax(1)
                        == torch.from_numpy(plan.labels[s : s + 65536])
                    ).sum()
                )
                for s in range(0, plan.n_train, 65536)
            )
            teacher_train_acc = hits / max(1, plan.n_train)

        # images, decoded once
        t0 = time.perf_counter()
        size = stored_size(opts.image_size)
        images = decode_images(source, plan.refs, size, opts.decode_threads, opts.image_cache)
        online = None
        big = None
        if cfg.online_teacher:
            online = OnlineTeacher(store.encoder_spec, device)
            big = decode_images(
                source, plan.refs[: plan.n_train], max(online.size, size), opts.decode_threads, opts.image_cache
            )
        decode_s = time.perf_counter() - t0

        net, loss_fn = self._student(backbone, n_cls, store, terms, opts, plan, teacher_head)
        net = net.to(device)
        mean_t, std_t = (torch.tensor(v) for v in model_norm(backbone))

        epochs = cfg.epochs or opts.epochs
        gbatch, steps = self._batching(plan, opts)
        if gbatch % dist.world_size:
            raise ConfigError(f"batch_size {gbatch} must be divisible by the {dist.world_size} torchrun processes")
        total = steps * epochs
        opt, sched = self._optimizer(net, opts, steps, total)
        shown = self._shown(terms)
        train_net = net
        if dist.world_size > 1:
            train_net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        use_cuda_amp = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp and not torch.cuda.is_bf16_supported())

        out = Path(cfg.out or str(Path("runs") / "distill" / f"{cfg.method}-{cfg.shots}shot"))
        resume_dir = _resume_dir(out)
        key = _config_key(cfg)
        if given is not None:  # the same DIR rewritten since: another teacher, no resuming
            key["teacher_state_sha256"] = given.provenance["state_json_sha256"]
        start_epoch, best, history = 0, {"epoch": 0, "score": -1.0, **self._default_choice(), "state": None}, []
        saved = _load_resume(resume_dir)
        if saved is not None:
            if saved.get("version") == RESUME_VERSION and saved.get("config") == key:
                net.load_state_dict(saved["net"])
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
                start_epoch, best, history = saved["epoch"], saved["best"], saved["log"]
                log.info("resuming %s from epoch %d (%s)", out, start_epoch, resume_dir)
            else:
                log.warning("the resume checkpoint in %s belongs to another config; starting from scratch", resume_dir)

        labelled = np.flatnonzero(plan.labels >= 0)
        imgs_seen, train_s = 0, 0.0
        for epoch in range(start_epoch, epochs):
            t_ep = time.perf_counter()
            batches = self._epoch_batches(plan, cfg, terms, epoch, steps, gbatch)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 16 + dist.rank)
            train_net.train()
            sums: dict[str, float] = {}
            for step, rows in enumerate(batches):
                idx = rows[dist.rank :: dist.world_size]
                it = torch.from_numpy(idx)
                boxes, flips = random_boxes(len(idx), gen, opts.crop_scale)
                views = crop_views(images[it], boxes, flips, opts.image_size)
                x = normalize_images(views, mean_t, std_t).to(device, non_blocking=True)
                if online is not None:
                    raw = online(crop_views(big[it], boxes, flips, online.size))
                    emb = _embed(raw, plan.bridge, plan.mean)
                    tlog = teacher_logits(raw, emb)
                else:
                    emb, tlog = (t.to(device) for t in teacher_batch(it))
                tb = TeacherBatch(embedded=emb, logits=tlog, labels=torch.from_numpy(plan.labels[idx]).to(device))
                losses = loss_fn(train_net, x, tb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                vals = {k: float(v.detach()) for k, v in losses.items()}
                if not math.isfinite(vals["loss"]):
                    raise FloatingPointError(
                        f"distill loss became {vals['loss']} at epoch {epoch + 1} step {step + 1}; "
                        f"lower the learning rate (--set lr=...)"
                    )
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                imgs_seen += len(idx) * dist.world_size
                if progress is not None and dist.is_main:
                    progress(
                        "distill",
                        epoch * steps + step + 1,
                        total,
                        {
                            "epoch": epoch + 1,
                            **{k: vals[k] for k in ("loss", "task_loss", "kd_loss")},
                            **{t: vals[t] for t in shown},
                        },
                    )
            ep_s = time.perf_counter() - t_ep
            train_s += ep_s
            entry = {
                "epoch": epoch + 1,
                **{k: round(v / steps, 5) for k, v in sums.items()},
                "lr": sched.get_last_lr()[0],
                "seconds": round(ep_s, 2),
                "images_per_s": round(sum(len(r) for r in batches) / max(ep_s, 1e-9), 1),
            }
            if plan.val_kind != "none" and ((epoch + 1) % opts.val_every == 0 or epoch + 1 == epochs):
                score, choice = self._validate(net, images, plan, opts, device, mean_t, std_t)
                entry.update({"val_accuracy": round(100 * score, 3), **choice})
                if score > best["score"]:
                    best = {"epoch": epoch + 1, "score": score, **choice, "state": _cpu_state(net)}
            elif plan.val_kind == "none":
                best = {"epoch": epoch + 1, "score": -1.0, **self._default_choice(), "state": _cpu_state(net)}
            history.append(entry)
            log.info("distill epoch %d/%d: %s", epoch + 1, epochs, entry)
            if dist.is_main:
                _save_resume(
                    resume_dir,
                    {
                        "version": RESUME_VERSION,
                        "config": key,
                        "epoch": epoch + 1,
                        "net": net.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "best": best,
                        "log": history,
                    },
                )
                with open(resume_dir / RESUME_LOG, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            barrier()

        if best["state"] is None:  # resumed after the last epoch (nothing left to train)
            best = {**best, "state": _cpu_state(net)}
        state = self._state(
            store,
            cfg,
            opts,
            spec,
            terms,
            plan,
            net,
            best,
            teacher_head,
            given,
            history,
            {
                "decode_seconds": round(decode_s, 2),
                "train_seconds": round(train_s, 2),
                "seconds": round(time.perf_counter() - t_start, 2),
                "train_images_per_s": round(imgs_seen / max(train_s, 1e-9), 1),
                "teacher_val_accuracy": _teacher_val_accuracy(plan, teacher_head, given),
                "teacher_train_accuracy": None if teacher_train_acc is None else round(100 * teacher_train_acc, 3),
                "world_size": dist.world_size,
                "online_teacher": bool(cfg.online_teacher),
                "rows": {"train": plan.n_train, "labelled": int(len(labelled)), "decoded": len(plan.refs)},
            },
        )
        if dist.is_main:
            # write DIR ourselves (atomically) before dropping the resume checkpoint, so a kill in
            # between never loses the run; fskd.api then saves the same state again
            save_state(out, state)
            remove_bundle(resume_dir, RESUME_JSON, RESUME_STEM, extra=(RESUME_LOG,))
        barrier()
        return state

    @torch.no_grad()
    def _validate(
        self,
        net: StudentNet,
        images: torch.Tensor,
        plan: _Plan,
        opts: MTKDOptions,
        device,
        mean_t: torch.Tensor,
        std_t: torch.Tensor,
    ) -> tuple[float, dict]:
        """Validation accuracy (fraction) and the head's choices ({"beta": ...}), on centre views."""
        net.eval()
        rows = np.concatenate(
            [plan.center_rows, plan.val_query] + ([plan.val_support] if plan.val_kind == "split" else [])
        )
        feats = _features(net.backbone, images, rows, opts.image_size, device, mean_t, std_t)
        nc, nq = len(plan.center_rows), len(plan.val_query)
        center = feats[:nc].mean(0)
        q = feats[nc : nc + nq]
        if plan.val_kind == "episodes":
            return episode_accuracy(q, plan.episodes, center), {"beta": 0.0}
        sup = feats[nc + nq :]
        y_sup = torch.from_numpy(plan.labels[plan.val_support]).to(device)
        protos = class_means(F.normalize(sup - center, dim=-1), y_sup, len(plan.classes))
        qn = F.normalize(q - center, dim=-1)
        proto_s = qn @ protos.T
        cls_s = F.normalize(q, dim=-1) @ F.normalize(net.classifier, dim=-1).T
        y = torch.from_numpy(plan.val_labels).to(device)
        best, best_beta = -1.0, 0.0
        for beta in opts.beta_grid:
            a = float(((proto_s + beta * cls_s).argmax(1) == y).float().mean())
            if a > best:
                best, best_beta = a, float(beta)
        return best, {"beta": best_beta}

    def _state(
        self,
        store,
        cfg,
        opts,
        spec,
        terms,
        plan,
        net,
        best,
        teacher_head: TeacherHead | None,
        given: StateTeacher | None,
        history,
        extra,
    ) -> MethodState:
        st = best["state"]
        student = {STUDENT_PREFIX + k[len("backbone.") :]: v for k, v in st.items() if k.startswith("backbone.")}
        head_tensors, head_hparams, head_selected = self._head_state(st, cfg, opts, terms, best, plan.selected_on)
        tensors = {**student, **head_tensors}
        tensors["train_classes"] = torch.tensor(plan.classes, dtype=torch.int64)
        if teacher_head is not None:
            tensors["teacher.weight"] = teacher_head.weight
        if plan.bridge is not None:
            tensors.update(plan.bridge.tensors("bridge."))
        text_dim = store.attrs.get("text", {}).get("dim") if store.text_embeddings() is not None else None
        sel = plan.selected_on
        hparams = {
            "student": spec.name,
            "student_init": spec.weights or "random",
            "image_size": opts.image_size,
            "student_kwargs": dict(opts.student_kwargs),
            "student_id": tensor_digest({k[len(STUDENT_PREFIX) :]: v for k, v in student.items()}),
            "teacher_text_dim": text_dim,
            "teacher": store.encoder_spec,
            "regime": cfg.regime,
            **head_hparams,
            "epochs": cfg.epochs or opts.epochs,
            "best_epoch": best["epoch"],
            "teacher_head_steps": None if teacher_head is None else teacher_head.steps,
            "bridge_ridge": None if plan.bridge is None else plan.bridge.ridge,
            "shots": cfg.shots,
            "dataset_fingerprint": store.attrs["dataset"].get("fingerprint"),
            "class_split": {k: v for k, v in store.attrs["class_split"].items() if k != "source"},
        }
        selected = {
            "best_epoch": sel,
            **head_selected,
            "teacher_head_steps": ("val split" if plan.head_val is not None else "fixed")
            if teacher_head is not None
            else "not fitted (--teacher-state gives the teacher logits; prototype loss off)",
            "bridge_ridge": ("val split" if cfg.regime == "semi" else "val classes")
            if plan.bridge is not None
            else "none",
        }
        if given is not None:
            hparams["teacher"] = given.describe()
            hparams["teacher_state"] = dict(given.provenance)
            hparams["class_anchors"] = (
                "the built-in teacher head's weights (the state's head has no class weights in "
                "the embedded teacher space)"
                if "prototype" in terms
                else None
            )
            selected["teacher"] = "given (--teacher-state)"
            selected["teacher_state"] = "given (--teacher-state)"
            selected["class_anchors"] = (
                "fixed (the built-in head, fitted for the prototype loss only)"
                if "prototype" in terms
                else "fixed (prototype loss off)"
            )
        metrics = {
            "val_accuracy": None if best["score"] < 0 else round(100 * best["score"], 3),
            **extra,
            "log": history,
        }
        return MethodState.of(
            self.name, self.kind, store, cfg, hparams=hparams, selected_on=selected, metrics=metrics, tensors=tensors
        )

    def _head_state(
        self, st: dict[str, torch.Tensor], cfg: DistillConfig, opts, terms, best: dict, sel: str
    ) -> tuple[dict, dict, dict]:
        """The head's tensors (from the best epoch's network state ``st``), hyper-parameters and the
        split that chose each (``sel``: the plan's validation)."""
        tensors = {
            "classifier": st["classifier"],
            **{f"proj.{k[len('proj.') :]}": v for k, v in st.items() if k.startswith("proj.")},
        }
        hparams = {
            "losses": list(terms),
            "weights": {t: getattr(opts, f"w_{t}") for t in ("task",) + tuple(terms)},
            "beta": best["beta"],
        }
        selected = {
            "beta": sel if cfg.regime == "semi" else "fixed (0: no classifier for novel classes)",
            "loss weights and temperatures": "defaults chosen on cub35 validation (README)",
        }
        return tensors, hparams, selected

    # -- evaluation ---------------------------------------------------------------------------------
    def check_store(self, state: MethodState, store, directory) -> None:
        """A distill state is evaluated on a store extracted *with its student*."""
        enc = store.attrs.get("encoder", {})
        sid = enc.get("preprocess", {}).get("student_id")
        hp = state.hparams
        ds = store.attrs.get("dataset", {})
        cmd = (
            f"fskd extract {ds.get('name') or 'DATASET'} --root {ds.get('root') or 'DATASET_ROOT'} "
            f"--encoder student:{directory} --store STUDENT_STORE.zarr, then fskd eval --store STUDENT_STORE.zarr "
            f"--state {directory}"
        )
        if not str(enc.get("spec", "")).startswith("student:") or sid is None:
            raise StateError(
                f"state {directory} is a distilled student ({hp.get('student')}); it is evaluated on a store "
                f"extracted with that student, not on {store.path} (encoder {enc.get('spec')!r}): {cmd}"
            )
        if sid != hp.get("student_id"):
            raise StateError(
                f"{store.path} was extracted with another student (id {sid}) than the one in {directory} "
                f"(id {hp.get('student_id')}; retrained since?). Extract again into a new --store path (fskd extract "
                f"refuses to reuse {store.path}: its weights differ): {cmd}"
            )
        ds_fp = store.attrs.get("dataset", {}).get("fingerprint")
        cs = {k: v for k, v in store.attrs.get("class_split", {}).items() if k != "source"}
        if ds_fp != hp.get("dataset_fingerprint") or cs != hp.get("class_split"):
            raise StateError(
                f"{store.path} lists other images or another class split than the teacher store "
                f"{state.store_path}; extract the same dataset with the same split options: {cmd}"
            )

    def head(self, state: MethodState, store, device: torch.device) -> Head:
        if state.hparams.get("regime") == "semi" and store.has_split("train"):
            center = store.mean(None, ["train"])
        else:
            center = store.mean(store.class_split("base"))
        beta = float(state.hparams.get("beta", 0.0))
        weights = state.tensors["classifier"].to(device) if beta > 0 else None
        return DistillHead(
            torch.from_numpy(center).to(device),
            weights,
            state.tensors["train_classes"].to(device),
            beta,
            store.num_classes,
        )


def _teacher_val_accuracy(plan: _Plan, teacher_head: TeacherHead | None, given: StateTeacher | None) -> float | None:
    """The teacher's accuracy (%) on the held-out labelled rows over the training classes: the
    --teacher-state head when given, else the built-in head (None without held-out rows)."""
    if given is None:
        return (
            None
            if teacher_head is None or teacher_head.val_accuracy is None
            else round(100 * teacher_head.val_accuracy, 3)
        )
    if plan.head_val is None or not len(plan.head_val[1]):
        return None
    pred = given.logits(plan.head_val[0]).argmax(1).cpu().numpy()
    return round(100 * float((pred == plan.head_val[1]).mean()), 3)


def _cpu_state(net: StudentNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def _features(
    backbone, images: torch.Tensor, rows: np.ndarray, image_size: int, device, mean_t, std_t, batch: int = 256
) -> torch.Tensor:
    """Student features (n, D_s) of the centre views of ``images[rows]`` (eval mode)."""
    out = []
    for s in range(0, len(rows), batch):
        x = normalize_images(center_view(images[torch.from_numpy(rows[s : s + batch])], image_size), mean_t, std_t)
        with autocast(device):
            out.append(backbone(x.to(device)).float())
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


class FittedDistill(FittedHead):
    def __init__(self, protos: torch.Tensor, weights: torch.Tensor | None, center: torch.Tensor, beta: float) -> None:
        self.protos, self.weights, self.center, self.beta = protos, weights, center, beta

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        s = torch.bmm(F.normalize(query - self.center, dim=-1), self.protos.transpose(1, 2))
        if self.weights is not None:
            s = s + self.beta * torch.bmm(F.normalize(query, dim=-1), self.weights.transpose(1, 2))
        return s


class DistillHead(Head):
    """Nearest centred prototype of the student's features, plus beta * the student's own
    classifier weight for the classes it was trained on (semi regime; beta chosen on val).

    center (D,) the mean student feature over its training rows; weights (C_train, D) or None;
    train_classes (C_train,) store class indices of the weights' rows.
    """

    name = "distill"

    def __init__(
        self,
        center: torch.Tensor,
        weights: torch.Tensor | None,
        train_classes: torch.Tensor,
        beta: float,
        n_classes: int,
    ) -> None:
        self.center, self.beta = center, beta
        self.table = None
        if weights is not None:
            table = torch.zeros(max(n_classes, int(train_classes.max()) + 1), weights.shape[1], device=weights.device)
            table[train_classes] = F.normalize(weights.float(), dim=-1)
            self.table = table  # zero rows for classes the student never learned

    def fit(self, support: torch.Tensor, classes: torch.Tensor) -> FittedDistill:
        protos = F.normalize(F.normalize(support - self.center, dim=-1).mean(2), dim=-1)  # (E, N, D)
        w = self.table[classes.long()] if self.table is not None else None
        return FittedDistill(protos, w, self.center, self.beta)


METHODS.register("mtkd", MTKD)
