"""`retformer evaluate RUN --kb OTHER`: a trained run's models evaluated with another (or a grown) KB.

World knowledge kept outside the parameters can be changed without retraining: the run's eval split
gets neighbour tables against OTHER (that split only, through the neighbors stage, cached like any
table set: `datasets/<d>/neighbors/<OTHER>/k<k>/`), and every model the run saved (`<result>.pt`)
is evaluated on them as it was selected: the stacked rule's alpha and gate live in the model file.
kNN vote is recounted with its selected k (or skipped when OTHER's labels are not the dataset's
classes); zero-shot does not read the KB and is copied. The results go to `<run>/eval.<OTHER>.json`
(predictions under `<run>/predictions.<OTHER>/`); the run's eval.json and predictions stay as they
are, and report.html shows each such evaluation as "trained with A, evaluated with B".

OTHER must be embedded with the run's encoders and the embed options that shape the vectors
(`pipelines/use/kb_check.py`); otherwise one error line names both. The same check serves `retformer
predict RUN --kb OTHER` and `Run.predict(..., kb=...)` (pipelines/use/).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from retformer.artifacts import manifest
from retformer.artifacts.atomic import write_json_atomic
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.run_index import eval_file
from retformer.pipelines.use.kb_check import check_kb_compatible

log = logging.getLogger(__name__)


def _run_dir(ws: Workspace, run: str | None) -> Path:
    from retformer.pipelines.stages import stage_evaluate

    name, _ = stage_evaluate(ws, run)
    return ws.run_dir(name)


def _write_table(run_dir: Path, rel: str, scores: Any, f: Any, shot: Any) -> str:
    """A result's per-sample predictions (trainer.evaluate.prediction_table) at `<run>/<rel>`."""
    import pyarrow.parquet as pq

    from retformer.artifacts.atomic import atomic_path
    from retformer.trainer.evaluate import prediction_table

    with atomic_path(Path(run_dir) / rel) as tmp:
        pq.write_table(prediction_table(scores, f.labels, f.uids, shot), tmp)
    return rel


def _index_summary(index: dict[str, Any]) -> dict[str, Any]:
    out = {k: index.get(k) for k in ("factory", "n", "key", "created")}
    out["recall"] = (index.get("recall_check") or {}).get("recall")
    if index.get("grown"):
        out["grown"] = index["grown"]
    if index.get("rebuilt"):
        out["rebuilt"] = index["rebuilt"]
    return out


def stage_evaluate_kb(
    ws: Workspace,
    run: str | None,
    kb: str,
    overrides: list[str] | None = None,
    *,
    dask: DaskTarget | None = None,
) -> tuple[str, dict[str, Any]]:
    """`retformer evaluate [RUN] --kb OTHER`: (run name, the report written to eval.<OTHER>.json)."""
    import torch

    from retformer.artifacts.names import safe_name
    from retformer.kb_builder.datasets.schema import validate_dataset
    from retformer.pipelines import stages
    from retformer.pipelines.stages_embed import encoders_given
    from retformer.pipelines.use.model_file import model_files
    from retformer.trainer.baselines import kb_label_problem, knn_vote
    from retformer.trainer.checkpoint import load_saved_model
    from retformer.trainer.evaluate import evaluate
    from retformer.trainer.features import load_retrieval_features
    from retformer.trainer.selection import shuffled
    from retformer.trainer.train import predict

    started = time.perf_counter()
    run_dir = _run_dir(ws, run)
    original = read_json(run_dir / "eval.json") or {}
    kb_m = stages.load_kb(kb, overrides)
    other = kb_m.name
    saved = {stem: load_saved_model(path) for stem, path in model_files(run_dir).items()}
    infos = [s.info for s in saved.values() if s.info]
    if infos:
        ds = validate_dataset(infos[0]["dataset"])  # the manifest the model was trained with
        encoders, embed = infos[0]["encoders"], infos[0].get("embed")
    else:  # a run of kNN vote / zero-shot only: its manifests as they are now
        ds = stages.load_dataset_manifest(original["dataset"], overrides)
        trained_kb = stages.load_kb(original["kb"], overrides)
        encoders, embed = encoders_given(trained_kb.encoders), trained_kb.as_loaded().get("embed")
    index = check_kb_compatible(ws, other, run_dir.name, encoders, embed, kb_m)
    splits = list(original.get("eval_splits") or [original["eval_split"]])
    table_k = original.get("neighbor_table_k")
    if table_k is None:
        raise UserError(f"run {run_dir.name} read no neighbour tables: there is nothing a KB changes")
    nn = stages.stage_neighbors(ws, ds, kb_m, int(table_k), splits=splits, dask=dask)
    info = read_json(ws.dataset_info(ds.name)) or {}
    shot, num_classes = info.get("shot_split"), int(info["num_classes"])
    seed = int((original.get("config", {}).get("select") or {}).get("shuffle_seed", 123))
    feats = {s: load_retrieval_features(ws, ds.name, other, int(table_k), s) for s in splits}
    out_dir = f"predictions.{other}"

    def scored(scores: Any, f: Any, name: str, **extra: Any) -> dict[str, Any]:
        m = {**evaluate(scores, f.labels, shot), **extra}
        m["predictions"] = _write_table(run_dir, f"{out_dir}/{safe_name(name)}.parquet", scores, f, shot)
        return m

    def row_names(key: str) -> dict[str, str]:
        return {s: key if i == 0 else f"{key}@{s}" for i, s in enumerate(splits)}

    methods: dict[str, Any] = {}
    with output_lock(eval_file(run_dir, other), f"the evaluation of run {run_dir.name} with KB {other}"):
        for stem, model in saved.items():
            key = model.info.get("result") or stem
            if model.model.config.get("kind") == "finetune":
                for name in row_names(key).values():
                    methods[name] = {"skipped": "a fine-tuned model reads images: not evaluated with --kb"}
                continue
            k = int(model.info.get("k") or table_k)
            for s, name in row_names(key).items():
                f = feats[s].subset_k(k)
                before = original.get("methods", {}).get(name, {})
                keep = {x: before[x] for x in ("selected", "select_split", "mode", "epochs") if x in before}
                with torch.inference_mode():
                    methods[name] = scored(predict(model.model, f), f, name, k=k, **keep)
                    if f"{name}:shuffled" in original.get("methods", {}):
                        ctl = f"{name}:shuffled"
                        logits = predict(model.model, shuffled(f, seed))
                        methods[ctl] = scored(logits, f, ctl, k=k, control="neighbors shuffled", **keep)
        for name, row in original.get("methods", {}).items():
            base = name.split("@", 1)[0].split(":", 1)[0]
            if name in methods or base not in ("knn_vote", "zeroshot"):
                continue
            if base == "zeroshot" or "skipped" in row:
                methods[name] = {**row, "note": "reads no KB: the run's own figure"}
                continue
            split = next((s for s, n in row_names("knn_vote").items() if n == name), splits[0])
            f = feats[split]
            source = getattr(kb_m.source, "dataset", None)
            if source:  # a dataset manifest's name or path, as the shards stage reads it
                try:
                    source = manifest.load("datasets", source).get("name", source)
                except UserError:
                    pass  # a name without a manifest here: compared as given
            other_info = read_json(ws.dataset_info(source)) if source and source != ds.name else None
            problem = kb_label_problem(
                f.store_label,
                num_classes,
                ds.name,
                info.get("class_names"),
                source,
                (other_info or {}).get("class_names"),
            )
            if problem is not None:
                methods[name] = {"skipped": problem}
                continue
            k = min(int(row.get("k") or table_k), f.k)
            votes = knn_vote(f.subset_k(k), num_classes)
            keep = {x: row[x] for x in ("selected",) if x in row}
            methods[name] = scored(votes, f, name, mode="vote", k=k, **keep)
        report = {
            **{k: v for k, v in original.items() if k not in ("methods", "kb")},
            "kb": other,
            "trained_kb": original.get("kb"),
            "evaluated_kb": other,
            "kb_index": _index_summary(index),
            "neighbor_tables": {
                "dir": str(ws.neighbors_dir(ds.name, other, int(table_k)).relative_to(ws.root)),
                "reused": bool(nn.get("reused")),
                "splits": splits,
            },
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 2),
            "methods": methods,
        }
        write_json_atomic(eval_file(run_dir, other), report)
    try:
        from retformer.pipelines.report import write_report

        write_report(run_dir)  # its "other knowledge bases" section lists this evaluation
    except UserError as exc:
        log.warning("report.html not updated: %s", exc)
    return run_dir.name, report
