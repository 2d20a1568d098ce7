"""``syntrans``: the SynTrans classifier: visual and semantic weight generation, combined.

A novel class's weight is built from four parts, all in the store's image space (features
power-transformed, centred on the base mean and L2-normalised):

- ``v``: the support prototype (normalised mean of the shots);
- the **visual weight generator** ``gen = normalize(v G)``: a ridge map learned on the base
  classes from single-sample features to their class prototype (it pulls a noisy shot
  towards where class means lie);
- the **semantic weight reconstructor** ``sem = softmax(t_c T_base^T / tau) P_base``: the class
  rebuilt from the base-class visual prototypes P_base, weighted by text-text similarity of its
  class semantics t_c (names through the prompt ensemble, or a ``--descriptions`` file) to the
  base classes' (kept unnormalised: a class with no close base relative gets a short,
  low-confidence vector);
- the **bridge** weight ``tw = text_to_image(t_c)``: the class text mapped into image space by
  the visual-semantic bridge learned on the base classes (fskd.methods.bridge, both directions;
  the identity for a joint CLIP store).

    w_c = normalize(v + g * gen + (K0 / K)^gamma * (a * sem + b * tw))

The mixing (g, a, b), the temperature tau and a logit scale are **meta-trained episodically on
the base classes**: N-way K-shot episodes where every base class's generator, bridge and
semantic reconstruction are built without it (leave-one-fold-out generators and bridges,
self-masked reconstruction), so the base episodes see the same situation a novel class does.
Then an overall strength rho (w = v + rho * (...)), the power transform, the generator's ridge
and the bridge's ridge are **chosen on val-class episodes**. ``(K0 / K)^gamma`` shrinks the
priors when an evaluation gives more shots (K) than the state was fitted for (K0).

All-way regime (the call includes base classes, see regimes): nothing base-learned is used;
the semantic reconstructor draws on the other classes' support prototypes (never a class's
own), the bridge is fitted on the support, and (a, b) are chosen on the val split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fskd.errors import ConfigError, StoreError
from fskd.methods.adapt.method import AdaptMethod, AdaptOptions, Fit
from fskd.methods.adapt.regimes import (
    ALLWAY,
    EPISODIC,
    FittedWeights,
    RegimeHead,
    learned_mask,
    prototypes,
    require_shots,
    sample_episode_rows,
)
from fskd.methods.adapt.text_space import choose_allway_ridge, fit_episodic_bridge, support_text_space
from fskd.methods.adapt.validation import (
    VAL_RANGES,
    check_val_options,
    fixed_or,
    grid_search,
    hp,
    no_validation,
    record,
)
from fskd.methods.base import METHODS, MethodState
from fskd.methods.bridge import RIDGE_GRID, Bridge, _ridge, ridge_path
from fskd.runtime import single_thread
from fskd.store import sampling

log = logging.getLogger(__name__)

POWER = (1.0, 0.5)
GENERATOR_RIDGE = (0.1, 1.0, 10.0)  # times n_rows / dim
RHO = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
ALLWAY_MIX = (0.0, 0.1, 0.25, 0.5)


@dataclass(frozen=True)
class SynTransOptions(AdaptOptions):
    power: float | tuple[float, ...] | None = (
        None  # power transform x^p of non-negative features (grid chosen on val classes)
    )
    generator_ridge: float | tuple[float, ...] | None = None  # visual generator ridge, relative to rows/dim
    ridge: float | None = None  # bridge ridge (non-joint stores)
    rho: float | tuple[float, ...] | None = None  # overall strength of generator + priors (grid chosen on val classes)
    folds: int = 3  # leave-one-fold-out folds of base classes for meta-training
    meta_steps: int = 100  # meta-training steps of the generators on base-class episodes
    meta_episodes: int = 32  # base-class episodes per meta-training step
    meta_query: int = 10  # queries per class in a meta-training episode
    meta_lr: float = 0.05  # learning rate of meta-training
    shot_decay: float = 0.5  # gamma
    val_way: int = 5
    val_query: int = 15
    val_episodes: int = 300

    RANGES = {
        "power": (">", 0),
        "generator_ridge": (">=", 0),
        "ridge": (">", 0),
        "rho": (">=", 0),
        "folds": (">=", 2),
        "meta_steps": (">=", 0),
        "meta_episodes": (">=", 1),
        "meta_query": (">=", 1),
        "meta_lr": (">", 0),
        "shot_decay": (">=", 0),
        **VAL_RANGES,
    }

    def __post_init__(self) -> None:
        check_val_options(self)
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.meta_steps < 0 or self.meta_episodes < 1 or self.meta_query < 1 or self.meta_lr <= 0:
            raise ConfigError("meta_steps >= 0, meta_episodes >= 1, meta_query >= 1 and meta_lr > 0 are required")
        if self.power is not None:
            ps = self.power if isinstance(self.power, tuple) else (self.power,)
            if any(p <= 0 for p in ps):
                raise ConfigError(f"power must be > 0, got {self.power}")


def tukey(x: torch.Tensor, p: float) -> torch.Tensor:
    """Tukey's ladder of powers on non-negative features (p = 1: unchanged)."""
    if p == 1.0:
        return x
    return x.clamp_min(0).sqrt() if p == 0.5 else x.clamp_min(0).pow(p)


def semantic(text_cls: torch.Tensor, text_bank: torch.Tensor, bank: torch.Tensor, tau, mask=None) -> torch.Tensor:
    """Semantic reconstruction: (E, N, d_t) class texts, (B, d_t) bank texts, (B, D) or (E, B, D)
    bank prototypes -> (E, N, D) = softmax(sim / tau) @ bank, with ``mask`` (E, N, B) excluded."""
    s = torch.matmul(text_cls, text_bank.transpose(-1, -2)) / tau  # (E, N, B)
    if mask is not None:
        s = s.masked_fill(mask, -1e9)
    att = torch.softmax(s, -1)
    return torch.bmm(att, bank) if bank.dim() == 3 else att @ bank


def combine(v, gen, sem, tw, g, a, b) -> torch.Tensor:
    w = v
    if gen is not None:
        w = w + g * gen
    return F.normalize(w + a * sem + b * tw, dim=-1)


@dataclass
class Base:
    """What syntrans learned on the base classes (episodic regime)."""

    power: float
    mean: torch.Tensor  # (D,)
    protos: torch.Tensor  # (B, D) normalised base prototypes
    text_base: torch.Tensor  # (B, d_t)
    gen: torch.Tensor  # (D, D) visual generator
    bridge: Bridge

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(tukey(x, self.power) - self.mean.to(x.device), dim=-1)

    def parts(self, support: torch.Tensor, classes: torch.Tensor, text: torch.Tensor, tau: float):
        """(E, N, K, D) raw support -> v, gen, sem, tw (each (E, N, D))."""
        v = prototypes(self.embed(support))
        gen = F.normalize(v @ self.gen, dim=-1)
        sem = semantic(text[classes], self.text_base, self.protos, tau)
        tw = self.bridge.text_to_image(text)[classes]
        return v, gen, sem, tw


class SynTrans(AdaptMethod):
    """Visual weight generator + semantic weight reconstructor + bridge, meta-trained on base classes."""

    needs_text = True

    name = "syntrans"
    options = SynTransOptions
    own_bridges = True  # learned in the power-transformed space chosen on validation

    # ------------------------------------------------------------------------------------------
    def fit_state(self, f: Fit) -> None:
        store, config, opts, device, state, progress = f.store, f.config, f.opts, f.device, f.state, f.progress
        text = f.text.to(device)
        base = sorted(store.class_split("base"))
        if len(base) < max(3, opts.folds):
            raise StoreError(
                f"{store.path}: syntrans meta-trains on the base classes with {opts.folds} leave-one-fold-out "
                f"folds and needs at least {max(3, opts.folds)} base classes; it has {len(base)}"
            )
        k_fit = max(1, config.shots)
        fixed: set = set()
        ep_task = f.episodic_task()
        x_np, y_np = store.gather(base, max_per_class=sampling.CLASS_ROWS)
        x_raw, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)

        # 1. power transform (only for non-negative features), by prototype accuracy on val episodes
        nonneg = bool((x_raw >= 0).all())
        powers = fixed_or(opts.power, POWER if nonneg else (1.0,))
        if opts.power is not None:
            fixed.add("power")
            if not nonneg and any(p != 1.0 for p in powers):
                raise ConfigError(
                    f"power={opts.power}: a power transform needs non-negative features; {store.path} has negative ones"
                )

        def proto_score(p: float) -> float:
            mean = tukey(x_raw, p).mean(0)
            emb = lambda t: F.normalize(tukey(t, p) - mean, dim=-1)  # noqa: E731
            return ep_task.accuracy(torch.bmm(emb(ep_task.query), prototypes(emb(ep_task.support)).transpose(1, 2)))

        proto_scores: dict = {}

        def power_score(c: dict) -> float:
            proto_scores[c["power"]] = proto_score(c["power"])
            return proto_scores[c["power"]]

        ch_power = grid_search([{"power": p} for p in powers], power_score, ep_task, {"power": powers[0]})
        p = ch_power.params["power"]
        xb = tukey(x_raw, p)
        mean = xb.mean(0)
        eb = F.normalize(xb - mean, dim=-1)
        x_np = x_raw = xb = None  # only the embedded rows are used from here (ImageNet: 360,000 x D each)
        pos = torch.full((store.num_classes,), -1, dtype=torch.long, device=device)
        pos[torch.as_tensor(base, device=device)] = torch.arange(len(base), device=device)
        yb = pos[y]  # base position of each row
        protos = F.normalize(torch.zeros(len(base), eb.shape[1], device=device).index_add_(0, yb, eb), dim=-1)
        text_base = text[torch.as_tensor(base, device=device)]

        # 2. the bridge (ridge on val classes) in the transformed space
        bridge, ch_bridge = fit_episodic_bridge(
            store, text, opts.ridge, device, transform=lambda t: tukey(t, p), use_val=not no_validation(config)
        )

        # 3. the visual generator's ridge, on val episodes (generator at full strength)
        n, d = eb.shape
        rels = fixed_or(opts.generator_ridge, GENERATOR_RIDGE)
        if opts.generator_ridge is not None:
            fixed.add("generator_ridge")
        gens = dict(zip(rels, ridge_path(eb, protos[yb], [r * n / d for r in rels]), strict=True))

        if ep_task is not None:
            emb = lambda t: F.normalize(tukey(t, p) - mean, dim=-1)  # noqa: E731
            v_val, q_val = prototypes(emb(ep_task.support)), emb(ep_task.query)

        def gen_score(r: float) -> float:
            w = F.normalize(v_val + F.normalize(v_val @ gens[r], dim=-1), dim=-1)
            return ep_task.accuracy(torch.bmm(q_val, w.transpose(1, 2)))

        ch_gen = grid_search(
            [{"generator_ridge": r} for r in rels],
            lambda c: gen_score(c["generator_ridge"]),
            ep_task,
            {"generator_ridge": 1.0 if 1.0 in rels else rels[0]},
        )
        rel = ch_gen.params["generator_ridge"]
        learned = Base(p, mean, protos, text_base, gens[rel], bridge)

        # 4. meta-training on base episodes (leave-one-fold-out parts)
        theta, meta = self._meta_train(
            eb, yb, base, text, protos, text_base, bridge, rel * n / d, k_fit, opts, config.seed, store.joint, progress
        )
        g, a, b, tau, scale = (float(t) for t in theta)

        # 5. overall strength rho on val episodes
        rhos = fixed_or(opts.rho, RHO)
        if opts.rho is not None:
            fixed.add("rho")
        if ep_task is not None:
            parts = learned.parts(ep_task.support, ep_task.classes, text, tau)
            q = q_val
        rho_score = lambda c: ep_task.accuracy(  # noqa: E731
            torch.bmm(q, combine(*parts, c["rho"] * g, c["rho"] * a, c["rho"] * b).transpose(1, 2))
        )
        ch_rho = grid_search([{"rho": r} for r in rhos], rho_score, ep_task, {"rho": 1.0 if 1.0 in rhos else rhos[0]})

        # 6. all-way regime: bridge ridge and (a, b) on the val split
        ch_aw_ridge = choose_allway_ridge(store, text, config, opts.ridge, device, transform=lambda t: tukey(t, p))
        aw_task = f.allway_task() if config.shots > 0 else None
        if aw_task is not None:
            aw_parts = _allway_parts(
                aw_task.support, aw_task.classes, text, p, tau, store.joint, ch_aw_ridge.params["ridge"]
            )
            q_aw = aw_parts[-1](aw_task.query)
        aw_score = lambda c: aw_task.accuracy(  # noqa: E731
            torch.bmm(q_aw, combine(aw_parts[0], None, aw_parts[1], aw_parts[2], 0.0, c["a"], c["b"]).transpose(1, 2))
        )
        ch_aw = grid_search(
            [{"a": x, "b": z} for x in ALLWAY_MIX for z in ALLWAY_MIX], aw_score, aw_task, {"a": 0.0, "b": 0.0}
        )

        # record
        record(state, EPISODIC, ch_power, fixed)
        record(state, EPISODIC, ch_bridge)
        record(state, EPISODIC, ch_gen, fixed)
        record(state, EPISODIC, ch_rho, fixed)
        for k_, v_ in (("g", g), ("a", a), ("b", b), ("tau", tau), ("scale", scale)):
            state.hparams[f"episodic.{k_}"] = round(v_, 6)
            state.selected_on[f"episodic.{k_}"] = "meta-trained on base-class episodes"
        state.hparams["episodic.shots"] = k_fit
        state.selected_on["episodic.shots"] = "fixed (--shots)"
        state.hparams["episodic.shot_decay"] = opts.shot_decay
        state.selected_on["episodic.shot_decay"] = "fixed"
        record(state, ALLWAY, ch_aw_ridge)
        record(state, ALLWAY, ch_aw)
        state.metrics.update(meta)
        state.metrics["text"] = f.text_source
        if ch_rho.score is not None:
            state.metrics["episodic.val_acc_prototype"] = round(
                100 * (proto_scores[p] if p in proto_scores else proto_score(p)), 2
            )
        state.tensors = {
            "text": text.cpu(),
            "base.mean": mean.cpu(),
            "base.protos": protos.cpu(),
            "base.classes": torch.tensor(base),
            "generator": learned.gen.cpu(),
            **{k: v.cpu() for k, v in bridge.tensors().items()},
        }

    # ------------------------------------------------------------------------------------------
    def _meta_train(self, eb, yb, base, text, protos, text_base, bridge, gen_lam, k, opts, seed, joint, progress):
        """Leave-one-fold-out parts for every base class, then Adam on (g, a, b, tau, scale)
        over N-way K-shot base episodes. Returns ((g, a, b, tau, scale), metrics)."""
        dev = eb.device
        B = len(base)
        rng = np.random.default_rng(seed)
        fold_of = torch.as_tensor(rng.permutation(B) % opts.folds, device=dev)  # base position -> fold
        row_fold = fold_of[yb]
        egen = torch.empty_like(eb)  # generator output per row, by a generator that never saw its class
        tw = torch.empty(B, eb.shape[1], device=dev)  # bridge weight per base class, bridge without its fold
        t_rows = text_base[yb]
        for f in range(opts.folds):
            tr, te = row_fold != f, row_fold == f
            gen_f = _ridge(eb[tr], protos[yb[tr]], gen_lam)
            egen[te] = eb[te] @ gen_f
            cls_f = fold_of == f
            if joint:
                tw[cls_f] = F.normalize(text_base[cls_f], dim=-1)
            else:
                t2i = _ridge(t_rows[tr], eb[tr], bridge.ridge if bridge.ridge is not None else RIDGE_GRID[2])
                tw[cls_f] = F.normalize(text_base[cls_f] @ t2i, dim=-1)
        labels = yb.cpu().numpy()
        counts = np.bincount(labels, minlength=B)
        way = min(5, B)
        if counts.min() - k < 1 <= counts.min() - 1:
            k = int(counts.min()) - 1  # exactly K rows per base class (base-to-new's view): (K-1)-shot 1-query episodes
        init = torch.tensor([0.5, 0.3, 0.1, 0.03, 10.0], device=dev).log()
        if counts.min() < 2:  # one row per base class (base-to-new at 1 shot): no episode has a query
            return init.exp().tolist(), {
                "meta.steps": 0,
                "meta.task": "none: a base class has a single row, so no "
                "episode has a query; the initial weights are used",
            }
        q = int(min(opts.meta_query, counts.min() - k))
        if q < 1:
            raise ConfigError(
                f"--shots {k} is larger than available for meta-training: base class "
                f"{int(np.argmin(counts))} has {counts.min()} rows, fewer than shots + 1 query"
            )
        theta = init.clone().requires_grad_(True)
        if opts.meta_steps == 0:
            return theta.detach().exp().tolist(), {"meta.steps": 0}
        opt = torch.optim.Adam([theta], lr=opts.meta_lr)
        truth = torch.arange(way, device=dev).repeat_interleave(q)
        losses = []
        sup_rows, qry_rows, _ = sample_episode_rows(
            labels, range(B), way, k, q, opts.meta_steps * opts.meta_episodes, seed + 1
        )
        sup_rows = torch.from_numpy(sup_rows).to(dev)
        qry_rows = torch.from_numpy(qry_rows).to(dev)
        eye = torch.arange(B, device=dev)
        with torch.enable_grad(), single_thread():
            for step in range(opts.meta_steps):
                sl = slice(step * opts.meta_episodes, (step + 1) * opts.meta_episodes)
                s_rows, q_rows = sup_rows[sl], qry_rows[sl]  # (E, N, K), (E, N, Q)
                cls = yb[s_rows[:, :, 0]]  # (E, N) base positions
                g, a, b, tau, scale = theta.exp()
                v = F.normalize(eb[s_rows].mean(2), dim=-1)
                gen = F.normalize(egen[s_rows].mean(2), dim=-1)
                mask = cls[:, :, None] == eye[None, None, :]
                sem = semantic(text_base[cls], text_base, protos, tau, mask)
                w = combine(v, gen, sem, tw[cls], g, a, b)
                qx = eb[q_rows.reshape(len(cls), -1)]
                logits = scale * torch.bmm(qx, w.transpose(1, 2))
                loss = F.cross_entropy(logits.reshape(-1, way), truth.repeat(len(cls)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # keep tau in a sane range
                    theta[3].clamp_(math.log(1e-3), math.log(10.0))
                losses.append(float(loss.detach()))
                if progress:
                    progress("syntrans meta-training", step + 1, opts.meta_steps, {"loss": losses[-1]})
        vals = theta.detach().exp().tolist()
        log.info("syntrans meta-trained g=%.3f a=%.3f b=%.3f tau=%.4f scale=%.2f", *vals)
        return vals, {
            "meta.steps": opts.meta_steps,
            "meta.episodes_per_step": opts.meta_episodes,
            "meta.task": f"{way}-way {k}-shot {q}-query base-class episodes, {opts.folds} leave-one-fold-out folds",
            "meta.loss_first": round(float(np.mean(losses[:10])), 4),
            "meta.loss_last": round(float(np.mean(losses[-10:])), 4),
        }

    # ------------------------------------------------------------------------------------------
    def make_head(self, state: MethodState, store, device: torch.device):
        t = {k: v.to(device) for k, v in state.tensors.items()}
        text = t["text"]
        h = lambda k: hp(state, EPISODIC, k)  # noqa: E731
        learned = Base(
            h("power"),
            t["base.mean"],
            t["base.protos"],
            text[t["base.classes"]],
            t["generator"],
            Bridge.from_tensors(t),
        )
        rho, k0, gamma = h("rho"), h("shots"), h("shot_decay")
        g, a, b, tau = rho * h("g"), rho * h("a"), rho * h("b"), h("tau")
        ridge = hp(state, ALLWAY, "ridge")
        a_aw, b_aw = hp(state, ALLWAY, "a"), hp(state, ALLWAY, "b")
        joint = store.joint

        def episodic(support, classes):
            require_shots(support, self.name)
            shrink = (k0 / support.shape[2]) ** gamma
            v, gen, sem, tw = learned.parts(support, classes, text, tau)
            return FittedWeights(combine(v, gen, sem, tw, g, shrink * a, shrink * b), learned.embed)

        def allway(support, classes):
            require_shots(support, self.name)
            v, sem, tw, embed = _allway_parts(support, classes, text, learned.power, tau, joint, ridge)
            return FittedWeights(combine(v, None, sem, tw, 0.0, a_aw, b_aw), embed)

        return RegimeHead(self.name, learned_mask(store, device), episodic, allway, needs_text=True)


def _allway_parts(support, classes, text, power, tau, joint, ridge):
    """Support-only parts: prototypes, semantic reconstruction from the *other* classes' support
    prototypes, bridge weights fitted on the support; and the query embedding."""
    ts = support_text_space(tukey(support, power), classes, text, joint, ridge)
    v = prototypes(ts.support)
    tc = text.to(v.device)[classes]  # (E, N, d_t)
    mask = torch.eye(classes.shape[1], dtype=torch.bool, device=v.device)[None].expand(len(classes), -1, -1)
    att = torch.softmax((torch.bmm(tc, tc.transpose(1, 2)) / tau).masked_fill(mask, -1e9), -1)
    return v, torch.bmm(att, v), ts.weights, (lambda q: ts.embed(tukey(q, power)))


METHODS.register("syntrans", SynTrans)
