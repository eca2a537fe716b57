"""Model selection on a validation split: every choice here reads `val`; the eval split is never passed in.

- baselines (`linear_probe`, `mlp_only`): lr grid x `baseline_epochs`, best-on-val epoch per lr, then the
  best lr on val (ties: the smaller lr, the earlier epoch);
- RetFormer, recipe "stacked" (docs/method-notes.md on branch method-research): L_I = the selected
  mlp_only's weights, frozen; L_R trained on its own cross-entropy, with logit adjustment la_tau as a grid
  option; per (lr, la_tau) cell and per alpha the best-on-val checkpoint; then the prediction rule
  L_I + alpha * 1[s > t] * L_R is chosen on val among the admissible ones: val top-1 with neighbours
  shuffled across queries >= L_I's val top-1 - `tolerance` points. alpha = 0 (L_I alone) always is, so
  the model is never below its own mlp_only on val. Ties go to the smaller alpha, the laxer gate, the
  earlier grid cell. alpha and t are stored in `model.config`, so a reloaded model predicts the same;
- RetFormer, recipe "paper": the manifest's `train:` run, best-on-val epoch;
- knn_vote: k on val.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from artifacts.atomic import atomic_path
from trainer.baselines import knn_vote
from trainer.checkpoint import CHECKPOINT_FORMAT
from trainer.config import SelectOptions
from trainer.evaluate import evaluate
from trainer.features import RetrievalFeatures
from trainer.model import RetFormer, build_model, relevance
from trainer.train import TrainConfig, fit, predict


def shuffled(features: RetrievalFeatures, seed: int) -> RetrievalFeatures:
    """Each query gets another query's neighbour list (a seeded permutation in which nobody keeps its
    own): the irrelevant-neighbour control any dataset gives for free."""
    n = len(features)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    same = perm == torch.arange(n)
    perm[same] = (perm[same] + 1) % max(n, 1)
    return replace(features, nn_rows=features.nn_rows[perm], nn_score=features.nn_score[perm])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction, rounded to 6 decimals like every recorded figure (argmax ties to
    the lowest class, as `evaluate`)."""
    return round(float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean()), 6)


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


def _train_tracked(
    model: nn.Module,
    train: RetrievalFeatures,
    config: TrainConfig,
    score: Any,
    class_counts: Any,
) -> _Best:
    """fit() with score() -> {key: val top-1} after every epoch; the best state per key is kept."""
    best, epoch = _Best(), [0]

    def on_epoch() -> dict[str, Any]:
        epoch[0] += 1
        scores = score()
        for key, acc in scores.items():
            best.offer(key, epoch[0], acc, model)
        return {f"val_top1_{key}": acc for key, acc in scores.items()}

    fit(model, train, config, on_epoch=on_epoch, class_counts=class_counts, progress=False)
    return best


@dataclass(frozen=True)
class Task:
    """What a selection trains: the model kind, train and val features, the base TrainConfig (the
    manifest's `train:`), the number of classes, the `model:` options and the train class counts."""

    kind: str
    train: RetrievalFeatures
    val: RetrievalFeatures
    base: TrainConfig
    num_classes: int
    model_options: dict[str, Any]
    class_counts: Any = None

    def build(self, **options: Any) -> nn.Module:
        """A fresh model, seeded by the base config (every grid cell starts from the same weights)."""
        torch.manual_seed(self.base.seed)
        f = self.train
        return build_model(
            self.kind, self.num_classes, f.img_dim, f.txt_dim, f.k, **self.model_options, **options
        )


def select_plain(task: Task, lrs: tuple[float, ...], epochs: int, **options: Any) -> Selected:
    """A model trained at each lr for `epochs`, its best-on-val epoch, then the best lr on val.
    options: extra model options (e.g. recipe)."""
    train, val = task.train, task.val
    chosen: tuple[float, int, float, dict] | None = None
    trials = []
    model = None
    for lr in lrs:
        config = replace(task.base, lr=lr, epochs=epochs)
        model = task.build(**options)

        def score(m: nn.Module = model) -> dict[str, float]:
            return {"model": top1(predict(m, val), val.labels)}

        best = _train_tracked(model, train, config, score, task.class_counts)
        ep, acc, state = best.best["model"]
        trials.append({"lr": lr, "epoch": ep, "val_top1": acc})
        if chosen is None or acc > chosen[2]:
            chosen = (lr, ep, acc, state)
    assert chosen is not None and model is not None, "lrs must not be empty"
    model.load_state_dict(chosen[3])
    model.eval()
    return Selected(model, {"lr": chosen[0], "epoch": chosen[1]}, chosen[2], trials)


@torch.inference_mode()
def branch_logits(
    model: RetFormer, features: RetrievalFeatures, batch_size: int = 1024, with_relevance: bool = True
) -> tuple[torch.Tensor, ...]:
    """(L_I, L_R, s) of every query: the branches before they are combined, and the relevance s
    (with_relevance=False: (L_I, L_R) only; s does not depend on the model, `relevance_of` computes it
    once per split)."""
    model.eval()
    out: list[tuple[torch.Tensor, ...]] = []
    device = next(model.parameters()).device
    features.make_resident()  # read every epoch of a selection: its neighbours are gathered once
    for start in range(0, len(features), batch_size):
        stop = min(start + batch_size, len(features))
        b = {k: v.to(device) for k, v in features.inputs(start, stop).items()}
        li, lr = model.branches(b["z"], b["nn_img"], b["nn_txt"])
        parts = (li.float().cpu(), lr.float().cpu())
        if with_relevance:
            parts += (relevance(b["z"], b["nn_img"]).float().cpu(),)
        out.append(parts)
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))


@torch.inference_mode()
def relevance_of(features: RetrievalFeatures, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """s (N,) of every query, computed on `device` in `branch_logits`' batches: its values, bit for bit."""
    features.make_resident()
    out = []
    for start in range(0, len(features), batch_size):
        b = features.inputs(start, min(start + batch_size, len(features)))
        out.append(relevance(b["z"].to(device), b["nn_img"].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _rule_logits(model: RetFormer, branches: tuple[torch.Tensor, ...], alpha: float, t: float | None) -> Any:
    """The model's own combine() under the rule (alpha, t): one formula for selection and prediction."""
    model.config.update(alpha=alpha, gate_t=t)
    li, lr, s = branches
    return model.combine(li, lr, s)


def select_stacked(task: Task, mlp_state: dict[str, torch.Tensor], opts: SelectOptions) -> Selected:
    """The stacked RetFormer (any variant, task.kind), every choice on val: see the module docstring.
    mlp_state: the selected mlp_only's `mlp` weights (L_I)."""
    train, val = task.train, task.val
    val_sh = shuffled(val, opts.shuffle_seed)
    y = val.labels
    candidates, trials = [], []
    model = None
    s_pair: tuple[torch.Tensor, torch.Tensor] | None = None  # s over val and over shuffled val
    for cell, (lr, la_tau) in enumerate(opts.retformer_grid):
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

        def score(m: RetFormer = model) -> dict[float, float]:
            li, lr_ = branch_logits(m, val, with_relevance=False)
            return {a: top1(li + a * lr_, y) for a in opts.alphas}

        best = _train_tracked(model, train, config, score, task.class_counts)
        if s_pair is None:  # s reads only the features: once per selection, not once per state
            device = next(model.parameters()).device
            s_pair = relevance_of(val, device), relevance_of(val_sh, device)
        by_epoch: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        for alpha, (epoch, _, state) in sorted(best.best.items()):
            model.load_state_dict(state)
            if epoch not in by_epoch:  # alphas whose best epoch is the same share its weights
                by_epoch[epoch] = (
                    (*branch_logits(model, val, with_relevance=False), s_pair[0]),
                    (*branch_logits(model, val_sh, with_relevance=False), s_pair[1]),
                )
            plain, mixed = by_epoch[epoch]
            l_i = top1(plain[0], y)
            s_val = plain[2]
            for rank, q in enumerate(opts.gate_quantiles if alpha else (None,)):
                t = None if q is None else float(torch.quantile(s_val, q))
                row = {
                    "lr": lr,
                    "la_tau": la_tau,
                    "epoch": epoch,
                    "alpha": alpha,
                    "gate_quantile": q,
                    "gate_t": t,
                    "val_top1": top1(_rule_logits(model, plain, alpha, t), y),
                    "val_shuffled_top1": top1(_rule_logits(model, mixed, alpha, t), y),
                    "l_i_val_top1": l_i,
                }
                trials.append(row)
                # tolerance is in top-1 points; 1e-9: 0.81 - 0.01 is a hair above 0.8 in floating point
                if row["val_shuffled_top1"] >= row["l_i_val_top1"] - opts.tolerance / 100 - 1e-9:
                    candidates.append(((-row["val_top1"], alpha, rank, cell), row, state))
    assert model is not None and candidates, "alpha 0 is always admissible"
    _, row, state = min(candidates, key=lambda c: c[0])
    model.load_state_dict(state)
    model.config.update(alpha=row["alpha"], gate_t=row["gate_t"])
    model.eval()
    return Selected(model, {k: v for k, v in row.items() if k != "val_top1"}, row["val_top1"], trials)


def select_knn_k(
    val: RetrievalFeatures, num_classes: int, ks: tuple[int, ...]
) -> tuple[int, float, list[dict[str, Any]]]:
    """k of the kNN vote on val, the grid capped by the table's k, ties to the smaller k.
    Returns (k, val top-1, trials)."""
    grid = sorted({min(k, val.k) for k in ks})
    trials = [{"k": k, "val_top1": top1(knn_vote(val.subset_k(k), num_classes), val.labels)} for k in grid]
    best = max(trials, key=lambda r: (r["val_top1"], -r["k"]))
    return best["k"], best["val_top1"], trials


def val_metrics(logits: torch.Tensor, labels: torch.Tensor, shot_split: dict | None) -> dict[str, Any]:
    """The val figures a result records: top1, top5, many / medium / few."""
    m = evaluate(logits, labels, shot_split)
    return {k: m.get(k) for k in ("top1", "top5", "many", "medium", "few")}


def save_selected(path: Any, sel: Selected) -> None:
    """The selected model as a checkpoint `trainer.checkpoint.load_model` rebuilds: its config (alpha and
    gate_t included, so the reloaded model predicts the same), weights and selected hyper-parameters."""
    with atomic_path(path) as tmp:
        state = {"format": CHECKPOINT_FORMAT, "model_config": sel.model.config}
        state["model_state"] = sel.model.state_dict()
        torch.save({**state, "selected": sel.selected, "val_top1": sel.val_top1}, tmp)
