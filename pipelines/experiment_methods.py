"""One method of an experiment, run on its features: trained (feature or fine-tune mode), selected on
val, voted, or zero-shot (`run_method` dispatches); its metrics and scores per eval split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import safe_name
from retformer.pipelines.experiment_context import ExperimentContext
from retformer.pipelines.experiment_plan import train_config
from retformer.pipelines.experiment_schema import ExperimentManifest, ZeroshotSection, given
from retformer.trainer import distributed
from retformer.trainer.baselines import class_means, knn_vote, ncm_scores, vote_threads
from retformer.trainer.checkpoint import save_model
from retformer.trainer.config import FusionOptions
from retformer.trainer.evaluate import evaluate
from retformer.trainer.methods import METHODS, RETRIEVAL_FREE, select_method, train_method
from retformer.trainer.progress import ModelProgress, listening, tracking
from retformer.trainer.select_votes import select_knn_k, select_vote, vote_scores
from retformer.trainer.selection import shuffled
from retformer.trainer.train import intra_op_threads, predict
from retformer.trainer.val_criteria import val_metrics
from retformer.trainer.zeroshot import prompt_class_names, zeroshot_logits, zeroshot_weights

log = logging.getLogger(__name__)


def selects(exp: ExperimentManifest, method: str) -> bool:
    """Whether the experiment chooses this method's settings on its select split (feature-mode training
    and the votes, when there is a select split)."""
    return exp.select_split is not None and METHODS[method].mode in ("frozen", "vote")


def run_method(
    ctx: ExperimentContext,
    plan: dict[str, Any],
    method: str,
    key: str,
    k: int,
    features: tuple[Any, Any, dict[str, Any]],
    zs_evals: dict[str, tuple[Any, Any]],
    run_dir: Path,
) -> dict[str, dict[str, Any]] | str:
    """One method's metrics per eval split (each with its `_scores`; `<split>:shuffled` controls too),
    or why it is skipped. features: (train, val or None, eval split -> features) at this k; zs_evals:
    split -> (image embeddings, labels), what zero-shot reads."""
    train_f, val_f, evals = features
    if method in ("knn_weighted", "caption_vote"):
        return _weighted_vote(ctx, plan, method, train_f, val_f, evals)
    if method == "knn_vote":
        return _knn(ctx, plan, k, train_f, val_f, evals)
    if method == "ncm":
        return _ncm(ctx, train_f, val_f, evals)
    if selects(ctx.exp, method):
        return _select_trained(ctx, plan, method, key, train_f, val_f, evals, run_dir)
    if method == "zeroshot":
        return _zeroshot(ctx, zs_evals)
    config = plan["configs"].get(method)
    return _train_method(ctx, method, key, k, config, train_f, evals, run_dir, plan["checkpoint"])


def _zeroshot(ctx: ExperimentContext, evals: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics per eval split; evals: split -> (image embeddings, labels)."""
    from retformer.kb_builder.encoders import build_text_encoder

    names = ctx.info["class_names"]
    if len(names) != int(ctx.info["num_classes"]):
        raise UserError(f"zeroshot.class_names has {len(names)} names for {ctx.info['num_classes']} classes")
    names = prompt_class_names(names, ctx.ds.kind)
    text = build_text_encoder(ctx.kb.encoders.text)
    template_set = (ctx.exp.zeroshot or ZeroshotSection()).templates
    weights = zeroshot_weights(text, names, template_set)
    out = {}
    for split, (img, labels) in evals.items():
        out[split] = _scored(zeroshot_logits(img, weights), labels, ctx.info["shot_split"])
        out[split].update({"mode": "zeroshot", "templates": template_set})
    return out


def _train_method(
    ctx: ExperimentContext,
    method: str,
    key: str,
    k: int,
    config: Any,
    train_f: Any,
    evals: dict[str, Any],
    run_dir: Path,
    policy: dict | None,
) -> dict[str, dict[str, Any]]:
    """Train one method (feature or fine-tune mode) with checkpoints; its metrics per eval split."""

    with tracking(ModelProgress(key, config.epochs, enabled=ctx.progress)):
        logits, epochs = train_method(
            method,
            config,
            train_f,
            evals,
            model_options=FusionOptions(**given(ctx.exp.model)),
            num_classes=int(ctx.info["num_classes"]),
            k=k,
            class_counts=ctx.class_counts,
            log_path=run_dir / f"{safe_name(key)}.metrics.jsonl",
            weights_path=run_dir / f"{safe_name(key)}.pt",
            checkpoint_path=run_dir / f"{safe_name(key)}.ckpt.pt" if policy else None,
            checkpoint_every_s=policy["every_s"] if policy else 0.0,
            progress=ctx.progress,
            image_encoder=lambda: ctx.image_encoder(config.seed),
            images=lambda split, f: ctx.images(split, f.uids, config.images),
            save=lambda model, path: _save_main(path, model, ctx.model_info(method, key, k, config)),
        )
    out = {}
    for split, f in evals.items():
        out[split] = _scored(logits[split], f.labels, ctx.info["shot_split"])
        out[split].update({"mode": METHODS[method].mode, "epochs": epochs})
        if method not in RETRIEVAL_FREE:
            out[split]["k"] = k
    return out


def _save_main(path: Path, model: Any, info: dict[str, Any]) -> None:
    """save_model on rank 0 only (under torchrun every rank holds the same trained model)."""
    if distributed.is_main():
        save_model(path, model, info)


def selection_inputs(ctx: ExperimentContext, opts: Any, class_counts: list[int] | None) -> dict[str, Any]:
    """The keyword arguments every `select_method` of this experiment shares: the model options, the
    number of classes, the training class counts (the prior the heads learn), the select options."""
    return {
        "model_options": FusionOptions(**given(ctx.exp.model)),
        "num_classes": int(ctx.info["num_classes"]),
        "class_counts": class_counts,
        "opts": opts,
    }


def mlp_only_config(ctx: ExperimentContext, plan: dict[str, Any]) -> Any:
    """The TrainConfig mlp_only is selected with (the plan's, else the experiment's `train:` for it)."""
    return plan["configs"].get("mlp_only") or train_config(ctx.exp, "mlp_only")


def select_mlp_only(
    ctx: ExperimentContext, plan: dict[str, Any], train_f: Any, val_f: Any, class_counts: list[int] | None
) -> Any:
    """The mlp_only baseline selected on `train_f` (its lr grid, best-on-val epoch, prior adjustment):
    the experiment's own mlp_only, and the KB episodes' admission check (`pipelines.experiment_episodes`)."""
    config = mlp_only_config(ctx, plan)
    inputs = selection_inputs(ctx, plan["select"], class_counts)
    return select_method("mlp_only", "paper", config, train_f, val_f, mlp_only=None, **inputs)


@dataclass
class RecordedSelection:
    """A selection fitted under its own console line with every epoch's metrics line kept, so that a run
    whose own model it turns out to be takes it as fitted there (`replay`) instead of fitting it again."""

    selection: Any
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def val_score(self) -> float:
        """The selected model's val score (the experiment's select_metric), rounded as eval.json keeps it."""
        return round(float(self.selection.selected["val_score"]), 6)

    def replay(self, progress: ModelProgress) -> None:
        """Report the recorded fits to `progress` (its console line, metrics file and epoch listeners such
        as --tensorboard) as they were reported while trained: one begin_fit per fit, then its epochs."""
        fits: dict[int, list[dict[str, Any]]] = {}
        for line in self.epochs:
            fits.setdefault(line["fit"], []).append(line)
        for lines in fits.values():
            summary = lines[0]["fit_config"]
            progress.begin_fit(int(summary.get("epochs", len(lines))), summary=summary)
            for line in lines:
                progress.epoch({k: v for k, v in line.items() if k not in ("fit", "fit_config")})


def select_mlp_only_recorded(
    ctx: ExperimentContext,
    plan: dict[str, Any],
    train_f: Any,
    val_f: Any,
    class_counts: list[int] | None,
    name: str,
) -> RecordedSelection:
    """`select_mlp_only` under a console line of its own called `name`, its epochs recorded (a check
    that fits for minutes at 100 classes says so; the run's mlp_only may replay it)."""
    recorded = RecordedSelection(selection=None)
    with (
        listening(lambda _name, _n, line: recorded.epochs.append(line)),
        tracking(ModelProgress(name, _grid_epochs("mlp_only", plan, None), ctx.progress)),
    ):
        recorded.selection = select_mlp_only(ctx, plan, train_f, val_f, class_counts)
    return recorded


def _select_trained(
    ctx: ExperimentContext,
    plan: dict[str, Any],
    method: str,
    key: str,
    train_f: Any,
    val_f: Any,
    evals: dict[str, Any],
    run_dir: Path,
) -> dict[str, dict[str, Any]]:
    """A feature-mode method selected on val, then evaluated once on each eval split. RetFormer variants
    also get their eval split with shuffled neighbours (`<split>:shuffled`)."""
    shot = ctx.info["shot_split"]
    opts = plan["select"]
    common = selection_inputs(ctx, opts, ctx.class_counts)

    def line(name: str, cfg: Any) -> ModelProgress:
        # One console line per model over its whole grid; every fit's epochs in <name>.metrics.jsonl.
        total = _grid_epochs(name, plan, cfg)
        metrics = run_dir / f"{safe_name(name)}.metrics.jsonl" if distributed.is_main() else None
        return ModelProgress(name, total, ctx.progress, metrics)

    def mlp_only() -> Any:
        if ctx.mlp_only is None:
            with tracking(line("mlp_only", mlp_only_config(ctx, plan))) as progress:
                checked = ctx.checked_mlp_only
                if checked is not None:
                    # Fitted on these very items, epochs and prior by the KB-episode check: not again
                    log.info("mlp_only: the selection the KB-episode check fitted on these training items")
                    checked.replay(progress)
                    ctx.mlp_only = checked.selection
                else:
                    ctx.mlp_only = select_mlp_only(ctx, plan, train_f, val_f, ctx.class_counts)
        return ctx.mlp_only

    if method == "mlp_only":
        sel = mlp_only()
    else:
        evidence = {"label_evidence": ctx.label_problem(train_f) is None}
        if not evidence["label_evidence"] and (plan["recipe"] == "stacked" or method == "mlp_vote"):
            evidence["class_text"] = ctx.class_text(train_f)
        with tracking(line(key, plan["configs"][method])):
            sel = select_method(
                method,
                plan["recipe"],
                plan["configs"][method],
                train_f,
                val_f,
                mlp_only=mlp_only,
                **common,
                **evidence,
            )
    # The selected model with its choices (alpha and gate_t live in its config): a self-describing file.
    info = ctx.model_info(method, key, train_f.k, plan["configs"].get(method))
    if distributed.is_main():
        save_model(
            run_dir / f"{safe_name(key)}.pt", sel.model, info, selected=sel.selected, val_top1=sel.val_top1
        )
    extra = {"mode": "frozen", "selected": sel.selected, "select_split": ctx.exp.select_split}
    val = {"val": val_metrics(predict(sel.model, val_f), val_f.labels, shot)}
    out = {}
    for split, f in evals.items():
        out[split] = {**_scored(predict(sel.model, f), f.labels, shot), **extra, **val}
        if method not in RETRIEVAL_FREE:
            seed = opts.shuffle_seed
            val_sh = {"val": val_metrics(predict(sel.model, shuffled(val_f, seed)), val_f.labels, shot)}
            control = _scored(predict(sel.model, shuffled(f, seed)), f.labels, shot)
            out[f"{split}:shuffled"] = {**control, **extra, **val_sh, "control": "neighbors shuffled"}
    return out


def _knn(
    ctx: ExperimentContext, plan: dict[str, Any], k: int, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]] | str:
    """kNN vote per eval split (k chosen on val when there is a select split), or why it is skipped."""
    rows = sum(len(f) for f in (val_f, *evals.values()) if f is not None)
    # A small vote, its checks and its metrics on one thread: tiny ops lose more at OpenMP barriers than
    # they gain (the demo's: 0.3 s on 2 threads of a busy 2-core machine, 0.03 s on one).
    with intra_op_threads(vote_threads(rows, k, int(ctx.info["num_classes"]))):
        return _knn_votes(ctx, plan, k, train_f, val_f, evals)


def _knn_votes(
    ctx: ExperimentContext, plan: dict[str, Any], k: int, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]] | str:
    problem = ctx.label_problem(train_f)
    if problem is not None:
        log.warning("knn_vote skipped: %s", problem)
        return problem
    num_classes, shot, extra = int(ctx.info["num_classes"]), ctx.info["shot_split"], {}
    if val_f is not None:
        opts = plan["select"]
        k, val_top1, trials = select_knn_k(val_f, num_classes, opts.knn_k, opts.select_metric)
        scores = knn_vote(val_f.subset_k(k), num_classes)
        extra = {"selected": {"k": k, "trials": trials}, "val": val_metrics(scores, val_f.labels, shot)}
    out = {}
    for s, f in evals.items():
        scores = knn_vote(f.subset_k(min(k, f.k)), num_classes)
        out[s] = {**_scored(scores, f.labels, shot), "mode": "vote", "k": k, **extra}
    return out


def _ncm(
    ctx: ExperimentContext, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Nearest class mean per eval split: nothing is chosen on val (its figure is recorded)."""
    num_classes, shot = int(ctx.info["num_classes"]), ctx.info["shot_split"]
    means = class_means(train_f, num_classes)
    extra = {} if val_f is None else {"val": val_metrics(ncm_scores(val_f, means), val_f.labels, shot)}
    return {
        s: {**_scored(ncm_scores(f, means), f.labels, shot), "mode": "vote", **extra}
        for s, f in evals.items()
    }


def _weighted_vote(
    ctx: ExperimentContext, plan: dict[str, Any], method: str, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]] | str:
    """knn_weighted (KB labels) or caption_vote (the classes the captions name), k and the vote
    temperature chosen on val; or why it is skipped (no usable labels; no class names or text tower)."""
    kind = "label" if method == "knn_weighted" else "caption"
    class_text = ctx.class_text(train_f) if kind == "caption" else None
    problem = ctx.label_problem(train_f) if kind == "label" else None
    if kind == "caption" and class_text is None:
        problem = "the dataset has no class names or the KB no text encoder to read captions with"
    if problem is not None:
        log.warning("%s skipped: %s", method, problem)
        return problem
    if val_f is None:
        raise UserError(f"{method} chooses k and its temperature on val: give the experiment a select_split")
    num_classes, shot, opts = int(ctx.info["num_classes"]), ctx.info["shot_split"], plan["select"]
    chosen, _, trials = select_vote(val_f, num_classes, kind, opts, class_text, opts.select_metric)
    val_scores = vote_scores(val_f, num_classes, kind, chosen["k"], chosen["vote_temp"], class_text)
    extra = {"selected": {**chosen, "trials": trials}, "val": val_metrics(val_scores, val_f.labels, shot)}
    out = {}
    for s, f in evals.items():
        scores = vote_scores(f, num_classes, kind, chosen["k"], chosen["vote_temp"], class_text)
        out[s] = {**_scored(scores, f.labels, shot), "mode": "vote", **chosen, **extra}
    return out


def _scored(scores: Any, labels: Any, shot_split: dict | None) -> dict[str, Any]:
    """`evaluate`'s metrics plus the scores themselves under `_scores` (run_experiment turns them into
    the result's predictions file and drops them)."""
    return {**evaluate(scores, labels, shot_split), "_scores": scores}


def _grid_epochs(method: str, plan: dict[str, Any], config: Any) -> int | None:
    """The epochs a selection trains `method` for over its grid (the console line's total); None when
    not known here (the line then grows fit by fit)."""
    opts = plan["select"]
    base = method.split("@", 1)[0]
    if base == "mlp_only":
        return len(opts.lr_grid) * int(opts.baseline_epochs)
    if base == "linear_probe":
        return len(opts.probe_l2)  # one L-BFGS fit per L2 strength
    if base == "mlp_vote":
        return None  # nothing trained beyond mlp_only
    if plan["recipe"] == "stacked":
        return len(opts.retformer_grid) * int(opts.retformer_epochs)
    return int(config.epochs) if config is not None else None
