"""The `linear_probe` baseline fitted as the CLIP paper fits its linear probes: a multinomial logistic
regression on the frozen query embedding, full-batch L-BFGS, its L2 strength swept and chosen on val
(Radford et al. 2021, appendix A.3), then the post-hoc prior adjustment mlp_only gets, also on val.

Why not the epoch loop every other trained method shares: with its AdamW weight decay (0.1), label
smoothing and mixup, a single linear layer on unit-norm embeddings never reaches the weight scale a
linear classifier needs, and it scored 1-5 points of test top-1 under a tuned logistic regression on the
demo's datasets and the own-data digits (docs/method-notes.md, "seventh round"): a weaker baseline than
the one a reader would run. The problem is convex, so the fit is deterministic up to L-BFGS's stopping
rule; every L2 value starts from the previous (stronger) one's solution.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from retformer.artifacts.devices import resolve_device
from retformer.trainer import distributed
from retformer.trainer.image_models import LinearProbe
from retformer.trainer.progress import current
from retformer.trainer.selection import Selected, Task, best_prior_tau
from retformer.trainer.train import check_labels, predict
from retformer.trainer.val_criteria import criterion, top1

# L-BFGS iterations per L2 value (a warm start from the previous value's solution needs far fewer).
MAX_ITER = 500


def fit_logistic(probe: LinearProbe, z: torch.Tensor, labels: torch.Tensor, l2: float) -> float:
    """Fit `probe.fc` in place: mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not penalised), full
    batch, L-BFGS with a strong-Wolfe line search, from the probe's current weights. z (N, D) and labels
    (N,) on the probe's device. Returns the final objective."""
    weight, bias = probe.fc.weight, probe.fc.bias
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=MAX_ITER,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def value() -> torch.Tensor:
        return F.cross_entropy(probe.raw_logits(z), labels) + 0.5 * l2 * weight.pow(2).sum()

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = value()
        loss.backward()
        return loss

    probe.train()
    opt.step(objective)
    with torch.no_grad():
        return float(value())


def select_logistic(task: Task, l2_grid: tuple[float, ...], prior_taus: tuple[float, ...]) -> Selected:
    """The linear probe at each L2 strength (strongest first, each warm-started from the one before), the
    best prior adjustment tau of each on val, then the best (L2, tau) on val by the task's criterion (ties:
    the stronger L2, the smaller tau). One progress entry per L2 value."""
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    train, val = task.train, task.val
    check_labels(train.labels, task.num_classes)
    device = distributed.device_for(resolve_device(task.base.device, "training"))
    probe = task.build().to(device)
    assert isinstance(probe, LinearProbe), f"select_logistic fits a linear probe, not {task.kind}"
    z, labels = train.query_img.to(device, torch.float32), train.labels.to(device)
    prior = probe.log_prior.cpu()  # predict() returns CPU logits
    score_of = criterion(task.metric)
    progress, trials = current(), []
    best: tuple[float, float, float, dict[str, torch.Tensor]] | None = None
    for l2 in sorted(l2_grid, reverse=True):
        if progress is not None:
            progress.begin_fit(1, summary={"l2": l2, "solver": "lbfgs"})
        loss = fit_logistic(probe, z, labels, l2)
        raw = predict(probe, val)  # prior_tau stays 0 until the end: the unadjusted logits
        tau = best_prior_tau(raw, prior, val.labels, prior_taus, score_of)
        score = score_of(raw - tau * prior, val.labels)
        trials.append({"l2": l2, "prior_tau": tau, "val_score": score, "loss": loss})
        if progress is not None:
            with torch.no_grad():
                train_acc = float((probe.raw_logits(z).argmax(1) == labels).float().mean())
            entry = {"epoch": 1, "loss": loss, "train_acc": train_acc, "l2": l2, "prior_tau": tau}
            progress.epoch({**entry, "val_top1_model": score})
        if best is None or score > best[0]:
            best = (score, l2, tau, copy.deepcopy(probe.state_dict()))
    assert best is not None
    score, l2, tau, state = best
    probe.load_state_dict(state)
    probe.set_prior_tau(tau)
    probe.eval()
    val_logits = predict(probe, val)
    selected: dict[str, Any] = {"l2": l2, "prior_tau": float(tau)}
    selected["val_score"] = score_of(val_logits, val.labels)
    return Selected(probe, selected, top1(val_logits, val.labels), trials)
