"""A fitted state's all-way head over every class of its store, fitted as ``fskd eval --state DIR
--protocol allway`` fits it for the state's own seed: the state's K shots per class of the store's
train split (``sample_shots`` with the state's seed), every class of the store.

One loading for every user of a state's all-way head: :class:`fskd.deploy.classifier.Classifier`
(``fskd predict``, ``fskd export``) and ``fskd distill --teacher-state`` (the head's logits are the
soft targets of the distillation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fskd.errors import EvaluationError, FskdError, StateError
from fskd.methods import METHODS
from fskd.methods.base import MethodState
from fskd.store.sampling import sample_shots

#: what a head's arithmetic raises when the state's tensors or hyper-parameters do not fit its store
MISFIT = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)


def _strip(split: dict) -> dict:
    return {k: sorted(v) for k, v in split.items() if k != "source"}


class AllwayHead:
    """The all-way head of ``state`` (read from ``state_dir``) over every class of ``store``.

    ``store`` (a store or a view of one) is checked against the state (the method's
    ``check_store``: the fingerprint); the head reads a view of it with the class split the state
    was fitted with when it differs (``self.store``; ``store`` itself is not changed).
    ``logits(features)`` maps raw store-encoder features (n, D) to class scores (n, C) in the
    order of ``store.class_names``
    (``classes``: the head fitted over those store classes only, its scores in that order; a
    base-to-new state covers its base half only).
    """

    def __init__(
        self,
        state: MethodState,
        state_dir: str | Path,
        store,
        device: torch.device,
        classes: Sequence[int] | None = None,
    ) -> None:
        self.state, self.state_dir, self.store, self.device = state, str(state_dir), store, device
        self.method = METHODS.get(state.method)()
        self.method.check_store(state, store, state_dir)  # moved and changed: the fingerprint says which
        fitted_split = state.hparams.get("class_split") or None
        if fitted_split and _strip(store.attrs["class_split"]) != _strip(fitted_split):
            # a read-only view with the state's split: the caller's store is not changed
            self.store = store = store.view(
                class_split={**fitted_split, "source": f"the class split state {state_dir} was fitted with"}
            )
        self.shots, self.seed = int(state.config.get("shots", 0)), int(state.config.get("seed", 1))
        self.classes = np.arange(store.num_classes) if classes is None else np.asarray(classes, np.int64)
        self.class_names: list[str] = [store.class_names[int(c)] for c in self.classes]
        self.head, self.fitted = self._fit()

    def _fit(self):
        """The method's head, fitted on the state's K shots per class (its seed) of its classes."""
        st, store, classes = self.state, self.store, self.classes
        try:
            head = self.method.head(st, store, self.device)
            if self.shots:
                if not store.has_split("train"):
                    raise StateError(
                        f"state {self.state_dir} learned from {self.shots} shots per class of the train "
                        f"split; {store.path} has no train split (it has {store.splits})"
                    )
                valid = store.valid_rows("train")
                rows = sample_shots(store.labels("train")[valid], classes, self.shots, self.seed, self.class_names)
                support = torch.from_numpy(store.take("train", valid[rows.reshape(-1)])).to(self.device)
            else:
                support = torch.zeros(0, store.dim, device=self.device)
            support = head.prepare(support)
            support = support.reshape(1, len(classes), self.shots, support.shape[-1])
            fitted = head.fit(support, torch.as_tensor(classes, device=self.device)[None])
        except FskdError as e:
            if isinstance(e, EvaluationError):  # the method's own words: an episodic-only state, ...
                raise StateError(
                    f"state {self.state_dir} ({st.method}) has no all-way head to predict with: {e}. Fit an all-way "
                    f"state (fskd {st.kind} --method {st.method} --shots K; a method with regimes: --set "
                    f"regime=allway or regime=both)"
                ) from None
            raise
        except MISFIT as e:
            what = " ".join(str(e).split())[:200]
            raise StateError(
                f"state {self.state_dir} does not fit the store {store.path} ({type(e).__name__}: "
                f"{what}): damaged, edited, or written by another fskd; fit it again"
            ) from None
        return head, fitted

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Raw store-encoder features (n, D) -> class scores (n, C), in the order of ``classes``."""
        x = features.to(self.device, torch.float32)
        return self.fitted.logits(self.head.prepare(x)[None])[0].float()
