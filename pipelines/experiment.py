"""An experiment: every method of an experiment manifest, trained and evaluated on the same neighbor
tables (the orchestration; the methods themselves are `trainer/methods.py`).

Experiment manifest keys: `k` (neighbors, default 32) or `k_values` (a sweep: one result per k and
retrieval method, named `<method>@k<k>`), `eval_split`, `methods`, `model` (head sizes), `train`
(TrainConfig), `method_train` (per-method TrainConfig overrides), `finetune` (FinetuneConfig:
encoder_lr, accumulate, num_workers, augment, crop_scale, hflip, images, grad_checkpointing),
`zeroshot` (templates: openai | simple, class_names) and `checkpoint` (every_s, resume; `false`
turns checkpoints off).

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
import re
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts import manifest
from artifacts.atomic import write_json_atomic
from artifacts.embeddings_io import read_embeddings
from artifacts.errors import UserError
from artifacts.workspace import Workspace, read_json
from pipelines.experiment_plan import eval_splits, plan_experiment, train_config
from pipelines.runs import PREDICTIONS, safe_name, write_predictions
from trainer import distributed
from trainer.baselines import kb_label_problem, knn_vote, vote_threads
from trainer.checkpoint import result_fingerprint, save_model
from trainer.evaluate import evaluate, prediction_table
from trainer.features import load_retrieval_features, neighbor_k_values
from trainer.images import SplitImages, shard_images
from trainer.methods import (
    METHODS,
    RETRIEVAL_FREE,
    select_method,
    train_method,
)
from trainer.progress import ModelProgress, tracking
from trainer.selection import select_knn_k, select_vote, shuffled, val_metrics, vote_scores
from trainer.train import intra_op_threads, predict
from trainer.zeroshot import (
    prompt_class_names,
    zeroshot_logits,
    zeroshot_weights,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- resume state
def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def _start_over(run_dir: Path) -> None:
    """A finished run (or resume: false) is repeated from scratch: drop its per-method state."""
    for pattern in ("*.ckpt.pt", "*.result.json", "eval.json", "report.html"):
        for p in run_dir.glob(pattern):
            p.unlink()
    shutil.rmtree(run_dir / PREDICTIONS, ignore_errors=True)


# ------------------------------------------------------------------------------------- running
class _Context:
    """What the methods of one experiment share, loaded once and only when a method needs it."""

    def __init__(self, ws: Workspace, ds: dict, kb: dict, exp: dict, info: dict, progress: bool) -> None:
        self.ws, self.ds, self.kb, self.exp, self.info, self.progress = ws, ds, kb, exp, info, progress
        self._images: dict[tuple[str, str], Any] = {}
        self._dataset = None
        self._encoder = None
        self.mlp_only: Any = None  # the selected mlp_only (recipe stacked builds on it), once per run
        self.table_k: int | None = None  # k of the neighbor tables the run reads (set by run_experiment)
        self._label_problem: tuple[str | None] | None = None
        self._class_text: tuple[Any] | None = None

    def label_problem(self, features: Any) -> str | None:
        """Why the KB's labels cannot vote as this dataset's classes (knn_vote, knn_weighted, RetFormer's
        label evidence), or None when they can; `features`: any split's (they share the store)."""
        if self._label_problem is None:
            ds_name, kb_src = self.ds["name"], (self.kb.get("source") or {}).get("dataset")
            if kb_src:  # a dataset manifest's name or path, as the shards stage reads it
                try:
                    kb_src = manifest.load("datasets", kb_src).get("name", kb_src)
                except UserError:
                    pass  # a name without a manifest here: compared as given
            other = read_json(self.ws.dataset_info(kb_src)) if kb_src and kb_src != ds_name else None
            problem = kb_label_problem(
                features.store_label,
                int(self.info["num_classes"]),
                ds_name,
                self.info.get("class_names"),
                kb_src,
                (other or {}).get("class_names"),
            )
            self._label_problem = (problem,)
        return self._label_problem[0]

    def class_text(self) -> Any:
        """The class names' prompt vectors from the KB's text tower (caption evidence; `trainer.evidence`),
        or None where the dataset has no real class names or the KB no text encoder."""
        if self._class_text is None:
            from trainer.evidence import class_text_embeddings
            from trainer.zeroshot import _PLACEHOLDER

            names = self.info.get("class_names") or []
            spec = (self.kb.get("encoders") or {}).get("text")
            if not names or not spec or all(_PLACEHOLDER.match(n) for n in names):
                self._class_text = (None,)
            else:
                from kb_builder.encoders import build_text_encoder

                self._class_text = (class_text_embeddings(build_text_encoder(spec), names),)
        return self._class_text[0]

    def images(self, split: str, uids: list[str], source: str) -> Any:
        """The images of a split in `uids` order (fine-tune mode), indexed once per split."""

        key = (split, source)
        if key not in self._images:
            if source == "dataset":
                from kb_builder.datasets import load_dataset

                if self._dataset is None:
                    self._dataset = load_dataset(self.ds)
                if split not in self._dataset.splits:
                    raise UserError(f"dataset {self.ds['name']} has no split {split!r}")
                self._images[key] = SplitImages(self._dataset.splits[split], uids)
            else:
                self._images[key] = shard_images(self.ws.dataset_shards(self.ds["name"]), split, uids)
        return self._images[key]

    def model_info(self, method: str, key: str, k: int, config: Any, **extra: Any) -> dict[str, Any]:
        """What a saved model needs besides its weights to predict on new images (`<run>/<key>.pt`):
        the dataset and KB manifests, the encoders and embed options (the same preprocessing), the KB
        index it searched and its tuned search parameters, k and the k of the neighbor tables (the
        search depth of the run's own retrieval), class names, the training config and recipe."""
        index_dir = self.ws.kb_index(self.kb["name"])
        index = read_json(index_dir / "index.json") or {}
        return {
            "method": method,
            "result": key,
            "mode": METHODS[method].mode,
            "uses_neighbors": METHODS[method].uses_neighbors,
            "workspace": str(self.ws.root.resolve()),
            "dataset": self.ds,
            "kb": self.kb,
            "encoders": self.kb.get("encoders") or {},
            "embed": self.kb.get("embed") or {},
            "class_names": self.info.get("class_names"),
            "num_classes": int(self.info["num_classes"]),
            "shot_split": self.info.get("shot_split"),
            "k": k,
            "search_k": self.table_k or k,
            "index": {
                "dir": str(index_dir.relative_to(self.ws.root)),
                "key": index.get("key"),
                "factory": index.get("factory"),
                "n": index.get("n"),
                "parts": [(p["name"], p["rows"]) for p in index.get("parts", [])],
                # the search parameters `retformer index` tuned to its recall target (index.json)
                "params": index.get("params", {}),
                "params_source": f"{index_dir / 'index.json'} (tuned at {index.get('created')})",
                "recall_check": index.get("recall_check"),
            },
            "train_config": asdict(config) if is_dataclass(config) else config,
            "recipe": self.exp.get("recipe", "paper"),
            "select_split": self.exp.get("select_split"),
            "experiment": self.exp.get("name"),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }

    def image_encoder(self, seed: int) -> Any:
        from kb_builder.encoders import build_image_encoder

        if self._encoder is None:
            torch.manual_seed(seed)  # random-weight encoders (tests) are then the same in every run
            self._encoder = build_image_encoder(self.kb["encoders"]["image"])
        return self._encoder


def _zeroshot(ctx: _Context, evals: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics per eval split; evals: split -> (image embeddings, labels)."""
    from kb_builder.encoders import build_text_encoder

    spec = ctx.exp.get("zeroshot") or {}
    names = spec.get("class_names") or ctx.info["class_names"]
    if len(names) != int(ctx.info["num_classes"]):
        raise UserError(f"zeroshot.class_names has {len(names)} names for {ctx.info['num_classes']} classes")
    names = prompt_class_names(names, ctx.ds.get("kind"))
    text = build_text_encoder(ctx.kb["encoders"]["text"])
    template_set = spec.get("templates", "openai")
    weights = zeroshot_weights(text, names, template_set)
    out = {}
    for split, (img, labels) in evals.items():
        out[split] = _scored(zeroshot_logits(img, weights), labels, ctx.info["shot_split"])
        out[split].update({"mode": "zeroshot", "templates": template_set})
    return out


def _train_method(
    ctx: _Context,
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
            model_options=ctx.exp.get("model", {}) or {},
            num_classes=int(ctx.info["num_classes"]),
            k=k,
            class_counts=ctx.info["train_class_counts"],
            log_path=run_dir / f"{_safe(key)}.metrics.jsonl",
            weights_path=run_dir / f"{_safe(key)}.pt",
            checkpoint_path=run_dir / f"{_safe(key)}.ckpt.pt" if policy else None,
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


def _predictions(run_dir: Path, name: str, table: Any) -> str:
    """write_predictions on rank 0; every rank gets the file's path (relative to the run folder)."""
    if distributed.is_main():
        return write_predictions(run_dir, name, table)
    return f"{PREDICTIONS}/{safe_name(name)}.parquet"


def _select_trained(
    ctx: _Context,
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
    num_classes, shot = int(ctx.info["num_classes"]), ctx.info["shot_split"]
    opts = plan["select"]
    common = {
        "model_options": ctx.exp.get("model", {}) or {},
        "num_classes": num_classes,
        "class_counts": ctx.info["train_class_counts"],
        "opts": opts,
    }

    def line(name: str, cfg: Any) -> ModelProgress:
        # One console line per model over its whole grid; every fit's epochs in <name>.metrics.jsonl.
        total = _grid_epochs(name, plan, cfg)
        metrics = run_dir / f"{_safe(name)}.metrics.jsonl" if distributed.is_main() else None
        return ModelProgress(name, total, ctx.progress, metrics)

    def mlp_only() -> Any:
        if ctx.mlp_only is None:
            cfg = plan["configs"].get("mlp_only") or train_config(ctx.exp, "mlp_only")
            with tracking(line("mlp_only", cfg)):
                ctx.mlp_only = select_method(
                    "mlp_only", "paper", cfg, train_f, val_f, mlp_only=None, **common
                )
        return ctx.mlp_only

    if method == "mlp_only":
        sel = mlp_only()
    else:
        evidence = {"label_evidence": ctx.label_problem(train_f) is None}
        if not evidence["label_evidence"] and plan["recipe"] == "stacked":
            evidence["class_text"] = ctx.class_text()
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
            run_dir / f"{_safe(key)}.pt", sel.model, info, selected=sel.selected, val_top1=sel.val_top1
        )
    extra = {"mode": "frozen", "selected": sel.selected, "select_split": ctx.exp["select_split"]}
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
    ctx: _Context, plan: dict[str, Any], k: int, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]] | str:
    """kNN vote per eval split (k chosen on val when there is a select split), or why it is skipped."""
    rows = sum(len(f) for f in (val_f, *evals.values()) if f is not None)
    # A small vote, its checks and its metrics on one thread: tiny ops lose more at OpenMP barriers than
    # they gain (the demo's: 0.3 s on 2 threads of a busy 2-core machine, 0.03 s on one).
    with intra_op_threads(vote_threads(rows, k, int(ctx.info["num_classes"]))):
        return _knn_votes(ctx, plan, k, train_f, val_f, evals)


def _knn_votes(
    ctx: _Context, plan: dict[str, Any], k: int, train_f: Any, val_f: Any, evals: dict[str, Any]
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


def _weighted_vote(
    ctx: _Context, plan: dict[str, Any], method: str, train_f: Any, val_f: Any, evals: dict[str, Any]
) -> dict[str, dict[str, Any]] | str:
    """knn_weighted (KB labels) or caption_vote (the classes the captions name), k and the vote
    temperature chosen on val; or why it is skipped (no usable labels; no class names or text tower)."""
    kind = "label" if method == "knn_weighted" else "caption"
    class_text = ctx.class_text() if kind == "caption" else None
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


def run_experiment(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    exp: dict[str, Any],
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
    methods, k_values, policy = plan["methods"], plan["k_values"], plan["checkpoint"]
    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(f"dataset {ds['name']} has not been prepared: run `retformer neighbors` first")
    splits = eval_splits(exp, info)
    plan["select"] = plan["select"].for_dataset(ds["name"])
    select_split = exp.get("select_split")
    if select_split is not None and (select_split not in info["splits"] or select_split in splits):
        raise UserError(
            f"select_split {select_split!r} must be one of the dataset's splits {list(info['splits'])} "
            f"and not an eval split ({', '.join(splits)})"
        )
    need_nn = any(m != "zeroshot" for m in methods)
    kmax = max(k_values)
    table_k = None
    if need_nn:
        available = [x for x in neighbor_k_values(ws, ds["name"], kb["name"]) if x >= kmax]
        if not available:
            raise UserError(
                f"no neighbor tables with k >= {kmax} for {ds['name']} x {kb['name']}: "
                f"run `retformer neighbors --dataset {ds['name']} --kb {kb['name']} --k {kmax}`"
            )
        table_k = available[0]
        train_all = load_retrieval_features(ws, ds["name"], kb["name"], table_k, "train")
        evals_all = {s: load_retrieval_features(ws, ds["name"], kb["name"], table_k, s) for s in splits}
        val_all = None
        if select_split is not None:
            val_all = load_retrieval_features(ws, ds["name"], kb["name"], table_k, select_split)
        zs_evals = {s: (f.query_img, f.labels) for s, f in evals_all.items()}
        samples = {s: (f.labels, f.uids) for s, f in evals_all.items()}
        train_size = len(train_all)
    else:
        zs_evals, samples = {}, {}
        for s in splits:
            table = read_embeddings(ws.dataset_embeddings(ds["name"], s))
            zs_evals[s] = (torch.from_numpy(table.image_emb.astype("float32")), table.label)
            samples[s] = (table.label, [str(u) for u in table.uid])
        train_size = int(info["splits"].get("train", 0))
    eval_sizes = {s: len(labels) for s, (_, labels) in zs_evals.items()}

    main = distributed.is_main()
    resume = policy is not None and policy["resume"]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume or (run_dir / "eval.json").is_file():
            _start_over(run_dir)
    ctx = _Context(ws, ds, kb, exp, info, progress and main)
    ctx.table_k = table_k
    results: dict[str, Any] = {}
    for k in k_values:
        evals = {s: f.subset_k(k) for s, f in evals_all.items()} if need_nn else {}
        train_f = train_all.subset_k(k) if need_nn else None
        val_f = val_all.subset_k(k) if need_nn and val_all is not None else None
        for method in methods:
            if method in RETRIEVAL_FREE and k != k_values[0]:
                continue  # k-independent: once per experiment
            key = method if len(k_values) == 1 or method in RETRIEVAL_FREE else f"{method}@k{k}"
            names = {s: key if i == 0 else f"{key}@{s}" for i, s in enumerate(splits)}
            done = run_dir / f"{_safe(key)}.result.json"
            config = plan["configs"].get(method)
            selecting = select_split is not None and METHODS[method].mode in ("frozen", "vote")
            model_fp = exp.get("model") if config is not None else None
            if selecting:  # what selection depends on, so a changed grid reruns the method
                sel = {"select_split": select_split, "recipe": plan["recipe"], "select": exp.get("select")}
                model_fp = {"model": exp.get("model"), **sel}
            fp = result_fingerprint(
                method,
                config,
                model_fp,
                exp.get("zeroshot") if method == "zeroshot" else None,
                None if method in RETRIEVAL_FREE else k,
                train_size,
                eval_sizes,
            )
            # Rank 0 reads it (after its start-over): every rank reuses, or trains, the same methods.
            previous = distributed.from_main(
                lambda done=done: read_json(done, torn_ok=True) if resume else None
            )
            if previous is not None and previous.get("fingerprint") == fp:
                log.info("%s: reusing the result of the interrupted run (%s)", key, done)
                results.update(previous["metrics"])
                continue
            started = time.perf_counter()
            if method in ("knn_weighted", "caption_vote"):
                voted = _weighted_vote(ctx, plan, method, train_f, val_f, evals)
                if isinstance(voted, str):
                    results.update({name: {"skipped": voted} for name in names.values()})
                    continue
                by_split = voted
            elif method == "knn_vote":
                knn = _knn(ctx, plan, k, train_f, val_f, evals)
                if isinstance(knn, str):
                    results.update({name: {"skipped": knn} for name in names.values()})
                    continue
                by_split = knn
            elif selecting:
                by_split = _select_trained(ctx, plan, method, key, train_f, val_f, evals, run_dir)
            elif method == "zeroshot":
                by_split = _zeroshot(ctx, zs_evals)
            else:
                by_split = _train_method(ctx, method, key, k, config, train_f, evals, run_dir, policy)
            seconds = round(time.perf_counter() - started, 2)
            metrics = {}
            for s, m in by_split.items():
                name = _row_name(names, s)
                labels, uids = samples[s.partition(":")[0]]
                scores = m.pop("_scores")
                table = prediction_table(scores, labels, uids, info["shot_split"])
                m["predictions"] = _predictions(run_dir, name, table)
                metrics[name] = {**m, "seconds": seconds}
            results.update(metrics)
            if policy is not None and main:
                write_json_atomic(done, {"fingerprint": fp, "metrics": metrics})
                (run_dir / f"{_safe(key)}.ckpt.pt").unlink(missing_ok=True)
    report = {
        "run": run_dir.name,
        "config_hash": config_hash,
        "dataset": ds["name"],
        "kb": kb["name"],
        "experiment": exp["name"],
        "k": k_values[0] if len(k_values) == 1 else k_values,
        "neighbor_table_k": table_k,
        "eval_split": splits[0],
        "select_split": select_split,
        "recipe": plan["recipe"],
        "eval_splits": splits,
        "train_size": train_size,
        "eval_size": eval_sizes[splits[0]],
        "eval_sizes": eval_sizes,
        "shot_split": info["shot_split"],
        "class_names": info.get("class_names"),
        "train_class_counts": info.get("train_class_counts"),
        "config": {
            "train": exp.get("train", {}),
            "method_train": exp.get("method_train", {}) or {},
            "model": exp.get("model", {}),
            "finetune": exp.get("finetune", {}) or {},
            "zeroshot": exp.get("zeroshot", {}) or {},
            "checkpoint": policy,
            "select": exp.get("select", {}) or {},
        },
        "methods": results,
    }
    if main and need_nn and "retformer" in results:
        eval_f = evals_all[splits[0]].subset_k(k_values[0])
        report["diagnostics"] = _diagnostics(ctx, run_dir, eval_f, results)
    if main:
        write_json_atomic(run_dir / "eval.json", report)
        for p in run_dir.glob("*.result.json"):
            p.unlink()
    return report


def _diagnostics(ctx: _Context, run_dir: Path, features: Any, results: dict[str, Any]) -> dict[str, Any]:
    """`pipelines.run_diagnostics.diagnose` with the neighbours' classes read from the KB's labels where
    they are the dataset's, else from their captions."""
    from pipelines.run_diagnostics import diagnose

    kind = "label" if ctx.label_problem(features) is None else None
    class_text = ctx.class_text() if kind is None else None
    kind = kind or ("caption" if class_text is not None else None)
    return diagnose(run_dir, features, results, int(ctx.info["num_classes"]), class_text, kind)


def _scored(scores: Any, labels: Any, shot_split: dict | None) -> dict[str, Any]:
    """`evaluate`'s metrics plus the scores themselves under `_scores` (run_experiment turns them into
    the result's predictions file and drops them)."""
    return {**evaluate(scores, labels, shot_split), "_scores": scores}


def _grid_epochs(method: str, plan: dict[str, Any], config: Any) -> int | None:
    """The epochs a selection trains `method` for over its grid (the console line's total); None when
    not known here (the line then grows fit by fit)."""
    opts = plan["select"]
    base = method.split("@", 1)[0]
    if base in ("mlp_only", "linear_probe"):
        return len(opts.lr_grid) * int(opts.baseline_epochs)
    if plan["recipe"] == "stacked":
        return len(opts.retformer_grid) * int(opts.retformer_epochs)
    return int(config.epochs) if config is not None else None


def _row_name(names: dict[str, str], split: str) -> str:
    """Result name of a split's metrics; `<split>:shuffled` (the control) -> `<name>:shuffled`."""
    base, _, control = split.partition(":")
    return f"{names[base]}:{control}" if control else names[base]
