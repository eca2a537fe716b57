"""The train + evaluate stage: every method of an experiment on the same neighbour tables.

Methods (an experiment manifest lists them under `methods`):

- feature mode, frozen encoders ("w/ FE"; the fast path): `retformer` (Eq. 3-6), `retformer_no_text`,
  `retformer_no_image` (the paper's ablations), `mlp_only` (the L_I branch alone: no retrieval),
  `linear_probe` ("CLIP classifier FT") and `knn_vote` (majority label of the retrieved KB items,
  where the KB has labels);
- fine-tune mode, the KB's image encoder trained with the head (`trainer/finetune.py`):
  `retformer_ft` (the paper's "Ours"), `retformer_no_text_ft`, `retformer_no_image_ft` and
  `full_finetune` (encoder + linear head, no retrieval: "CLIP full FT");
- `zeroshot`: class-name prompts through the KB's text tower ("CLIP zero-shot"; open_clip only).

Experiment manifest keys: `k` (neighbours, default 32) or `k_values` (a sweep: one result per k and
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
import json
import logging
import re
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from artifacts.atomic import write_json_atomic
from artifacts.errors import UserError
from artifacts.workspace import Workspace, read_json

log = logging.getLogger(__name__)

FEATURE_METHODS = (
    "retformer",
    "retformer_no_text",
    "retformer_no_image",
    "mlp_only",
    "linear_probe",
    "knn_vote",
)
# fine-tune method -> the feature-mode method whose head it trains on top of the live encoder
FINETUNE_METHODS = {
    "retformer_ft": "retformer",
    "retformer_no_text_ft": "retformer_no_text",
    "retformer_no_image_ft": "retformer_no_image",
    "full_finetune": "linear_probe",
}
METHODS = (*FEATURE_METHODS, *FINETUNE_METHODS, "zeroshot")
VARIANT_OF = {"retformer": "full", "retformer_no_text": "no_text", "retformer_no_image": "no_image"}
# Methods that never look at the neighbours: one result per experiment, even in a k sweep.
RETRIEVAL_FREE = {"mlp_only", "linear_probe", "full_finetune", "zeroshot"}
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


def build_model(method: str, img_dim: int, txt_dim: int, num_classes: int, k: int, spec: dict[str, Any]):
    """The torch module of a trainable feature-mode method (or the head of a fine-tune method),
    from the experiment's `model` section."""
    from trainer.model import LinearProbe, MLPOnly, RetFormer

    method = FINETUNE_METHODS.get(method, method)
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
    from trainer.finetune import FinetuneConfig
    from trainer.train import TrainConfig

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
    configs = {m: _train_config(exp, m) for m in methods if m not in ("knn_vote", "zeroshot")}
    if "zeroshot" in methods:
        from trainer.zeroshot import check_aligned, templates

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


def _fingerprint(config: Any, model_config: dict | None, n_train: int, k: int | None) -> dict:
    """What a checkpoint must match to be resumed (JSON-normalised: tuples become lists)."""
    return json.loads(
        json.dumps({"train": asdict(config), "model": model_config, "n_train": n_train, "k": k}, default=str)
    )


def _result_fingerprint(exp: dict, method: str, config: Any, k: int, n_train: int, n_eval: dict) -> dict:
    """What a finished method's result depends on (a killed run's rerun reuses it only if equal)."""
    return json.loads(
        json.dumps(
            {
                "method": method,
                "train": asdict(config) if config is not None else None,
                "model": exp.get("model") if config is not None else None,
                "zeroshot": exp.get("zeroshot") if method == "zeroshot" else None,
                "k": None if method in RETRIEVAL_FREE else k,
                "n_train": n_train,
                "n_eval": n_eval,
            },
            default=str,
        )
    )


def _usable_checkpoint(path: Path, fingerprint: dict, ignore: set[str]) -> bool:
    """True when `path` can be resumed for this fingerprint; a stale one is deleted (with a warning)."""
    from trainer.train import load_checkpoint

    if not path.exists():
        return False
    try:
        state = load_checkpoint(path)
    except UserError as exc:
        log.warning("%s; starting over", exc)
        path.unlink(missing_ok=True)
        return False
    saved = json.loads(json.dumps(state.get("train_config") or {}, default=str))
    now = fingerprint["train"]
    same = (
        all(saved.get(k) == v for k, v in now.items() if k not in ignore)
        and json.loads(json.dumps(state.get("model_config"), default=str)) == fingerprint["model"]
        and state.get("num_train") == fingerprint["n_train"]
    )
    if not same:
        log.warning("%s was written with another config or model; starting that method over", path)
        path.unlink(missing_ok=True)
        return False
    log.info("resuming from %s (epoch %s of %s)", path, state.get("epoch"), now.get("epochs"))
    return True


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
        from trainer.finetune import SplitImages, shard_images

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
            import torch

            torch.manual_seed(seed)  # random-weight encoders (tests) are then the same in every run
            self._encoder = build_image_encoder(self.kb["encoders"]["image"])
        return self._encoder


def _zeroshot(ctx: _Context, evals: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics per eval split; evals: split -> (image embeddings, labels)."""
    from kb_builder.encoders import build_text_encoder
    from trainer.evaluate import evaluate
    from trainer.zeroshot import prompt_class_names, zeroshot_logits, zeroshot_weights

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
    import torch

    from trainer.evaluate import evaluate
    from trainer.train import fit, predict

    num_classes = int(ctx.info["num_classes"])
    torch.manual_seed(config.seed)
    head = build_model(
        method,
        train_f.query_img.shape[1],
        train_f.store_txt.shape[1],
        num_classes,
        k,
        ctx.exp.get("model", {}),
    )
    ckpt = run_dir / f"{_safe(key)}.ckpt.pt" if policy else None
    common = {
        "class_counts": ctx.info["train_class_counts"],
        "progress": ctx.progress,
        "log_path": run_dir / f"{_safe(key)}.metrics.jsonl",
        "checkpoint_path": ckpt,
        "checkpoint_every_s": policy["every_s"] if policy else 0.0,
    }
    logits: dict[str, torch.Tensor] = {}
    if method in FINETUNE_METHODS:
        from trainer.finetune import RESUMABLE_CHANGES, FinetuneModel, finetune_fit, finetune_predict

        model = FinetuneModel(ctx.image_encoder(config.seed), head)
        images = {s: ctx.images(s, f.uids, config.images) for s, f in {"train": train_f, **evals}.items()}
        if ckpt is not None:
            _usable_checkpoint(ckpt, _fingerprint(config, model.config, len(train_f), k), RESUMABLE_CHANGES)
        history = finetune_fit(model, images["train"], train_f, config, **common)
        for split, f in evals.items():
            logits[split] = finetune_predict(
                model, images[split], f, config.eval_batch_size, config.num_workers, amp=config.amp
            )
        mode = "finetune"
    else:
        from trainer.train import _RESUMABLE_CHANGES

        if ckpt is not None:
            _usable_checkpoint(ckpt, _fingerprint(config, head.config, len(train_f), k), _RESUMABLE_CHANGES)
        model = head
        history = fit(model, train_f, config, **common)
        for split, f in evals.items():
            logits[split] = predict(model, f, batch_size=config.eval_batch_size)
        mode = "frozen"
    torch.save(model.state_dict(), run_dir / f"{_safe(key)}.pt")
    out = {}
    for split, f in evals.items():
        out[split] = evaluate(logits[split], f.labels, ctx.info["shot_split"])
        out[split].update({"mode": mode, "epochs": len(history)})
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
    from trainer.baselines import knn_vote
    from trainer.evaluate import evaluate
    from trainer.features import load_retrieval_features

    plan = _plan(exp, kb)
    methods, k_values, policy = plan["methods"], plan["k_values"], plan["checkpoint"]
    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(f"dataset {ds['name']} has not been prepared: run `retformer neighbors` first")
    splits = _eval_splits(exp, info)
    dataset_dir = ws.dataset_dir(ds["name"])
    need_nn = any(m != "zeroshot" for m in methods)
    kmax = max(k_values)
    table_k = None
    if need_nn:
        available = [x for x in neighbour_k_available(ws, ds["name"], kb["name"]) if x >= kmax]
        if not available:
            raise UserError(
                f"no neighbour tables with k >= {kmax} for {ds['name']} x {kb['name']}: "
                f"run `retformer neighbors --dataset {ds['name']} --kb {kb['name']} --k {kmax}`"
            )
        table_k = available[0]
        train_all = load_retrieval_features(dataset_dir, kb["name"], table_k, "train")
        evals_all = {s: load_retrieval_features(dataset_dir, kb["name"], table_k, s) for s in splits}
        zs_evals = {s: (f.query_img, f.labels) for s, f in evals_all.items()}
        train_size = len(train_all)
    else:
        import torch

        from artifacts.embeddings_io import read_embeddings

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
            fp = _result_fingerprint(exp, method, config, k, train_size, eval_sizes)
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
        "neighbour_table_k": table_k,
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
    return "   -  " if value is None else f"{100 * float(value):6.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Method x top-1 / top-5 / many / medium / few, in percent."""
    width = max([20, *(len(m) for m in report["methods"])])
    lines = [f"{'method':<{width}} {'top1':>6} {'top5':>6} {'many':>6} {'medium':>6} {'few':>6}"]
    for method, m in report["methods"].items():
        if "skipped" in m:
            lines.append(f"{method:<{width}} skipped: {m['skipped']}")
            continue
        lines.append(
            f"{method:<{width}} {_pct(m.get('top1'))} {_pct(m.get('top5'))} {_pct(m.get('many'))} "
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
