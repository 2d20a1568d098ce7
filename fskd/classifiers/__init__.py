"""Classifier heads (stateless, batched over episodes). Each head is declared here (name,
module, description); its module loads on first use, so listing heads imports no torch."""

from __future__ import annotations

from fskd.registry import Registry, exports_from

#: name -> factory(ClassContext) -> Head
CLASSIFIERS: Registry = Registry("classifier")

CLASSIFIERS.lazy(
    "linear",
    "fskd.classifiers.linear",
    help="logistic regression on the support (prototype init, L2 to init), batched over episodes",
)
CLASSIFIERS.lazy(
    "prototype",
    "fskd.classifiers.prototype",
    help="easyfsl's SimpleShot: base-mean centring, L2, cosine to the renormalised class mean; FAISS for large banks",
)
CLASSIFIERS.lazy(
    "simpleshot",
    "fskd.classifiers.prototype",
    help="the SimpleShot authors' rule: base-mean centring, L2 (CL2N), Euclidean distance to the "
    "un-renormalised class mean; FAISS for large banks",
)
CLASSIFIERS.lazy(
    "text",
    "fskd.classifiers.text",
    help="zero-shot: class text features as weights (joint encoders, or through a bridge)",
)
CLASSIFIERS.lazy(
    "tip",
    "fskd.classifiers.cache",
    help="Tip-Adapter cache model (training-free, alpha 1, beta 5.5; joint encoders); FAISS for large banks",
)

_FROM_BASE = ("ClassContext", "FittedHead", "Head")


__getattr__ = exports_from(__name__, "fskd.classifiers.base", _FROM_BASE)  # the interface loads on first use

__all__ = ["CLASSIFIERS", *_FROM_BASE]
