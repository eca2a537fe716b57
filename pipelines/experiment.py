"""An experiment: every method of an experiment manifest, trained and evaluated on the same neighbor
tables (the orchestration; the methods themselves are `trainer/methods.py`).

Experiment manifest keys: `k` (neighbors, default 32) or `k_values` (a sweep: one result per k and
retrieval method, named `<method>@k<k>`), `eval_split`, `methods`, `model` (head sizes), `train`
(TrainConfig), `method_train` (per-method TrainConfig overrides), `finetune` (FinetuneConfig:
encoder_lr, accumulate, num_workers, augment, crop_scale, hflip, images, grad_checkpointing),
`zeroshot` (templates: openai | simple, class_names) and `checkpoint` (every_s, resume; `false`
turns checkpoints off).

Resume: each trainable method checkpoints to `<run>/<method>.ckpt.pt` and, once evaluated, leaves
`<method>.result.json`. Rerunning a run that was killed (no eval.json yet) reuses the finished
methods' results and resumes the interrupted one from its checkpoint; rerunning a finished run
repeats it from scratch.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from artifacts.atomic import write_json_atomic
from artifacts.embeddings_io import read_embeddings
from artifacts.errors import UserError
from artifacts.workspace import Workspace, read_json
from trainer.baselines import knn_vote
from trainer.checkpoint import result_fingerprint
from trainer.evaluate import evaluate
from trainer.features import load_retrieval_features, neighbor_k_values
from trainer.finetune import FinetuneConfig
from trainer.images import SplitImages, shard_images
from trainer.methods import FEATURE_METHODS, FINETUNE_METHODS, METHODS, RETRIEVAL_FREE, TRAINED, train_method
from trainer.train import TrainConfig
from trainer.zeroshot import (
    check_aligned,
    prompt_class_names,
    templates,
    zeroshot_logits,
    zeroshot_weights,
)

log = logging.getLogger(__name__)

EXPERIMENT_KEYS = {
    "name",
    "description",
    "k",
    "k_values",
    "eval_split",
    "methods",
    "model",
    "train",
    "method_train",
    "finetune",
    "zeroshot",
    "checkpoint",
}
DEFAULT_CHECKPOINT = {"every_s": 60.0, "resume": True}


# ------------------------------------------------------------------------------------ the plan
def _check_keys(exp: dict[str, Any]) -> None:
    # Unknown keys are tolerated (unprefixed --set overrides reach every manifest), misspellings are not.
    for key in exp:
        if key in EXPERIMENT_KEYS or str(key).startswith("_"):
            continue
        close = difflib.get_close_matches(str(key), sorted(EXPERIMENT_KEYS), n=1, cutoff=0.8)
        if close:
            raise UserError(f"experiment {exp.get('name')}: unknown key {key!r} (did you mean {close[0]!r}?)")


def _k_values(exp: dict[str, Any]) -> list[int]:
    raw = exp.get("k_values")
    values = raw if raw is not None else [exp.get("k", 32)]
    if not isinstance(values, list) or not values:
        raise UserError(
            f"experiment {exp['name']}: k_values must be a non-empty list of integers, got {raw!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"experiment {exp['name']}: k must be a positive integer, got {v!r}")
        out.append(v)
    return out


def _checkpoint_policy(exp: dict[str, Any]) -> dict[str, Any] | None:
    raw = exp.get("checkpoint", {})
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_CHECKPOINT) - {"enabled"}:
        raise UserError(f"experiment {exp['name']}: checkpoint must be false or a mapping of every_s, resume")
    if raw.get("enabled") is False:
        return None
    policy = {**DEFAULT_CHECKPOINT, **{k: v for k, v in raw.items() if k != "enabled"}}
    policy["every_s"] = float(policy["every_s"])
    return policy


def _train_config(exp: dict[str, Any], method: str) -> Any:
    """TrainConfig (feature mode) or FinetuneConfig of one method: train + finetune + method_train."""
    cls, values = TrainConfig, dict(exp.get("train", {}) or {})
    if method in FINETUNE_METHODS:
        cls = FinetuneConfig
        values.update(exp.get("finetune", {}) or {})
    values.update((exp.get("method_train", {}) or {}).get(method, {}) or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hint = " (fine-tune options go under `finetune:`)" if cls is TrainConfig else ""
        raise UserError(
            f"experiment {exp['name']}, method {method}: unknown training option(s) "
            f"{', '.join(unknown)}{hint}; known: {', '.join(sorted(names))}"
        )
    return cls(**values)


def _plan(exp: dict[str, Any], kb: dict[str, Any]) -> dict[str, Any]:
    """Validate the experiment before any data is read: methods, k values, configs, encoders."""
    _check_keys(exp)
    methods = list(exp.get("methods", FEATURE_METHODS))
    for m in methods:
        if m not in METHODS:
            raise UserError(
                f"unknown method {m!r} in experiment {exp['name']}: known are {', '.join(METHODS)}"
            )
    if not methods:
        raise UserError(f"experiment {exp['name']} lists no methods")
    configs = {m: _train_config(exp, m) for m in methods if m in TRAINED}
    if "zeroshot" in methods:
        check_aligned(kb.get("encoders", {}), kb.get("name", ""))
        templates((exp.get("zeroshot") or {}).get("templates", "openai"))
    if any(m in FINETUNE_METHODS for m in methods) and not (kb.get("encoders") or {}).get("image"):
        raise UserError(f"KB {kb.get('name')} has no encoders.image to fine-tune")
    return {
        "methods": methods,
        "k_values": _k_values(exp),
        "configs": configs,
        "checkpoint": _checkpoint_policy(exp),
    }


# ------------------------------------------------------------------------------- resume state
def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def _start_over(run_dir: Path) -> None:
    """A finished run (or resume: false) is repeated from scratch: drop its per-method state."""
    for pattern in ("*.ckpt.pt", "*.result.json", "eval.json"):
        for p in run_dir.glob(pattern):
            p.unlink()


# ------------------------------------------------------------------------------------- running
class _Context:
    """What the methods of one experiment share, loaded once and only when a method needs it."""

    def __init__(self, ws: Workspace, ds: dict, kb: dict, exp: dict, info: dict, progress: bool) -> None:
        self.ws, self.ds, self.kb, self.exp, self.info, self.progress = ws, ds, kb, exp, info, progress
        self._images: dict[tuple[str, str], Any] = {}
        self._dataset = None
        self._encoder = None

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
        out[split] = evaluate(zeroshot_logits(img, weights), labels, ctx.info["shot_split"])
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
    )
    out = {}
    for split, f in evals.items():
        out[split] = evaluate(logits[split], f.labels, ctx.info["shot_split"])
        out[split].update({"mode": METHODS[method].mode, "epochs": epochs})
        if method not in RETRIEVAL_FREE:
            out[split]["k"] = k
    return out


def _eval_splits(exp: dict[str, Any], info: dict[str, Any]) -> list[str]:
    raw = exp.get("eval_split", "test")
    splits = [raw] if isinstance(raw, str) else raw
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise UserError(f"eval_split must be a split name or a list of them, got {raw!r}")
    for s in splits:
        if s not in info["splits"]:
            raise UserError(f"eval_split {s!r} not among the dataset's splits {list(info['splits'])}")
    return splits


def run_experiment(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    exp: dict[str, Any],
    run_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every method of `exp`; writes run_dir/eval.json and returns it.

    Several eval splits (`eval_split: [webvision_val, imagenet_val]`) evaluate each trained model on
    each; results on the splits after the first are named `<method>@<split>`."""

    plan = _plan(exp, kb)
    methods, k_values, policy = plan["methods"], plan["k_values"], plan["checkpoint"]
    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(f"dataset {ds['name']} has not been prepared: run `retformer neighbors` first")
    splits = _eval_splits(exp, info)
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
        zs_evals = {s: (f.query_img, f.labels) for s, f in evals_all.items()}
        train_size = len(train_all)
    else:
        zs_evals = {}
        for s in splits:
            table = read_embeddings(ws.dataset_embeddings(ds["name"], s))
            zs_evals[s] = (torch.from_numpy(table.image_emb.astype("float32")), table.label)
        train_size = int(info["splits"].get("train", 0))
    eval_sizes = {s: len(labels) for s, (_, labels) in zs_evals.items()}

    run_dir.mkdir(parents=True, exist_ok=True)
    resume = policy is not None and policy["resume"]
    if not resume or (run_dir / "eval.json").is_file():
        _start_over(run_dir)
    ctx = _Context(ws, ds, kb, exp, info, progress)
    results: dict[str, Any] = {}
    for k in k_values:
        evals = {s: f.subset_k(k) for s, f in evals_all.items()} if need_nn else {}
        train_f = train_all.subset_k(k) if need_nn else None
        for method in methods:
            if method in RETRIEVAL_FREE and k != k_values[0]:
                continue  # k-independent: once per experiment
            key = method if len(k_values) == 1 or method in RETRIEVAL_FREE else f"{method}@k{k}"
            names = {s: key if i == 0 else f"{key}@{s}" for i, s in enumerate(splits)}
            done = run_dir / f"{_safe(key)}.result.json"
            config = plan["configs"].get(method)
            fp = result_fingerprint(
                method,
                config,
                exp.get("model") if config is not None else None,
                exp.get("zeroshot") if method == "zeroshot" else None,
                None if method in RETRIEVAL_FREE else k,
                train_size,
                eval_sizes,
            )
            previous = read_json(done) if resume else None
            if previous is not None and previous.get("fingerprint") == fp:
                log.info("%s: reusing the result of the interrupted run (%s)", key, done)
                results.update(previous["metrics"])
                continue
            started = time.perf_counter()
            if method == "knn_vote":
                if int((train_all.store_label >= 0).sum()) == 0:
                    results.update({name: {"skipped": "the KB has no labels"} for name in names.values()})
                    continue
                by_split = {}
                for s, f in evals.items():
                    scores = knn_vote(f, num_classes=int(info["num_classes"]))
                    by_split[s] = {**evaluate(scores, f.labels, info["shot_split"]), "mode": "vote", "k": k}
            elif method == "zeroshot":
                by_split = _zeroshot(ctx, zs_evals)
            else:
                by_split = _train_method(ctx, method, key, k, config, train_f, evals, run_dir, policy)
            seconds = round(time.perf_counter() - started, 2)
            metrics = {names[s]: {**m, "seconds": seconds} for s, m in by_split.items()}
            results.update(metrics)
            if policy is not None:
                write_json_atomic(done, {"fingerprint": fp, "metrics": metrics})
                (run_dir / f"{_safe(key)}.ckpt.pt").unlink(missing_ok=True)
    report = {
        "dataset": ds["name"],
        "kb": kb["name"],
        "experiment": exp["name"],
        "k": k_values[0] if len(k_values) == 1 else k_values,
        "neighbor_table_k": table_k,
        "eval_split": splits[0],
        "eval_splits": splits,
        "train_size": train_size,
        "eval_size": eval_sizes[splits[0]],
        "eval_sizes": eval_sizes,
        "shot_split": info["shot_split"],
        "config": {
            "train": exp.get("train", {}),
            "method_train": exp.get("method_train", {}) or {},
            "model": exp.get("model", {}),
            "finetune": exp.get("finetune", {}) or {},
            "zeroshot": exp.get("zeroshot", {}) or {},
            "checkpoint": policy,
        },
        "methods": results,
    }
    write_json_atomic(run_dir / "eval.json", report)
    for p in run_dir.glob("*.result.json"):
        p.unlink()
    return report


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Method x top-1 / top-5 / many / medium / few, in percent: a plain-text table rendered by rich."""
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("method", no_wrap=True)
    for name in ("top1", "top5", "many", "medium", "few"):
        table.add_column(name, justify="right", no_wrap=True)
    skipped = []
    for method, m in report["methods"].items():
        if "skipped" in m:
            skipped.append(f"{method} skipped: {m['skipped']}")
            continue
        table.add_row(method, *(_pct(m.get(key)) for key in ("top1", "top5", "many", "medium", "few")))
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, highlight=False).print(table)
    return "\n".join([out.getvalue().rstrip("\n"), *skipped])


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
