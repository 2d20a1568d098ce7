"""Methods that learn from the store: ``distill/``, ``adapt/``, ``align/`` (one file per method).

Each method is declared here (name, module, kind, description); its module loads on first use,
so listing methods (CLI choices, ``fskd methods``) imports no torch, timm or torchvision.
"""

from __future__ import annotations

from fskd.registry import Registry, exports_from

#: name -> Method subclass
METHODS: Registry = Registry("method")

METHODS.lazy(
    "prototype",
    "fskd.methods.adapt.prototype",
    kind="adapt",
    help="SimpleShot nearest class mean (base-mean centring, L2; --set rule=simpleshot: the authors' Euclidean rule): the baseline",
)
METHODS.lazy(
    "zero-shot",
    "fskd.methods.adapt.zero_shot",
    kind="adapt",
    help="class text features as weights (through the bridge when image and text spaces differ)",
)
METHODS.lazy(
    "linear-probe",
    "fskd.methods.adapt.linear_probe",
    kind="adapt",
    help="the linear probe as published: CoOp's lpclip all-way (L-BFGS logistic regression, C searched on "
    "val), RFS's per episode (C = 1); --set recipe=tuned: fskd's probe: prototype init, Adam, weight "
    "decay and steps chosen on validation (batched)",
)
METHODS.lazy(
    "lp++",
    "fskd.methods.adapt.lp_pp",
    kind="adapt",
    help="LP++ as published: probe + class-wise text blend, SGD at Lipschitz step sizes, early stopping on "
    "val; --set recipe=tuned: fskd's variant: centred features, Adam, alpha0 / decay / steps searched "
    "on validation",
)
METHODS.lazy(
    "gda",
    "fskd.methods.adapt.gda",
    kind="adapt",
    help="GDA (Wang et al., ICLR 2024): shared-covariance Gaussians on the shots (the authors' shrunk "
    "precision) + zero-shot logits, blend alpha on validation",
)
METHODS.lazy(
    "zs-lp",
    "fskd.methods.adapt.clap",
    kind="adapt",
    help="ZS-LP: linear probe started at the zero-shot text weights (CLAP authors' recipe; no validation data)",
)
METHODS.lazy(
    "clap",
    "fskd.methods.adapt.clap",
    kind="adapt",
    help="CLAP (Silva-Rodriguez et al., CVPR 2024): ZS-LP + class-adaptive l2 pull to the text weights "
    "(no validation data)",
)
METHODS.lazy(
    "taskres",
    "fskd.methods.adapt.taskres",
    kind="adapt",
    help="TaskRes (Yu et al., CVPR 2023): text weights + a learned task residual, the authors' Adam recipe "
    "(needs text; no validation data unless alpha is a list)",
)
METHODS.lazy(
    "cross-modal-lp",
    "fskd.methods.adapt.cross_modal_lp",
    kind="adapt",
    help="cross-modal linear probe (Lin et al., CVPR 2023): class text as extra samples, text init, the "
    "authors' lr / decay / batch / steps search on validation (needs text)",
)
METHODS.lazy(
    "proker",
    "fskd.methods.adapt.proker",
    kind="adapt",
    help="ProKeR (Bendou et al., CVPR 2025): zero-shot logits + RBF kernel ridge regression of their "
    "residual on the shots, closed form (beta, lambda on validation)",
)
METHODS.lazy(
    "ape",
    "fskd.methods.adapt.ape",
    kind="adapt",
    help="APE (Zhu et al., ICCV 2023): Tip-Adapter cache in refined channels, keys reweighted by the "
    "text (beta, alpha, gamma on validation)",
)
METHODS.lazy(
    "ape-t",
    "fskd.methods.adapt.ape_t",
    kind="adapt",
    help="APE-T (Zhu et al., ICCV 2023): APE's trained form: a class residual on the refined channels of "
    "text and cache keys + per-key value weights (AdamW), then beta, alpha on validation",
)
METHODS.lazy(
    "tip-adapter",
    "fskd.methods.adapt.tip_adapter",
    kind="adapt",
    help="Tip-Adapter: training-free cache of the shots + text weights (alpha, beta on validation)",
)
METHODS.lazy(
    "tip-adapter-f",
    "fskd.methods.adapt.tip_adapter_f",
    kind="adapt",
    help="Tip-Adapter-F: cache keys fine-tuned on the shots (steps, alpha on validation)",
)
METHODS.lazy(
    "coop",
    "fskd.methods.adapt.coop",
    kind="adapt",
    help="CoOp: 16 learned context vectors in the class prompts of the frozen text tower (image features "
    "from the store)",
)
METHODS.lazy(
    "kgcoop",
    "fskd.methods.adapt.coop",
    kind="adapt",
    help="KgCoOp: CoOp kept near the hand-crafted prompts' text features (lam 8, 'a photo of a' init)",
)
METHODS.lazy(
    "clip-adapter",
    "fskd.methods.adapt.clip_adapter",
    kind="adapt",
    help="CLIP-Adapter (Gao et al., IJCV 2024): a residual bottleneck MLP on the image features, frozen text "
    "weights, the authors' ratio 0.2 and CoOp's SGD recipe (no validation data unless ratio is a list)",
)
METHODS.lazy(
    "residual-adapter",
    "fskd.methods.adapt.residual_adapter",
    kind="adapt",
    help="MTKD stage 2: a CLIP-Adapter-style residual MLP on frozen features (ratio, steps on validation); exposes features",
)
METHODS.lazy(
    "syntrans",
    "fskd.methods.adapt.syntrans",
    kind="adapt",
    help="SynTrans: visual weight generator + semantic reconstructor + bridge, meta-trained on base classes",
)
METHODS.lazy(
    "fma",
    "fskd.methods.align.fma",
    kind="align",
    help="Flow Matching Alignment as published: 12-block adaLN velocity field, 200 epochs, Euler steps of 0.1 "
    "toward class text (stop chosen on validation); --set recipe=lite: fskd's fast variant: 2-block "
    "MLP in 256 principal directions, 600 steps, solver/steps/prototype weight on validation",
)
METHODS.lazy(
    "mtkd",
    "fskd.methods.distill.mtkd",
    kind="distill",
    help="teacher -> student distillation: MTKD stage 1 (semi) / SynTrans proxy (base-novel); logit, "
    "feature, affinity, TinyCLIP image-text and prototype losses",
)
METHODS.lazy(
    "dho",
    "fskd.methods.distill.dho",
    kind="distill",
    help="DHO (Kang et al., 2025): dual-head student, a CE head on the shots and a KD head on the teacher, "
    "mixed predictions (alpha, beta on validation); semi regime",
)


def kind_of(name: str) -> str:
    """A method's kind ("adapt", "align", "distill") without importing it."""
    kind = METHODS.meta(name, "kind")
    return kind if kind is not None else METHODS.get(name).kind


def methods_of_kind(kind: str) -> list[str]:
    return [n for n in METHODS.names() if kind_of(n) == kind]


_FROM_BASE = ("Method", "MethodState", "load_state", "save_state")


__getattr__ = exports_from(__name__, "fskd.methods.base", _FROM_BASE)  # the interface loads on first use

__all__ = ["METHODS", "kind_of", "methods_of_kind", *_FROM_BASE]
