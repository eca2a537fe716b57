"""The train + evaluate stage: every method of an experiment on the same neighbour tables.

Methods: retformer (Eq. 3-6), retformer_no_text, retformer_no_image (the paper's ablations),
mlp_only (the L_I branch alone: no retrieval), linear_probe (classifier only) and knn_vote (majority
of the retrieved KB items' labels, where the KB has labels). All read the same embeddings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kb_builder.atomic import write_json_atomic
from kb_builder.errors import UserError
from kb_builder.workspace import Workspace, read_json

METHODS = ("retformer", "retformer_no_text", "retformer_no_image", "mlp_only", "linear_probe", "knn_vote")
VARIANT_OF = {"retformer": "full", "retformer_no_text": "no_text", "retformer_no_image": "no_image"}


def build_model(method: str, img_dim: int, txt_dim: int, num_classes: int, k: int, spec: dict[str, Any]):
    """The torch module of a trainable method, from the experiment's `model` section."""
    from trainer.model import LinearProbe, MLPOnly, RetFormer

    if method in VARIANT_OF:
        return RetFormer(
            img_dim=img_dim,
            txt_dim=txt_dim,
            num_classes=num_classes,
            width=int(spec.get("width", 256)),
            depth=int(spec.get("depth", 4)),
            heads=int(spec.get("heads", 4)),
            k=k,
            tau=float(spec.get("tau", 2.0)),
            variant=VARIANT_OF[method],
            dropout=float(spec.get("dropout", 0.0)),
            ffn=bool(spec.get("ffn", True)),
        )
    if method == "mlp_only":
        return MLPOnly(img_dim, num_classes, hidden=int(spec.get("mlp_hidden", spec.get("width", 256))))
    if method == "linear_probe":
        return LinearProbe(img_dim, num_classes)
    raise UserError(f"unknown method {method!r}: known methods are {', '.join(METHODS)}")


def neighbour_k_available(ws: Workspace, dataset: str, kb: str) -> list[int]:
    """The k values for which neighbour tables exist."""
    root = ws.dataset_dir(dataset) / "neighbors" / kb
    return sorted(int(p.name[1:]) for p in root.glob("k*") if (p / "store.parquet").is_file())


def run_experiment(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    exp: dict[str, Any],
    run_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every method of `exp`; writes run_dir/eval.json and returns it."""
    import torch

    from trainer.baselines import knn_vote
    from trainer.evaluate import evaluate
    from trainer.features import load_retrieval_features
    from trainer.train import TrainConfig, fit, predict

    methods = list(exp.get("methods", METHODS))
    for m in methods:
        if m not in METHODS:
            raise UserError(
                f"unknown method {m!r} in experiment {exp['name']}: known are {', '.join(METHODS)}"
            )
    k = int(exp.get("k", 32))
    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(f"dataset {ds['name']} has not been prepared: run `retformer neighbors` first")
    available = [x for x in neighbour_k_available(ws, ds["name"], kb["name"]) if x >= k]
    if not available:
        raise UserError(
            f"no neighbour tables with k >= {k} for {ds['name']} x {kb['name']}: "
            f"run `retformer neighbors --dataset {ds['name']} --kb {kb['name']} --k {k}`"
        )
    table_k = available[0]
    eval_split = exp.get("eval_split", "test")
    if eval_split not in info["splits"]:
        raise UserError(f"eval_split {eval_split!r} not among the dataset's splits {list(info['splits'])}")
    dataset_dir = ws.dataset_dir(ds["name"])
    train_f = load_retrieval_features(dataset_dir, kb["name"], table_k, "train").subset_k(k)
    eval_f = load_retrieval_features(dataset_dir, kb["name"], table_k, eval_split).subset_k(k)
    num_classes = int(info["num_classes"])
    counts = info["train_class_counts"]
    shot_split = info["shot_split"]
    base_train = dict(exp.get("train", {}))
    # Per-method recipe overrides (`method_train: {linear_probe: {epochs: 300, lr: 0.01}}`): cheap
    # baselines get the steps they need to converge, so they are not strawmen.
    method_train = exp.get("method_train", {}) or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        if method == "knn_vote":
            if int((eval_f.store_label >= 0).sum()) == 0:
                results[method] = {"skipped": "the KB has no labels"}
                continue
            logits = knn_vote(eval_f, num_classes=num_classes)
        else:
            config = TrainConfig(**{**base_train, **method_train.get(method, {})})
            torch.manual_seed(config.seed)
            model = build_model(
                method,
                train_f.query_img.shape[1],
                train_f.store_txt.shape[1],
                num_classes,
                k,
                exp.get("model", {}),
            )
            fit(
                model,
                train_f,
                config,
                class_counts=counts,
                progress=progress,
                log_path=run_dir / f"{method}.metrics.jsonl",
            )
            torch.save(model.state_dict(), run_dir / f"{method}.pt")
            logits = predict(model, eval_f, batch_size=1024)
        metrics = evaluate(logits, eval_f.labels, shot_split)
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        results[method] = metrics
    report = {
        "dataset": ds["name"],
        "kb": kb["name"],
        "experiment": exp["name"],
        "k": k,
        "eval_split": eval_split,
        "train_size": len(train_f.labels),
        "eval_size": len(eval_f.labels),
        "shot_split": shot_split,
        "config": {"train": base_train, "method_train": method_train, "model": exp.get("model", {})},
        "methods": results,
    }
    write_json_atomic(run_dir / "eval.json", report)
    return report


def _pct(value: Any) -> str:
    return "   -  " if value is None else f"{100 * float(value):6.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Method x top-1 / top-5 / many / medium / few, in percent."""
    lines = [f"{'method':<20} {'top1':>6} {'top5':>6} {'many':>6} {'medium':>6} {'few':>6}"]
    for method, m in report["methods"].items():
        if "skipped" in m:
            lines.append(f"{method:<20} skipped: {m['skipped']}")
            continue
        lines.append(
            f"{method:<20} {_pct(m.get('top1'))} {_pct(m.get('top5'))} {_pct(m.get('many'))} "
            f"{_pct(m.get('medium'))} {_pct(m.get('few'))}"
        )
    return "\n".join(lines)


def results_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The `{"methods": {m: {top1, many, medium, few}}}` form of results.json."""
    keys = ("top1", "top5", "many", "medium", "few")
    return {
        "methods": {
            m: {key: v.get(key) for key in keys} for m, v in report["methods"].items() if "skipped" not in v
        }
    }


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
