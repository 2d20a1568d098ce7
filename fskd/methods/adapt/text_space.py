"""Class text in image space for the text-using adapt methods: the class text features (or
``--descriptions``), the bridge of each regime (episodic: learned on the base classes; all-way:
from the call's support, leave-one-class-out) and the :class:`TextSpace` a head scores in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fskd.errors import ConfigError, EncoderError, FskdError, StoreError
from fskd.methods.adapt import validation  # allway_val_task through the module: tests replace it there
from fskd.methods.adapt.regimes import ALLWAY, EPISODIC, centred, support_center
from fskd.methods.adapt.validation import NO_VALIDATION, VAL_CLASSES, Choice, grid_search, hp, no_validation
from fskd.methods.base import MethodState
from fskd.methods.bridge import RIDGE_GRID, Bridge, batched_text_to_image
from fskd.store import sampling


# -- class text -----------------------------------------------------------------------------------
def reject_descriptions(config, method: str) -> None:
    """Methods that use no class semantics refuse ``--descriptions`` rather than ignore it."""
    if config.descriptions:
        raise ConfigError(
            f"method {method!r} uses no class text: --descriptions {config.descriptions} would be ignored; "
            f"methods that use it: zero-shot, lp++, tip-adapter, tip-adapter-f, syntrans"
        )


def class_text(store, config, method: str) -> tuple[torch.Tensor, str]:
    """(C, d_t) L2-normalised class text features and where they came from.

    ``--descriptions FILE`` re-encodes every class (the store's prompt templates filled with the
    name, plus the class's descriptions) with the store's own text encoder, rebuilt from its
    spec; otherwise the store's class text features are used.
    """
    descriptions = config.descriptions
    if descriptions:
        from fskd.encoders import build_encoder
        from fskd.encoders.prompts import (
            DEFAULT_TEMPLATES,
            class_prompts,
            encode_class_texts,
            load_descriptions,
        )

        desc = load_descriptions(descriptions, store.class_keys, store.class_names)
        try:
            encoder = build_encoder(store.encoder_spec)
        except FskdError as e:  # unknown family (arrays, synthetic), missing weights, ...
            raise EncoderError(
                f"--descriptions needs the store's text encoder {store.encoder_spec!r} to encode them: {e}"
            ) from None
        if not encoder.has_text:
            raise EncoderError(f"--descriptions: the store's encoder {store.encoder_spec!r} has no text tower")
        templates = tuple(store.attrs.get("text", {}).get("templates") or DEFAULT_TEMPLATES)
        text = encode_class_texts(encoder, class_prompts(store.class_names, templates, desc))
        n = sum(len(d) for d in desc)
        return F.normalize(text.float(), dim=-1), f"templates + {n} descriptions from {Path(descriptions).name}"
    return F.normalize(store_text(store, method), dim=-1), "store class text features"


def store_text(store, method: str) -> torch.Tensor:
    """(C, d_t) the store's class text features as stored (float32), or a StoreError naming the
    store, its encoder and the encoders that have a text tower."""
    text = store.text_embeddings()
    if text is None:
        raise StoreError(
            f"method {method!r} needs class text features, but {store.path} has none (encoder {store.encoder_spec!r} has "
            f"no text tower); extract with an encoder that has one (lite0-minilm, an open_clip model) or use prototype, "
            f"linear-probe or residual-adapter"
        )
    return torch.from_numpy(np.asarray(text, dtype=np.float32))


# -- text weights in image space (the bridge) -----------------------------------------------------
@dataclass
class TextSpace:
    """Everything a text-using head needs for one call: class weights in image space
    (E, N, D), the query embedding, and the embedded support (E, N, K, D)."""

    weights: torch.Tensor
    embed: Callable[[torch.Tensor], torch.Tensor]
    support: torch.Tensor


def episodic_text_space(bridge: Bridge, text: torch.Tensor, support: torch.Tensor, classes: torch.Tensor) -> TextSpace:
    w = bridge.text_to_image(text.to(support.device))[classes]
    return TextSpace(w, bridge.embed_images, bridge.embed_images(support))


def support_text_space(
    support: torch.Tensor, classes: torch.Tensor, text: torch.Tensor, joint: bool, ridge: float | None
) -> TextSpace:
    """Text weights learned from the support alone: the identity for a joint store, else a
    bridge fitted on the support (centred on its mean) with the chosen ridge, leave-one-class-out
    (each class's text weight comes from a bridge that never saw that class's images)."""
    text = text.to(support.device)
    if joint:
        embed = centred(None)
        return TextSpace(text[classes], embed, embed(support))
    E, N, K, D = support.shape
    if K < 1:
        from fskd.errors import EvaluationError

        raise EvaluationError(
            "image and text spaces differ and the call includes classes the bridge was learned on: "
            "the bridge is then learned from the support, which needs at least 1 shot per class"
        )
    embed = centred(support_center(support))
    es = embed(support)
    return TextSpace(batched_text_to_image(es, text[classes], float(ridge), leave_out=True), embed, es)


def regime_text_space(
    state: MethodState,
    store,
    regime: str,
    support: torch.Tensor,
    classes: torch.Tensor,
    bridge: Bridge,
    text: torch.Tensor,
) -> TextSpace:
    """A head's text space: the episodic bridge, or (all-way) a leave-one-class-out bridge from the
    support at the state's all-way ridge."""
    if regime == EPISODIC:
        return episodic_text_space(bridge, text, support, classes)
    return support_text_space(support, classes, text, store.joint, hp(state, ALLWAY, "ridge"))


def state_text(state: MethodState, device: torch.device) -> tuple[torch.Tensor, Bridge]:
    """A text state's class text and episodic bridge on ``device`` (what :func:`text_fit` kept)."""
    text = state.tensors["text"].to(device)
    return text, Bridge.from_tensors({k: v.to(device) for k, v in state.tensors.items()})


def fit_episodic_bridge(
    store,
    text: torch.Tensor,
    ridge: float | None,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_val: bool = True,
) -> tuple[Bridge, Choice]:
    """The identity for a joint store; else ridge maps learned on every row of the base classes,
    the ridge strength chosen by zero-shot accuracy on the val classes (or fixed by ``ridge``, or
    the middle of the grid when ``use_val`` is False: ``--hp-selection none``)."""
    if store.joint:
        return Bridge.identity(store.dim, device), Choice(
            {"ridge": None}, None, "fixed (joint space: identity bridge)", ""
        )
    base = store.class_split("base")
    if not base:
        raise StoreError(
            f"{store.path}: the bridge between its image and text spaces is learned on the base classes, "
            f"but the base class split is empty"
        )
    tf = transform or (lambda t: t)
    x, y = store.gather(base, max_per_class=sampling.CLASS_ROWS)
    val = store.class_split("val")
    v = None
    if len(val) >= 2 and ridge is None and use_val:
        xv, yv = store.gather(val, max_per_class=sampling.CLASS_ROWS)
        v = (tf(torch.from_numpy(xv).to(device)), torch.from_numpy(yv).to(device))
    if ridge is not None:
        lam, on = float(ridge), "fixed (--set option)"
    elif v is None:
        lam, on = RIDGE_GRID[len(RIDGE_GRID) // 2], "default (no val classes)" if use_val else NO_VALIDATION
    else:
        lam, on = None, VAL_CLASSES
    br = Bridge.fit(
        tf(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device), text.to(device), ridge=lam, val=v
    )
    desc = f"bridge ridge by zero-shot accuracy on the {len(val)} val classes" if on == VAL_CLASSES else ""
    return br, Choice({"ridge": br.ridge}, None, on, desc)


def choose_allway_ridge(
    store,
    text: torch.Tensor,
    config,
    ridge: float | None,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    joint: bool | None = None,
) -> Choice:
    """The ridge strength of the support-fitted, leave-one-class-out bridge (all-way regime):
    fixed, or chosen by the zero-shot accuracy of its text weights on the val split, the bridge
    fitted on K shots per class of the train split (through ``transform``). ``joint``: whether
    image and text share one space (default: the store's word; fma's base features may not)."""
    if store.joint if joint is None else joint:
        return Choice({"ridge": None}, None, "fixed (joint space: identity bridge)", "")
    if ridge is not None:
        return Choice({"ridge": float(ridge)}, None, "fixed (--set option)", "")
    task = validation.allway_val_task(store, config, device, transform) if config.shots > 0 else None
    if task is None:
        return Choice(
            {"ridge": RIDGE_GRID[len(RIDGE_GRID) // 2]},
            None,
            NO_VALIDATION if no_validation(config) else "default (no all-way shots or val split)",
            "",
        )

    def score(c: dict) -> float:
        ts = support_text_space(task.support, task.classes, text, False, c["ridge"])
        return task.accuracy(torch.bmm(ts.embed(task.query), ts.weights.transpose(1, 2)))

    return grid_search([{"ridge": lam} for lam in RIDGE_GRID], score, task, {})


# -- augmented views, embedded in a text space ----------------------------------------------------
def embed_views(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """(E, V, S, D) raw views -> embedded in ``space`` (as its support)."""
    E, V, S, D = views.shape
    return space.embed(views.reshape(E, V * S, D)).reshape(E, V, S, -1)


def shot_rows(ts: TextSpace, views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (E, V, N*K, D) and way labels (E, N*K): the embedded support (V = 1), or the
    embedded stored views (E, V, N*K, D) of the class-major shots."""
    from fskd.classifiers.linear import way_labels

    E, N, K, D = ts.support.shape
    y = way_labels(E, N, K, ts.support.device)
    if views is None:
        return ts.support.reshape(E, 1, N * K, D), y
    return embed_views(ts, views), y


def view_rows(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """GDA's and ProKeR's rows from augmented views: (1, V, N*K, D) raw views of class-major shots ->
    (1, N, K*V, D) embedded rows per class (every view a row, as the authors' augmented crops)."""
    _, N, K, _ = space.support.shape
    e = embed_views(space, views)  # (1, V, N*K, D)
    V = e.shape[1]
    return e.permute(0, 2, 1, 3).reshape(1, N, K * V, -1)


def view_keys(space: TextSpace, views: torch.Tensor) -> torch.Tensor:
    """Tip-Adapter's cache keys from augmented views: the mean of a shot's raw views, embedded
    (normalised), as the reference averages its 10 augmented epochs: (E, S, D)."""
    return space.embed(views.mean(1))
