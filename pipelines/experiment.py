"""An experiment: every method of an experiment manifest, trained and evaluated on the same neighbor
tables (the orchestration; the methods themselves are `trainer/methods.py`). Here: the run's inputs, its loop
over k values and methods, resume, and eval.json; one method's run is `pipelines/experiment_methods.py`,
what the methods share `pipelines/experiment_context.py`.

Experiment manifest keys: `k` (neighbors, default 32) or `k_values` (a sweep: one result per k and
retrieval method, named `<method>@k<k>`), `eval_split`, `methods`, `model` (head sizes), `train`
(TrainConfig), `method_train` (per-method TrainConfig overrides), `finetune` (FinetuneConfig:
encoder_lr, accumulate, num_workers, augment, crop_scale, hflip, images, grad_checkpointing),
`zeroshot` (templates: openai | simple; the class names are the dataset's) and `checkpoint`
(every_s, resume; `false` turns checkpoints off).

Selection (issue 9): `select_split: val` makes every choice of the feature-mode methods on that split
(`trainer/selection.py`): the baselines' lr and epoch, RetFormer's checkpoint, la_tau, alpha and gate,
kNN vote's k; the eval split is evaluated once, with the chosen models. `select:` holds the grids
(`SelectOptions`); `recipe: paper` (default: one loss on tau/2 (L_I + L_R)) or `stacked` (L_I = the
selected mlp_only, frozen; L_R on its own loss; needs `select_split`). Each RetFormer variant then also
reports `<method>:shuffled`, its eval split with neighbours shuffled across queries. Without
`select_split` nothing is selected and `method_train` applies as before. kNN vote is skipped, with
its reason, when the KB's labels are not the dataset's classes.

Resume: each trainable method checkpoints to `<run>/<method>.ckpt.pt` and, once evaluated, leaves
`<method>.result.json`. Rerunning a run that was killed (no eval.json yet) reuses the finished
methods' results and resumes the interrupted one from its checkpoint; rerunning a finished run
repeats it from scratch.

Under torchrun (`trainer/distributed.py`) every rank runs this whole experiment, every method and
every selection grid in the same order (the trainings are collective); rank 0 alone decides what is
reused or started over and alone writes into the run folder: model files, metrics, predictions,
results, checkpoints, eval.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retformer.artifacts.atomic import write_json_atomic
from retformer.artifacts.embeddings_io import read_embeddings
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import prediction_file, safe_name
from retformer.artifacts.schema import dump_given
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.experiment_context import ExperimentContext, start_over
from retformer.pipelines.experiment_episodes import add_kb_episodes
from retformer.pipelines.experiment_methods import run_method, selects
from retformer.pipelines.experiment_plan import eval_splits, plan_experiment
from retformer.pipelines.experiment_schema import ExperimentManifest
from retformer.pipelines.runs import code_version, write_predictions
from retformer.trainer import distributed
from retformer.trainer.checkpoint import Selection, result_fingerprint
from retformer.trainer.evaluate import prediction_table
from retformer.trainer.features import load_retrieval_features, neighbor_k_values
from retformer.trainer.methods import RETRIEVAL_FREE

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest

log = logging.getLogger(__name__)


@dataclass
class _Inputs:
    """What every method of a run reads, loaded once: the neighbor features (when a method needs them)
    at the neighbor tables' k, zero-shot's image embeddings and labels, and each eval split's labels and
    uids (for the predictions files)."""

    need_nn: bool
    table_k: int | None
    train_all: Any
    evals_all: dict[str, Any]
    val_all: Any
    zs_evals: dict[str, tuple[Any, Any]]
    samples: dict[str, tuple[Any, list[str]]]
    train_size: int
    eval_sizes: dict[str, int]

    def at_k(self, k: int) -> tuple[Any, Any, dict[str, Any]]:
        """(train, val or None, eval split -> features) cut to the k nearest neighbours."""
        if not self.need_nn:
            return None, None, {}
        evals = {s: f.subset_k(k) for s, f in self.evals_all.items()}
        train_f = self.train_all.subset_k(k)
        val_f = self.val_all.subset_k(k) if self.val_all is not None else None
        return train_f, val_f, evals


def run_experiment(
    ws: Workspace,
    ds: DatasetManifest,
    kb: KBManifest,
    exp: ExperimentManifest,
    run_dir: Path,
    progress: bool = True,
    config_hash: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate every method of `exp`; writes run_dir/eval.json and returns it.

    Several eval splits (`eval_split: [webvision_val, imagenet_val]`) evaluate each trained model on
    each; results on the splits after the first are named `<method>@<split>`. Each result also gets
    macro_f1, worst_class and `predictions`: its Parquet file of per-sample predictions under
    `<run>/predictions/` (`trainer.evaluate.prediction_table`). progress: one console line per trained
    model (per-epoch figures go to `<result>.metrics.jsonl` only). config_hash: recorded in eval.json
    (`pipelines.runs.check_overwrite` reads it)."""

    plan = plan_experiment(exp, kb)
    info = read_json(ws.dataset_info(ds.name))
    if info is None:
        raise UserError(f"dataset {ds.name} has not been prepared: run `retformer neighbors` first")
    splits = eval_splits(exp, info)
    plan["select"] = plan["select"].for_dataset(ds.name)
    select_split = exp.select_split
    if select_split is not None and (select_split not in info["splits"] or select_split in splits):
        raise UserError(
            f"select_split {select_split!r} must be one of the dataset's splits {list(info['splits'])} "
            f"and not an eval split ({', '.join(splits)})"
        )
    inputs = _load_inputs(ws, ds.name, kb.name, plan, info, splits, select_split)
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not _resumes(plan) or (run_dir / "eval.json").is_file():
            start_over(run_dir)
    ctx = ExperimentContext(ws, ds, kb, exp, info, progress and main)
    ctx.table_k = inputs.table_k
    if exp.kb_episodes and inputs.need_nn:
        inputs.train_all = add_kb_episodes(ctx, plan, inputs.train_all, inputs.val_all, exp.kb_episodes)
    results: dict[str, Any] = {}
    k_values = plan["k_values"]
    for k in k_values:
        features = inputs.at_k(k)
        for method in plan["methods"]:
            if method in RETRIEVAL_FREE and k != k_values[0]:
                continue  # k-independent: once per experiment
            results.update(_method_results(ctx, plan, method, k, features, inputs, run_dir, splits))
    report = _report(ctx, plan, inputs, splits, run_dir, config_hash, results)
    if main and inputs.need_nn and "retformer" in results:
        eval_f = inputs.evals_all[splits[0]].subset_k(k_values[0])
        report["diagnostics"] = _diagnostics(ctx, run_dir, eval_f, results)
    if main:
        write_json_atomic(run_dir / "eval.json", report)
        for p in run_dir.glob("*.result.json"):
            p.unlink()
    return report


def _load_inputs(
    ws: Workspace,
    dataset: str,
    kb_name: str,
    plan: dict[str, Any],
    info: dict[str, Any],
    splits: list[str],
    select_split: str | None,
) -> _Inputs:
    """The run's `_Inputs`: the neighbor features from the shallowest neighbor tables deep enough for
    every k (UserError when there are none), or only the eval splits' embeddings for zero-shot alone."""
    need_nn = any(m != "zeroshot" for m in plan["methods"])
    kmax = max(plan["k_values"])
    table_k = train_all = val_all = None
    evals_all: dict[str, Any] = {}
    if need_nn:
        available = [x for x in neighbor_k_values(ws, dataset, kb_name) if x >= kmax]
        if not available:
            raise UserError(
                f"no neighbor tables with k >= {kmax} for {dataset} x {kb_name}: "
                f"run `retformer neighbors --dataset {dataset} --kb {kb_name} --k {kmax}`"
            )
        table_k = available[0]
        train_all = load_retrieval_features(ws, dataset, kb_name, table_k, "train")
        evals_all = {s: load_retrieval_features(ws, dataset, kb_name, table_k, s) for s in splits}
        if select_split is not None:
            val_all = load_retrieval_features(ws, dataset, kb_name, table_k, select_split)
        zs_evals = {s: (f.query_img, f.labels) for s, f in evals_all.items()}
        samples = {s: (f.labels, f.uids) for s, f in evals_all.items()}
        train_size = len(train_all)
    else:
        zs_evals, samples = {}, {}
        for s in splits:
            table = read_embeddings(ws.dataset_embeddings(dataset, s))
            zs_evals[s] = (torch.from_numpy(table.image_emb.astype("float32")), table.label)
            samples[s] = (table.label, [str(u) for u in table.uid])
        train_size = int(info["splits"].get("train", 0))
    eval_sizes = {s: len(labels) for s, (_, labels) in zs_evals.items()}
    return _Inputs(need_nn, table_k, train_all, evals_all, val_all, zs_evals, samples, train_size, eval_sizes)


def _method_results(
    ctx: ExperimentContext,
    plan: dict[str, Any],
    method: str,
    k: int,
    features: tuple[Any, Any, dict[str, Any]],
    inputs: _Inputs,
    run_dir: Path,
    splits: list[str],
) -> dict[str, Any]:
    """One method's results at one k, by result name: reused from an interrupted run's
    `<key>.result.json` when its fingerprint matches, else run (`run_method`) and, with checkpoints on,
    recorded there (its checkpoint then deleted); a skipped method's results say why."""
    k_values = plan["k_values"]
    key = method if len(k_values) == 1 or method in RETRIEVAL_FREE else f"{method}@k{k}"
    names = {s: key if i == 0 else f"{key}@{s}" for i, s in enumerate(splits)}
    done = run_dir / f"{safe_name(key)}.result.json"
    fp = _fingerprint(ctx.exp, plan, method, k, inputs)
    # Rank 0 reads it (after its start-over): every rank reuses, or trains, the same methods.
    previous = distributed.from_main(lambda: read_json(done, torn_ok=True) if _resumes(plan) else None)
    if previous is not None and previous.get("fingerprint") == fp:
        log.info("%s: reusing the result of the interrupted run (%s)", key, done)
        return previous["metrics"]
    started = time.perf_counter()
    by_split = run_method(ctx, plan, method, key, k, features, inputs.zs_evals, run_dir)
    if isinstance(by_split, str):
        return {name: {"skipped": by_split} for name in names.values()}
    seconds = round(time.perf_counter() - started, 2)
    metrics = {}
    for s, m in by_split.items():
        name = _row_name(names, s)
        labels, uids = inputs.samples[s.partition(":")[0]]
        scores = m.pop("_scores")
        table = prediction_table(scores, labels, uids, ctx.info["shot_split"])
        m["predictions"] = _predictions(run_dir, name, table)
        metrics[name] = {**m, "seconds": seconds}
    if plan["checkpoint"] is not None and distributed.is_main():
        write_json_atomic(done, {"fingerprint": fp, "metrics": metrics})
        (run_dir / f"{safe_name(key)}.ckpt.pt").unlink(missing_ok=True)
    return metrics


def _resumes(plan: dict[str, Any]) -> bool:
    """Whether the run resumes: checkpoints on and `checkpoint.resume` true (else it starts over)."""
    return plan["checkpoint"] is not None and plan["checkpoint"]["resume"]


def _fingerprint(exp: ExperimentManifest, plan: dict[str, Any], method: str, k: int, inputs: _Inputs) -> str:
    """`result_fingerprint` of what a method's result depends on (with selection: its grid too, so a
    changed grid reruns the method): the sections as the manifest gives them (`dump_given`)."""
    config = plan["configs"].get(method)
    selection = None
    if selects(exp, method):
        selection = Selection(exp.select_split, plan["recipe"], exp.select)
    trained = config is not None or selection is not None
    return result_fingerprint(
        method,
        config,
        exp.model if trained else None,
        exp.zeroshot if method == "zeroshot" else None,
        None if method in RETRIEVAL_FREE else k,
        inputs.train_size,
        inputs.eval_sizes,
        selection,
    )


def _report(
    ctx: ExperimentContext,
    plan: dict[str, Any],
    inputs: _Inputs,
    splits: list[str],
    run_dir: Path,
    config_hash: str | None,
    results: dict[str, Any],
) -> dict[str, Any]:
    """eval.json's content: the run's identity, splits and sizes, the configuration (the sections as the
    manifest gives them: `dump_given`), every result."""
    exp, info, k_values = ctx.exp, ctx.info, plan["k_values"]
    written = dump_given(exp)
    return {
        "run": run_dir.name,
        "config_hash": config_hash,
        "code_version": code_version(),
        "dataset": ctx.ds.name,
        "kb": ctx.kb.name,
        "experiment": exp.name,
        "k": k_values[0] if len(k_values) == 1 else k_values,
        "neighbor_table_k": inputs.table_k,
        "eval_split": splits[0],
        "select_split": exp.select_split,
        "recipe": plan["recipe"],
        "eval_splits": splits,
        "train_size": inputs.train_size,
        "kb_episodes": ctx.kb_episodes,
        # what labelled the episodes ("auto" resolved), else what the experiment asked for
        "kb_episode_labels": ctx.kb_episode_labels or ctx.exp.kb_episode_labels,
        "kb_episode_check": ctx.kb_episode_check,
        "kb_episode_filter": ctx.kb_episode_filter,
        "eval_size": inputs.eval_sizes[splits[0]],
        "eval_sizes": inputs.eval_sizes,
        "shot_split": info["shot_split"],
        "class_names": info.get("class_names"),
        "train_class_counts": info.get("train_class_counts"),
        "config": {
            "train": written.get("train", {}),
            "method_train": written.get("method_train") or {},
            "model": written.get("model", {}),
            "finetune": written.get("finetune") or {},
            "zeroshot": written.get("zeroshot") or {},
            "checkpoint": plan["checkpoint"],
            "select": written.get("select") or {},
        },
        "methods": results,
    }


def _predictions(run_dir: Path, name: str, table: Any) -> str:
    """write_predictions on rank 0; every rank gets the file's path (relative to the run folder)."""
    if distributed.is_main():
        return write_predictions(run_dir, name, table)
    return prediction_file(name)


def _diagnostics(
    ctx: ExperimentContext, run_dir: Path, features: Any, results: dict[str, Any]
) -> dict[str, Any]:
    """`pipelines.run_diagnostics.diagnose` with the neighbours' classes read from the KB's labels where
    they are the dataset's, else from their captions."""
    from retformer.pipelines.run_diagnostics import diagnose

    kind = "label" if ctx.label_problem(features) is None else None
    class_text = ctx.class_text(features) if kind is None else None
    kind = kind or ("caption" if class_text is not None else None)
    return diagnose(run_dir, features, results, int(ctx.info["num_classes"]), class_text, kind)


def _row_name(names: dict[str, str], split: str) -> str:
    """Result name of a split's metrics; `<split>:shuffled` (the control) -> `<name>:shuffled`."""
    base, _, control = split.partition(":")
    return f"{names[base]}:{control}" if control else names[base]
