"""Model selection on a validation split: every choice here reads `val`; the eval split is never passed in.

Every choice maximises `select_metric` on val: "balanced" (mean per-class accuracy, the default: what a
class-balanced test reports, while a val held out of long-tailed training data is long-tailed itself)
or "top1". Recorded figures keep `val_top1` beside the criterion (`val_score`).

- `mlp_only`: lr grid x `baseline_epochs`, best-on-val epoch per lr, then the best lr on val (ties: the
  smaller lr, the earlier epoch), then its post-hoc logit adjustment tau (logits - tau log prior) on val;
- `linear_probe`: a logistic regression per L2 strength in `probe_l2`, then the same adjustment
  (trainer/logistic_probe.py);
- RetFormer, recipe "stacked" (docs/method-notes.md): L_I = the selected mlp_only's weights, frozen; L_R
  trained on its own cross-entropy (optionally anchored: log of the neighbours' vote plus a residual head
  that starts at zero, `anchor`), with logit adjustment la_tau as a grid option; per (lr, la_tau) cell
  and per alpha the best-on-val checkpoint, epoch 0 (the untrained L_R: the vote itself when anchored)
  a candidate too; then the prediction rule
  w (L_I - prior_tau log prior) + 1[s > t] (alpha L_R + beta log e), w = image_weight where s > t and
  1 elsewhere (w 0 with a gate: retrieval alone where it is relevant), e the neighbours'
  similarity-weighted vote of their KB labels (where the KB is labelled with the dataset's classes) or
  of the classes their captions name (trainer/evidence.py), is chosen on val among the admissible
  rules: val criterion with neighbours shuffled across queries >= L_I's at its best prior adjustment -
  `tolerance` points. alpha = beta = 0 (L_I alone) at that adjustment always is, so the model is never
  below its own mlp_only on val. Ties go to the smaller alpha, the smaller beta, the larger image
  weight, the smaller prior adjustment, the laxer gate, the earlier grid cell. The rule is the model's
  (`model.set_rule`), saved in its config, so a reloaded model predicts the same;
- RetFormer, recipe "paper": the manifest's `train:` run, best-on-val epoch;
- knn_vote: k on val; knn_weighted and caption_vote: k and the vote temperature on val.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from retformer.trainer.config import FusionOptions, SelectOptions
from retformer.trainer.evidence import ClassText
from retformer.trainer.feature_batches import map_batches
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.image_models import MLPOnly
from retformer.trainer.model import RetFormer, relevance
from retformer.trainer.model_factory import build_model
from retformer.trainer.select_votes import select_vote, split_evidence
from retformer.trainer.train import TrainConfig, fit, predict
from retformer.trainer.val_criteria import criterion, top1


def shuffled(features: RetrievalFeatures, seed: int) -> RetrievalFeatures:
    """Each query gets another query's neighbour list (a seeded permutation in which nobody keeps its
    own): the irrelevant-neighbour control any dataset gives for free."""
    n = len(features)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    same = perm == torch.arange(n)
    perm[same] = (perm[same] + 1) % max(n, 1)
    return replace(features, nn_rows=features.nn_rows[perm], nn_score=features.nn_score[perm])


@dataclass
class Selected:
    """A selected model (best state loaded), its hyper-parameters and the val figure they won with."""

    model: nn.Module
    selected: dict[str, Any]
    val_top1: float
    trials: list[dict[str, Any]] = field(default_factory=list)


class _Best:
    """Best-on-val (epoch, top-1, state) per key; strictly better only, so ties keep the earlier epoch."""

    def __init__(self) -> None:
        self.best: dict[Any, tuple[int, float, dict[str, torch.Tensor]]] = {}

    def offer(self, key: Any, epoch: int, acc: float, model: nn.Module) -> None:
        if key not in self.best or acc > self.best[key][1]:
            self.best[key] = (epoch, acc, copy.deepcopy(model.state_dict()))


def train_tracked(
    model: nn.Module,
    train: RetrievalFeatures,
    config: TrainConfig,
    score: Any,
    class_counts: Any,
    from_epoch_zero: bool = False,
    figure: str = "val_top1",
) -> _Best:
    """fit() with score() -> {key: val figure, higher is better} after every epoch; the best state per
    key is kept. from_epoch_zero: the weights before training (epoch 0) are a candidate too. figure: what
    the scores are, the name of the per-epoch entries (`<figure>_<key>`) in the metrics file."""
    best, epoch = _Best(), [-1 if from_epoch_zero else 0]

    def on_epoch() -> dict[str, Any]:
        epoch[0] += 1
        scores = score()
        for key, acc in scores.items():
            best.offer(key, epoch[0], acc, model)
        return {f"{figure}_{key}": acc for key, acc in scores.items()}

    if from_epoch_zero:
        on_epoch()
    fit(model, train, config, on_epoch=on_epoch, class_counts=class_counts, progress=False)
    return best


@dataclass(frozen=True)
class Task:
    """What a selection trains: the model kind, train and val features, the base TrainConfig (the
    manifest's `train:`), the number of classes, the `model:` options and the train class counts;
    `metric` the val criterion; the neighbours' evidence RetFormer's rule may use: `label_evidence`
    (the KB is labelled with the dataset's classes) and `class_text` (class-name prompt vectors of the
    KB's text tower and its caption centre, `evidence.ClassText`, for caption evidence; None: none)."""

    kind: str
    train: RetrievalFeatures
    val: RetrievalFeatures
    base: TrainConfig
    num_classes: int
    model_options: FusionOptions
    class_counts: Any = None
    metric: str = "balanced"
    label_evidence: bool = False
    class_text: ClassText | None = None

    def build(self, **options: Any) -> nn.Module:
        """A fresh model, seeded by the base config (every grid cell starts from the same weights), with
        the training prior and the class-name vectors its rule may read. options: `FusionOptions` fields
        that differ from the task's (e.g. recipe)."""
        torch.manual_seed(self.base.seed)
        f = self.train
        opts = replace(self.model_options, **options)
        if opts.anchor == "auto":  # the anchor vote reads the evidence this task has, if any
            kinds = self.evidence_kinds()
            opts = replace(opts, anchor=kinds[0] if kinds else None)
        model = build_model(self.kind, self.num_classes, f.img_dim, f.txt_dim, f.k, opts)
        if self.class_counts is not None and hasattr(model, "set_prior"):
            model.set_prior(self.class_counts)
        if self.class_text is not None and hasattr(model, "set_class_text"):
            model.set_class_text(self.class_text)
        return model

    def evidence_kinds(self) -> list[str]:
        """The evidence RetFormer's rule may add: KB labels where usable, else captions (with prompts)."""
        if self.label_evidence:
            return ["label"]
        return ["caption"] if self.class_text is not None else []


def select_plain(
    task: Task, lrs: tuple[float, ...], epochs: int, prior_taus: tuple[float, ...] = (0.0,), **options: Any
) -> Selected:
    """A model trained at each lr for `epochs`, its best-on-val epoch, then the best lr on val; then
    (a model with a post-hoc prior adjustment: mlp_only) the adjustment tau in `prior_taus` on val.
    options: extra model options (e.g. recipe)."""
    train, val = task.train, task.val
    score_of = criterion(task.metric)
    chosen: tuple[float, int, float, dict] | None = None
    trials = []
    model = None
    for lr in lrs:
        config = replace(task.base, lr=lr, epochs=epochs)
        model = task.build(**options)

        def score(m: nn.Module = model) -> dict[str, float]:
            return {"model": score_of(predict(m, val), val.labels)}

        best = train_tracked(model, train, config, score, task.class_counts)
        ep, acc, state = best.best["model"]
        trials.append({"lr": lr, "epoch": ep, "val_score": acc})
        if chosen is None or acc > chosen[2]:
            chosen = (lr, ep, acc, state)
    assert chosen is not None and model is not None, "lrs must not be empty"
    model.load_state_dict(chosen[3])
    model.eval()
    selected: dict[str, Any] = {"lr": chosen[0], "epoch": chosen[1]}
    if isinstance(model, MLPOnly):
        raw = predict(model, val)  # prior_tau is 0 while training: the unadjusted logits
        tau = best_prior_tau(raw, model.log_prior, val.labels, prior_taus, score_of)
        model.set_prior_tau(tau)
        selected["prior_tau"] = float(tau)
    val_logits = predict(model, val)
    selected["val_score"] = score_of(val_logits, val.labels)
    return Selected(model, selected, top1(val_logits, val.labels), trials)


def best_prior_tau(
    raw: torch.Tensor, log_prior: torch.Tensor, labels: torch.Tensor, taus: tuple[float, ...], score_of: Any
) -> float:
    """The post-hoc prior adjustment tau in `taus` whose logits raw - tau * log_prior score best on val
    (ties: the earlier tau): mlp_only's choice, and RetFormer's "L_I alone" rule, which is mlp_only's.
    raw: `predict`'s CPU logits; log_prior may be the model's buffer, still on the GPU it trained on."""
    log_prior = log_prior.to(raw)
    _, _, tau = max((score_of(raw - tau * log_prior, labels), -i, tau) for i, tau in enumerate(taus))
    return float(tau)


@torch.inference_mode()
def branch_logits(
    model: RetFormer, features: RetrievalFeatures, batch_size: int = 1024, with_relevance: bool = True
) -> tuple[torch.Tensor, ...]:
    """(L_I, L_R, s) of every query: the branches before they are combined, and the relevance s
    (with_relevance=False: (L_I, L_R) only; s does not depend on the model, `relevance_of` computes it
    once per split)."""
    model.eval()
    device = next(model.parameters()).device
    features.make_resident()  # read every epoch of a selection: its neighbours are gathered once

    def parts(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        li, lr = model.branches(b["z"], b["nn_img"], b["nn_txt"], b.get("nn_label"))
        out = (li.float().cpu(), lr.float().cpu())
        if with_relevance:
            out += (relevance(b["z"], b["nn_img"]).float().cpu(),)
        return out

    return map_batches(features, parts, batch_size, tuple, device=device)


@torch.inference_mode()
def relevance_of(features: RetrievalFeatures, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """s (N,) of every query, computed on `device` in `branch_logits`' batches: its values, bit for bit."""
    features.make_resident()
    return map_batches(
        features,
        lambda b: relevance(b["z"].to(device), b["nn_img"].to(device)).float().cpu(),
        batch_size,
        lambda: torch.zeros(0),
    )


def rule_logits(
    model: RetFormer, branches: tuple[torch.Tensor, ...], rule: dict[str, Any], log_e: Any
) -> Any:
    """The model's own combine() under `rule` (alpha, gate_t, beta, prior_tau, evidence, vote_temp,
    image_weight; its gate_quantile is a record, not a setting), which becomes the model's rule: one formula
    for selection and prediction."""
    model.set_rule(replace(model.rule, **{k: v for k, v in rule.items() if k != "gate_quantile"}))
    li, lr, s = branches
    return model.combine(li, lr, s, log_e)


def _rule_grid(
    alpha: float,
    opts: SelectOptions,
    evidence: list[tuple[str, float, int]],
    s_val: torch.Tensor,
    default_temp: float,
) -> list[tuple[dict[str, Any], tuple[float, ...]]]:
    """Every prediction rule with this alpha: (rule, tie ranks), the ranks preferring the smaller alpha,
    the smaller beta, the full image weight, the smaller prior adjustment and the laxer gate. beta > 0
    reads each evidence (kind, vote temperature, vote k); an image weight below 1 only with a gate
    (where the gate is closed L_I predicts alone, so the rule stays defined for every image) and a
    retrieval term."""
    out = []
    for tau_rank, prior_tau in enumerate(opts.prior_taus):
        for beta in opts.betas:
            for kind, temp, vote_k in evidence if beta else [(None, default_temp, None)]:
                retrieval = bool(alpha or beta)
                for rank, q in enumerate(opts.gate_quantiles if retrieval else (None,)):
                    t = None if q is None else float(torch.quantile(s_val, q))
                    weights = opts.image_weights if (retrieval and q is not None) else (1.0,)
                    for w in sorted(weights, reverse=True):
                        rule = {"alpha": alpha, "gate_t": t, "beta": beta, "prior_tau": prior_tau}
                        rule |= {"evidence": kind, "vote_temp": temp, "vote_k": vote_k}
                        rule |= {"image_weight": w, "gate_quantile": q}
                        out.append((rule, (alpha, beta, -w, tau_rank, rank)))
    return out


def stacked_cell(
    task: Task, mlp_state: dict[str, torch.Tensor], opts: SelectOptions, lr: float, la_tau: float
) -> tuple[RetFormer, TrainConfig]:
    """A fresh stacked RetFormer of one (lr, la_tau) grid cell, L_I the selected mlp_only's weights,
    frozen, and the TrainConfig its L_R trains with."""
    config = replace(
        task.base,
        lr=lr,
        epochs=int(opts.retformer_epochs),  # type: ignore[arg-type]  # for_dataset() resolved it
        loss="logit_adjusted" if la_tau else "ce",
        la_tau=la_tau,
    )
    model = task.build(recipe="stacked")
    model.mlp.load_state_dict(mlp_state)
    model.mlp.requires_grad_(False)  # L_I is the selected mlp_only; the optimizer skips it
    return model, config


def rule_evidence(
    task: Task, model: RetFormer, val_shuffled: RetrievalFeatures, opts: SelectOptions
) -> dict[tuple[str, float, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(kind, vote temperature, vote k): (log evidence on val, on `val_shuffled`)} of every evidence the
    task's rule may add. The vote is the weighted-vote baseline of that evidence (knn_weighted,
    caption_vote), its (k, T) chosen on val the same way, so beta alone reaches it."""
    val, out = task.val, {}
    for kind in task.evidence_kinds():
        chosen, _, _ = select_vote(val, task.num_classes, kind, opts, model.class_reader(), task.metric)
        k, temp = chosen["k"], chosen["vote_temp"]
        out[(kind, temp, k)] = (
            split_evidence(model, val, kind, temp, k),
            split_evidence(model, val_shuffled, kind, temp, k),
        )
    return out


def select_stacked(task: Task, mlp_state: dict[str, torch.Tensor], opts: SelectOptions) -> Selected:
    """The stacked RetFormer (any variant, task.kind), every choice on val: see the module docstring.
    mlp_state: the selected mlp_only's `mlp` weights (L_I)."""
    train, val = task.train, task.val
    score_of = criterion(task.metric)
    val_sh = shuffled(val, opts.shuffle_seed)
    y = val.labels
    candidates, trials = [], []
    model = None
    s_pair: tuple[torch.Tensor, torch.Tensor] | None = None  # s over val and over shuffled val
    evidence: dict[tuple[str, float, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for cell, (lr, la_tau) in enumerate(opts.retformer_grid):
        model, config = stacked_cell(task, mlp_state, opts, lr, la_tau)

        def score(m: RetFormer = model) -> dict[float, float]:
            li, lr_ = branch_logits(m, val, with_relevance=False)
            return {a: score_of(li + a * lr_, y) for a in opts.alphas}

        best = train_tracked(model, train, config, score, task.class_counts, from_epoch_zero=True)
        if s_pair is None:  # s and the evidence read only the features: once per selection
            device = next(model.parameters()).device
            s_pair = relevance_of(val, device), relevance_of(val_sh, device)
            evidence = rule_evidence(task, model, val_sh, opts)
        prior = model.log_prior.float().cpu()
        by_epoch: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        for alpha, (epoch, _, state) in sorted(best.best.items()):
            model.load_state_dict(state)
            if epoch not in by_epoch:  # alphas whose best epoch is the same share its weights
                by_epoch[epoch] = (
                    (*branch_logits(model, val, with_relevance=False), s_pair[0]),
                    (*branch_logits(model, val_sh, with_relevance=False), s_pair[1]),
                )
            plain, mixed = by_epoch[epoch]
            s_val = plain[2]
            # The control's reference: L_I at its best prior adjustment (the selected mlp_only's figure),
            # not at the row's own adjustment; a rule whose over-adjusted L_I is weak must not pass the
            # shuffled-neighbour check against that weak figure.
            l_i = max(score_of(plain[0] - tau * prior, y) for tau in opts.prior_taus)
            for rule, ranks in _rule_grid(alpha, opts, list(evidence), s_val, model.rule.vote_temp):
                key = (rule["evidence"], rule["vote_temp"], rule["vote_k"])
                e_plain, e_mixed = evidence.get(key, (None, None))
                rule_val = rule_logits(model, plain, rule, e_plain)
                row = {
                    "lr": lr,
                    "la_tau": la_tau,
                    "epoch": epoch,
                    **rule,
                    "val_score": score_of(rule_val, y),
                    "val_top1": top1(rule_val, y),
                    "val_shuffled_score": score_of(rule_logits(model, mixed, rule, e_mixed), y),
                    "l_i_val_score": l_i,
                }
                trials.append(row)
                # tolerance is in points; 1e-9: 0.81 - 0.01 is a hair above 0.8 in floating point
                if row["val_shuffled_score"] >= row["l_i_val_score"] - opts.tolerance / 100 - 1e-9:
                    candidates.append(((-row["val_score"], *ranks, cell), row, state))
    assert model is not None and candidates, "alpha = beta = 0 is always admissible"
    _, row, state = min(candidates, key=lambda c: c[0])
    plain = [c for c in candidates if not c[1]["alpha"] and not c[1]["beta"]]
    if (row["alpha"] or row["beta"]) and plain and opts.min_gain > 0:
        # Retrieval only where it buys more than min_gain points on val over the best rule without it
        # (a small gain on a few hundred val images is within their noise).
        _, plain_row, plain_state = min(plain, key=lambda c: c[0])
        if row["val_score"] < plain_row["val_score"] + opts.min_gain / 100 - 1e-9:
            row, state = plain_row, plain_state
    model.load_state_dict(state)
    rule_keys = ("alpha", "gate_t", "beta", "prior_tau", "evidence", "vote_temp", "vote_k", "image_weight")
    model.set_rule(replace(model.rule, **{key: row[key] for key in rule_keys}))
    model.eval()
    selected = {k: v for k, v in row.items() if k != "val_top1"}
    return Selected(model, selected, row["val_top1"], trials)
