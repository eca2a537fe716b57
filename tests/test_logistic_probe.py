"""The `linear_probe` baseline as a logistic regression (trainer/logistic_probe.py): L-BFGS reaches the
regularised optimum, the L2 strength and the prior adjustment are chosen on val, and a saved probe
predicts as the selected one."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from retformer.trainer.config import FusionOptions, TrainConfig
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.image_models import LinearProbe
from retformer.trainer.logistic_probe import fit_logistic, select_logistic
from retformer.trainer.model_factory import model_from_config
from retformer.trainer.selection import Task
from retformer.trainer.stored_model import parse_stored_model
from retformer.trainer.train import predict
from retformer.trainer.val_criteria import balanced_accuracy

C, D = 3, 8


def _features(z: torch.Tensor, labels: torch.Tensor) -> RetrievalFeatures:
    n = len(z)
    return RetrievalFeatures(
        query_img=z.float(),
        labels=labels.long(),
        uids=[f"q{i}" for i in range(n)],
        nn_rows=torch.zeros(n, 1, dtype=torch.long),
        nn_score=torch.ones(n, 1),
        store_img=torch.ones(1, D),
        store_txt=torch.zeros(1, 2),
        store_has_text=torch.zeros(1, dtype=torch.bool),
        store_label=torch.zeros(1, dtype=torch.long),
    )


def _clusters(counts: list[int], spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm points around C fixed class centres, `counts[c]` of class c."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    z = centres[labels] + spread * torch.randn(len(labels), D, generator=g) / D**0.5
    return F.normalize(z, dim=1), labels


def _task(train: RetrievalFeatures, val: RetrievalFeatures) -> Task:
    counts = torch.bincount(train.labels, minlength=C).tolist()
    config = TrainConfig(seed=0, device="cpu")
    return Task("linear_probe", train, val, config, C, FusionOptions(), counts, metric="balanced")


def test_lbfgs_reaches_the_regularised_optimum_and_fits_small_margins() -> None:
    """Proves the fit is the logistic regression's optimum, not a few steps toward it: the objective's
    gradient vanishes at the returned weights (first-order condition of a strictly convex problem); a
    stronger L2 gives a smaller weight norm; and on unit-norm points whose classes are separable only
    with a small margin the weakly regularised probe classifies every training point."""
    z, labels = _clusters([60, 60, 60], spread=0.5, seed=1)
    norms = {}
    for l2 in (1e-1, 1e-3):
        probe = LinearProbe(D, C)
        objective = fit_logistic(probe, z, labels, l2)
        w, b = probe.fc.weight, probe.fc.bias
        loss = F.cross_entropy(probe.raw_logits(z), labels) + 0.5 * l2 * w.pow(2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        assert abs(float(loss.detach()) - objective) < 1e-5
        assert float(torch.cat([gw.flatten(), gb]).norm()) < 1e-4, l2
        norms[l2] = float(w.norm())
    assert norms[1e-1] < norms[1e-3]

    tight, tight_labels = _clusters([40, 40, 40], spread=0.15, seed=2)
    probe = LinearProbe(D, C)
    fit_logistic(probe, tight, tight_labels, 1e-6)
    assert bool((probe.raw_logits(tight).argmax(1) == tight_labels).all())


def test_selection_chooses_l2_and_prior_adjustment_on_val() -> None:
    """Proves the selected (L2, tau) is the best on val: the chosen trial has the highest val score of
    all L2 values, and with a 20:1 long-tailed train and a balanced val a positive prior adjustment is
    chosen because it scores higher on val than the same probe without it. The selected probe predicts
    with that adjustment (its recorded val score is its own val score)."""
    train = _features(*_clusters([200, 40, 10], spread=1.2, seed=3))
    val = _features(*_clusters([50, 50, 50], spread=1.2, seed=4))
    sel = select_logistic(_task(train, val), (1e-1, 1e-2, 1e-3), (0.0, 0.5, 1.0))
    scores = {t["l2"]: t["val_score"] for t in sel.trials}
    assert sel.selected["l2"] == max(scores, key=lambda l2: (scores[l2], l2))
    assert sel.selected["prior_tau"] > 0
    adjusted = predict(sel.model, val)
    assert abs(balanced_accuracy(adjusted, val.labels) - sel.selected["val_score"]) < 1e-9
    sel.model.set_prior_tau(0.0)
    assert balanced_accuracy(predict(sel.model, val), val.labels) < sel.selected["val_score"]


def test_ties_go_to_the_stronger_l2() -> None:
    """Proves the tie rule: on well separated classes every L2 value scores 1.0 on val, and the
    strongest (the simplest model) is kept."""
    train = _features(*_clusters([30, 30, 30], spread=0.05, seed=5))
    val = _features(*_clusters([10, 10, 10], spread=0.05, seed=6))
    sel = select_logistic(_task(train, val), (1e-4, 1e-2, 1e-3), (0.0,))
    assert {t["val_score"] for t in sel.trials} == {1.0}
    assert sel.selected["l2"] == 1e-2


def test_a_saved_probe_predicts_as_the_selected_one() -> None:
    """Proves the prior adjustment travels with the model's config: a probe rebuilt from its stored
    config and state gives the same logits as the selected probe; a config written before the probe
    had an adjustment still loads (and predicts unadjusted)."""
    train = _features(*_clusters([200, 40, 10], spread=1.2, seed=3))
    val = _features(*_clusters([20, 20, 20], spread=1.2, seed=4))
    sel = select_logistic(_task(train, val), (1e-2,), (0.0, 1.0))
    rebuilt = model_from_config(parse_stored_model(dict(sel.model.config)))
    rebuilt.load_state_dict(sel.model.state_dict())
    assert torch.equal(predict(rebuilt, val), predict(sel.model, val))
    old = model_from_config(parse_stored_model({"kind": "linear_probe", "img_dim": D, "num_classes": C}))
    old.load_state_dict(sel.model.state_dict())
    assert torch.equal(predict(old, val), val.query_img @ sel.model.fc.weight.T + sel.model.fc.bias)
