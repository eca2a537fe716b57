"""The fitted prediction rule (`select.rule_fit: stack`, trainer/stacking.py, trainer/select_fitted.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retformer.artifacts.workspace import Workspace
from retformer.trainer.checkpoint import load_model
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.stacking import class_weights, fit_stack
from retformer.trainer.train import predict
from tests.test_selection import EXPERIMENT, K, run

torch.set_num_threads(1)


def _sampled(n: int, c: int, w: float, b: float, beta: float, seed: int = 0):
    """Branches and labels drawn from softmax(w L_I - b log prior + beta log e): the model fit_stack fits."""
    g = torch.Generator().manual_seed(seed)
    l_i = torch.randn(n, c, generator=g) * 2
    log_e = torch.randn(n, c, generator=g) * 2
    log_prior = torch.log_softmax(torch.randn(c, generator=g), dim=0)
    logits = w * l_i - b * log_prior + beta * log_e
    y = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g)[:, 0]
    return l_i, log_prior, log_e, y


def test_fit_recovers_the_weights_labels_were_drawn_with() -> None:
    """Proves the fit is the maximum-likelihood stack: on 20,000 images whose labels are drawn from
    softmax(1.5 L_I - 0.7 log prior + 0.8 log e), the fitted weights are within 0.1 of those."""
    l_i, log_prior, log_e, y = _sampled(20_000, 6, 1.5, 0.7, 0.8)
    # the class-balanced objective reweighs the classes, which moves the prior shift b, not w or beta
    s = fit_stack(l_i, log_prior, y, log_e=log_e)
    assert s.w == pytest.approx(1.5, abs=0.1)
    assert s.beta == pytest.approx(0.8, abs=0.1)
    assert s.alpha == 0.0


def test_a_harmful_term_gets_weight_zero_and_weights_stay_non_negative() -> None:
    """Proves the non-negativity: a retrieval term that points away from the truth (the negated
    evidence) is dropped (weight exactly 0), and the rule keeps the other terms."""
    l_i, log_prior, log_e, y = _sampled(5_000, 5, 1.0, 0.0, 1.0, seed=1)
    s = fit_stack(l_i, log_prior, y, l_r=-log_e, log_e=None)
    assert s.alpha == 0.0 and s.w > 0.5
    rule = s.rule()
    assert rule["alpha"] == 0.0 and rule["beta"] == 0.0 and rule["image_weight"] == pytest.approx(s.w)


def test_class_balance_makes_the_fit_blind_to_class_frequency() -> None:
    """Proves the objective weighs classes, not images: repeating every image of one class 5 times
    leaves the fitted weights unchanged (to 1e-6), and the class weights sum to 1 with equal class mass."""
    l_i, log_prior, log_e, y = _sampled(3_000, 4, 1.0, 0.3, 0.5, seed=2)
    rep = torch.cat([torch.arange(len(y))] + [torch.nonzero(y == 0)[:, 0]] * 4)
    a = fit_stack(l_i, log_prior, y, log_e=log_e)
    b = fit_stack(l_i[rep], log_prior, y[rep], log_e=log_e[rep])
    for name in ("w", "b", "beta", "nll"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-6), name
    sw = class_weights(y[rep])
    assert float(sw.sum()) == pytest.approx(1.0)
    assert float(sw[y[rep] == 0].sum()) == pytest.approx(0.25)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fitted")
    exp = {**EXPERIMENT, "methods": ["retformer", "mlp_only", "knn_vote", "mlp_vote"]}
    exp["select"] = {**EXPERIMENT["select"], "rule_fit": "stack"}
    return {"root": root, "report": run(root, exp)}


def test_fitted_rule_is_recorded_and_the_reloaded_model_reproduces_it(fitted) -> None:
    """Proves the fitted rule lives in the model file: the selection records rule_fit and its val
    likelihood, a gated rule carries L_I's own shift for closed gates, and the reloaded RetFormer
    reproduces the reported val and test top-1."""
    rep = fitted["report"]["methods"]["retformer"]
    sel = rep["selected"]
    assert sel["rule_fit"] == "stack" and sel["val_nll"] > 0
    assert (sel["gate_t"] is None) == (sel["closed_prior_tau"] is None)
    assert min(sel["alpha"], sel["beta"], sel["image_weight"]) >= 0
    ws = Workspace(fitted["root"])
    model = load_model(Path(fitted["root"]) / "runs" / "r" / "retformer.pt")
    for key in ("alpha", "beta", "image_weight", "prior_tau", "evidence", "gate_t", "closed_prior_tau"):
        assert model.config[key] == sel[key], key
    for split, expected in (("val", rep["val"]["top1"]), ("test", rep["top1"])):
        f = load_retrieval_features(ws, "syn", "kbsyn", K, split)
        got = float((predict(model, f).argmax(1) == f.labels).float().mean())
        assert got == pytest.approx(expected, abs=1e-9), split


def test_fitted_selection_reads_no_test_label(fitted, tmp_path: Path) -> None:
    """Proves the fitted rule is chosen on val only: with every test label replaced, the selection
    (weights, epoch, evidence, val figures) is the same; only the test figures move."""
    exp = {**EXPERIMENT, "methods": ["retformer", "mlp_only", "knn_vote", "mlp_vote"]}
    exp["select"] = {**EXPERIMENT["select"], "rule_fit": "stack"}
    n_test = 40
    labels = torch.randint(0, 4, (n_test,), generator=torch.Generator().manual_seed(9)).numpy()
    poisoned = run(tmp_path, exp, test_labels=labels)
    for method in ("retformer", "mlp_vote"):
        a, b = fitted["report"]["methods"][method], poisoned["methods"][method]
        assert a["selected"] == b["selected"] and a["val"] == b["val"], method


def test_mlp_vote_is_the_fitted_rule_without_l_r_and_retformer_can_reach_it(fitted) -> None:
    """Proves mlp_vote is the floor RetFormer is measured against: its rule never reads L_R (alpha 0, no
    L_R trained: no lr, no metrics file), its model file reproduces its figures, and RetFormer's fitted
    selection, whose candidates include these rules, ends at a val likelihood at least as high."""
    methods = fitted["report"]["methods"]
    floor, ours = methods["mlp_vote"]["selected"], methods["retformer"]["selected"]
    assert floor["alpha"] == 0.0 and floor["lr"] is None and floor["rule_fit"] == "stack"
    assert floor["beta"] > 0, "the synthetic KB's vote is informative: the floor uses it"
    assert ours["val_nll"] <= floor["val_nll"] + 1e-9
    root = Path(fitted["root"])
    assert (root / "runs" / "r" / "mlp_vote.metrics.jsonl").read_text() == "", "no epoch trained"
    model = load_model(root / "runs" / "r" / "mlp_vote.pt")
    f = load_retrieval_features(Workspace(root), "syn", "kbsyn", K, "test")
    got = float((predict(model, f).argmax(1) == f.labels).float().mean())
    assert got == pytest.approx(methods["mlp_vote"]["top1"], abs=1e-9)


def test_fitted_selection_logs_its_likelihood_under_its_own_name(fitted) -> None:
    """Proves the metrics file says what the fitted selection tracks: every RetFormer epoch entry has
    `val_loglik_<evidence, gate>` figures (<= 0: log-likelihoods) and none is labelled val top-1, and the
    progress line shows them as `val loglik`."""
    import json

    from retformer.trainer.progress import ModelProgress

    lines = (Path(fitted["root"]) / "runs" / "r" / "retformer.metrics.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries and all(any(k.startswith("val_loglik_") for k in e) for e in entries)
    assert not any(k.startswith("val_top1") for e in entries for k in e)
    assert all(v <= 0 for e in entries for k, v in e.items() if k.startswith("val_loglik_"))
    line = ModelProgress("retformer", total=1, enabled=False)
    line.epoch({k: v for k, v in entries[-1].items() if k.startswith(("loss", "val_"))})
    assert "val loglik -" in line.figures and "val 0" not in line.figures


def test_a_fitted_rule_is_said_with_its_closed_gate_shift() -> None:
    """Proves the rule line of a fitted rule says so and names what predicts where the gate is closed:
    L_I with its own fitted prior shift (closed_prior_tau), not 'L_I alone'."""
    from retformer.pipelines.results import selected_rule_lines

    sel = {"lr": 0.003, "epoch": 0, "alpha": 0.5543, "beta": 0.0, "prior_tau": 0.9771, "image_weight": 1.0627}
    sel |= {"gate_t": 0.789, "gate_quantile": 0.1, "closed_prior_tau": 0.8, "rule_fit": "stack"}
    report = {"methods": {"retformer": {"top1": 0.9, "selected": sel}}}
    (line,) = selected_rule_lines(report)
    assert line == (
        "retformer selected on val: lr 0.003, epoch 0, weights fitted on val; rule 1.0627 * (L_I - 0.9771 "
        "log prior) + [s > 0.789 (val q 0.1)] 0.5543 L_R (L_I - 0.8 log prior where the gate is closed)"
    )


def test_single_source_fallback_takes_a_gated_vote_only_where_it_wins_on_val(fitted, tmp_path: Path) -> None:
    """Proves `select.single_source: l_i_or_vote` is a val-only choice between the fitted rule and the
    single sources: on the same workspace and training, its selection is the default's (L_I fallback only)
    unless a gated vote alone scored higher on val, in which case that vote rule (image weight 0, no L_R,
    L_I where the gate is closed) is selected and its val score is at least the fitted rule's."""
    exp = {**EXPERIMENT, "methods": ["retformer", "mlp_only", "knn_vote", "mlp_vote"]}
    exp["select"] = {**EXPERIMENT["select"], "rule_fit": "stack", "single_source": "l_i_or_vote"}
    both = run(tmp_path, exp)["methods"]
    for method in ("retformer", "mlp_vote"):
        default, fallback = fitted["report"]["methods"][method]["selected"], both[method]["selected"]
        if fallback["source"] == "vote":
            assert fallback["val_score"] >= default["val_score"], method
            assert fallback["image_weight"] == 0 and fallback["alpha"] == 0 and fallback["beta"] == 1.0
            assert fallback["gate_t"] is not None and fallback["closed_prior_tau"] is not None
        else:
            assert fallback == default, method
    # With a gain no fitted rule can show (min_gain 50 points), only the single sources remain: the default
    # takes L_I alone; l_i_or_vote the gated vote, which beats L_I on val here (the KB's rows sit near the
    # class centres), and the reloaded model predicts with it.
    exp["select"] = {**exp["select"], "min_gain": 50.0}
    singles = run(tmp_path / "singles", exp)["methods"]["retformer"]
    exp["select"] = {**exp["select"], "single_source": "l_i"}
    plain = run(tmp_path / "plain", exp)["methods"]["retformer"]
    assert plain["selected"]["source"] == "l_i" and singles["selected"]["source"] == "vote"
    assert singles["selected"]["val_score"] > plain["selected"]["val_score"]
    model = load_model(tmp_path / "singles" / "runs" / "r" / "retformer.pt")
    f = load_retrieval_features(Workspace(tmp_path / "singles"), "syn", "kbsyn", K, "test")
    got = float((predict(model, f).argmax(1) == f.labels).float().mean())
    assert got == pytest.approx(singles["top1"], abs=1e-9) and got != pytest.approx(plain["top1"], abs=1e-9)
