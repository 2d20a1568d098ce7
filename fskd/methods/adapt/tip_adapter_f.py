"""``tip-adapter-f``: Tip-Adapter-F, the cache keys fine-tuned on the shots.

Starts from ``tip-adapter`` (alpha, beta chosen on validation), then trains the keys (one
(N*K, D) matrix per episode, batched) with full-batch Adam on the support's cross-entropy (in the span of the support). A
support row never sees its own key while training (leave-one-out), the role augmented views
play in the paper. The number of steps and a rescale of alpha are chosen on validation data.
The state keeps the all-way keys fine-tuned on its own shots (``_common.keep_allway_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fskd.classifiers.cache import TEXT_SCALE, FittedTip, affinity, cache_from_support
from fskd.classifiers.linear import train_steps
from fskd.methods.adapt import _common as C
from fskd.methods.adapt.tip_adapter import TipOptions, fit_tip, text_space
from fskd.methods.base import METHODS, Method, MethodState, TrainProgress
from fskd.methods.bridge import Bridge
from fskd.runtime import single_thread

STEPS = (0, 10, 25, 50, 100)
#: the span form (B: S x S per episode) up to this many support rows; the keys themselves above
SPAN_MAX_ROWS = 2048
#: support rows per step in the large-support form (the reference's batch size)
KEY_BATCH = 256
ALPHA_SCALE = (0.5, 1.0, 2.0)


def finetune_keys(space: C.TextSpace, alpha: float, beta: float, steps, lr: float, seed: int = 0
                  ) -> dict[int, torch.Tensor]:
    """Keys (E, S, D) after each step count in ``steps`` (step 0: the support itself).

    Up to :data:`SPAN_MAX_ROWS` support rows the keys move in the span of the support, ``K = X +
    B X`` with B (E, S, S) trained on the full support (the gradient of the support loss only has
    components there), so a step costs O(S^2) per episode rather than O(S D). Above it (all-way 16
    shots x 1,000 classes: S = 16,000, where B alone would be 1 GB and a step O(S^3)) the keys
    themselves are trained, as the reference does, each step on :data:`KEY_BATCH` support rows
    drawn at random (seeded) as queries against every key: O(KEY_BATCH S D) per step.
    """
    x, values = cache_from_support(space.support)
    E, S, D = x.shape
    N = space.weights.shape[1]
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[-1] == 0 or S == 0:
        return {s: x for s in steps}
    if S > SPAN_MAX_ROWS:
        return _finetune_keys_direct(x, values, space.weights, N, alpha, beta, steps, lr, seed)
    b = torch.zeros(E, S, S, device=x.device, requires_grad=True)
    gram = torch.bmm(x, x.transpose(1, 2))
    onehot = F.one_hot(values, N).to(x.dtype)
    eye = torch.eye(S, dtype=torch.bool, device=x.device)[None]
    text_logits = TEXT_SCALE * torch.bmm(x, space.weights.transpose(1, 2))
    opt = torch.optim.Adam([b], lr=lr)

    def loss(step: int) -> torch.Tensor:
        sims = gram + torch.bmm(gram, b.transpose(1, 2))  # x K^T
        a = torch.exp(-beta * (1.0 - sims)).masked_fill(eye, 0.0)  # leave-one-out
        logits = text_logits + alpha * torch.bmm(a, onehot)
        return F.cross_entropy(logits.reshape(-1, N), values.reshape(-1), reduction="none").reshape(E, -1).mean(1).sum()

    with torch.enable_grad(), single_thread():
        return train_steps(opt, loss, steps, lambda: x + torch.bmm(b.detach(), x), {0: x})


def _finetune_keys_direct(x: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, N: int, alpha: float,
                          beta: float, steps: list[int], lr: float, seed: int) -> dict[int, torch.Tensor]:
    """The large-support form of :func:`finetune_keys`: keys (E, S, D) as parameters, Adam on
    mini-batches of support rows (leave-one-out: a row never sees its own key)."""
    E, S, D = x.shape
    keys = x.clone().requires_grad_(True)
    onehot = F.one_hot(values, N).to(x.dtype)  # (E, S, N)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([keys], lr=lr)
    arange = torch.arange(S, device=x.device)

    def loss(step: int) -> torch.Tensor:
        rows = torch.randperm(S, generator=gen)[:KEY_BATCH].to(x.device)
        q = x[:, rows]  # (E, b, D)
        sims = torch.bmm(q, keys.transpose(1, 2))  # (E, b, S)
        own = rows[:, None] == arange[None]  # leave-one-out
        a = torch.exp(-beta * (1.0 - sims)).masked_fill(own[None], 0.0)
        logits = TEXT_SCALE * torch.bmm(q, weights.transpose(1, 2)) + alpha * torch.bmm(a, onehot)
        return F.cross_entropy(logits.reshape(-1, N), values[:, rows].reshape(-1), reduction="none"
                               ).reshape(E, -1).mean(1).sum()

    with torch.enable_grad():
        return train_steps(opt, loss, steps, lambda: keys.detach().clone(), {0: x})


class TipAdapterF(Method):
    """Tip-Adapter with cache keys fine-tuned on the shots; steps and alpha chosen on validation."""

    needs_text = True
    transfers_to_new_classes = True  # an empty support of unlearned classes: their text alone

    name = "tip-adapter-f"
    kind = "adapt"
    options = TipOptions

    @C.threads_by_store
    def fit(self, store, config, progress: TrainProgress | None = None) -> MethodState:
        opts = C.parse_options(TipOptions, config)
        state, ctx = fit_tip(self.name, store, config, opts)
        steps = C.fixed_or(opts.steps, STEPS)
        for regime in (C.EPISODIC, C.ALLWAY):
            task = ctx["tasks"][regime]
            alpha, beta = C.hp(state, regime, "alpha"), C.hp(state, regime, "beta")
            default = {"steps": steps[len(steps) // 2], "alpha_scale": 1.0}
            if task is None or task.shot == 0 or alpha == 0:
                choice = C.grid_search([], lambda c: 0.0, None, default)
            else:
                space = ctx["spaces"][regime](task.support, task.classes)
                q = space.embed(task.query)
                ckpts = finetune_keys(space, alpha, beta, steps, opts.lr, config.seed)
                values = cache_from_support(space.support)[1]
                N = space.weights.shape[1]
                text_logits = TEXT_SCALE * torch.bmm(q, space.weights.transpose(1, 2))
                onehot = F.one_hot(values, N).to(q.dtype)

                def score(c, ckpts=ckpts, q=q, text_logits=text_logits, onehot=onehot, alpha=alpha, beta=beta, task=task):
                    cache = torch.bmm(affinity(q, ckpts[c["steps"]], beta), onehot)
                    return task.accuracy(text_logits + c["alpha_scale"] * alpha * cache)

                grid = [{"steps": s, "alpha_scale": a} for s in steps for a in ALPHA_SCALE]
                choice = C.grid_search(grid, score, task, default)
                if regime == C.ALLWAY and choice.params["steps"] > 0:
                    C.keep_allway_head(state, task, {"keys": ckpts[choice.params["steps"]]})
                if progress:
                    progress(f"tip-adapter-f {regime}", 1, 1, {"val_acc": choice.score})
            C.record(state, regime, choice, {"steps"} if opts.steps is not None else None)
        state.hparams["lr"] = opts.lr
        state.selected_on["lr"] = "fixed"
        return state

    def head(self, state: MethodState, store, device: torch.device):
        text = state.tensors["text"].to(device)
        bridge = Bridge.from_tensors({k: v.to(device) for k, v in state.tensors.items()})
        lr = state.hparams["lr"]
        seed = int(state.config.get("seed", 1))

        def make(regime: str):
            alpha, beta = C.hp(state, regime, "alpha"), C.hp(state, regime, "beta")
            steps, scale = C.hp(state, regime, "steps"), C.hp(state, regime, "alpha_scale")

            def fit(support, classes):
                ts = text_space(state, store, regime, support, classes, bridge, text)
                kept = C.kept_allway_head(state, support, classes) if regime == C.ALLWAY else None
                if kept is not None:
                    keys = kept["keys"]
                elif alpha != 0:
                    keys = finetune_keys(ts, alpha, beta, [steps], lr, seed)[steps]
                else:
                    keys = cache_from_support(ts.support)[0]
                values = cache_from_support(ts.support)[1]
                return FittedTip(ts.weights, keys, values, scale * alpha, beta, ts.embed)

            return fit

        return C.RegimeHead(self.name, C.learned_mask(store, device), make(C.EPISODIC), make(C.ALLWAY), needs_text=True)


METHODS.register('tip-adapter-f', TipAdapterF)
