"""The shards stages: a KB's and a dataset's webdataset shards (built, downloaded or the user's own)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.workspace import Workspace, write_stage_record
from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.stages_manifests import datasets_for_kb

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest

EXTERNAL_SHARD_KINDS = ("webdataset", "img2dataset")


def kb_shard_root(ws: Workspace, kb: KBManifest) -> Path:
    """The folder a KB's shards live under (part names are shard paths relative to it)."""
    source = kb.source
    if source.kind in EXTERNAL_SHARD_KINDS:
        return Path(source.path)  # type: ignore[union-attr]
    return ws.kb_shards(kb.name)


def kb_shard_paths(ws: Workspace, kb: KBManifest) -> list[Path]:
    """The webdataset shards of a KB: downloaded by img2dataset (complete chunks only), the user's
    own (`source.kind: webdataset`, any depth), or the ones the shards stage built."""
    from retformer.artifacts.atomic import is_leftover_tmp

    if kb.source.kind in EXTERNAL_SHARD_KINDS:
        root = kb_shard_root(ws, kb)
        if kb.source.kind == "img2dataset":
            from retformer.kb_builder.download import list_downloaded_shards

            return list_downloaded_shards(root) if root.is_dir() else []
        shards = sorted(p for p in root.rglob("*.tar") if not is_leftover_tmp(p))
        if not shards:
            raise UserError(f"no webdataset shards (*.tar) under {root} (KB {kb.name})")
        return shards
    from retformer.artifacts.shards import list_shards

    shard_dir = ws.kb_shards(kb.name)
    # Only shards of complete sets: a set whose writer died before its _SUCCESS file is not listed.
    return list_shards(shard_dir) if shard_dir.is_dir() else []


def stage_kb_shards(ws: Workspace, kb: KBManifest, datasets: dict[str, DatasetManifest]) -> dict[str, Any]:
    """Build the KB's shards from its source (demo world pool, downstream split, or both)."""
    from retformer.kb_builder.datasets import load_dataset
    from retformer.kb_builder.kb_sources import build_kb_shards

    source = kb.as_loaded()["source"]  # as written: the record keeps its values unchanged
    if kb.source.kind in EXTERNAL_SHARD_KINDS:
        shards = kb_shard_paths(ws, kb)
        return {"source": source, "shards": len(shards)}
    dataset_name = kb.source.dataset  # type: ignore[union-attr]
    if dataset_name not in datasets:
        raise UserError(f"KB {kb.name}: source.dataset {dataset_name!r} has no manifest")
    started = time.perf_counter()
    dataset = load_dataset(datasets[dataset_name])
    # One writer per shard folder; a complete set (its _SUCCESS manifest matches) is not rewritten.
    with output_lock(ws.kb_shards(kb.name), f"the shards of KB {kb.name}"):
        info = build_kb_shards(kb.source, dataset, ws.kb_shards(kb.name), kb.shard_size, kb.name)  # type: ignore[arg-type]
    record = {
        "kb": kb.name,
        "source": source,
        "result": info,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return write_stage_record(ws.kb_stage_record(kb.name, "shards"), "shards", record)


def stage_dataset_shards(ws: Workspace, ds: DatasetManifest) -> dict[str, Any]:
    """Write a downstream dataset's splits as shards and its dataset.json (classes, counts, shot split)."""
    from retformer.artifacts.atomic import write_json_atomic
    from retformer.kb_builder.datasets import load_dataset
    from retformer.kb_builder.kb_sources import write_dataset_shards

    started = time.perf_counter()
    dataset = load_dataset(ds)
    shard_dir = ws.dataset_shards(ds.name)
    with output_lock(shard_dir, f"the shards of dataset {ds.name}"):
        info = write_dataset_shards(dataset, shard_dir, ds.shard_size)
        # describe() applies the manifest's shot_thresholds (scaled when asked) to the train counts.
        description = dataset.describe()
        description["splits"] = description["split_sizes"]
        write_json_atomic(ws.dataset_info(ds.name), description)
    record = {"dataset": ds.name, "result": info, "seconds": round(time.perf_counter() - started, 2)}
    return write_stage_record(ws.dataset_stage_record(ds.name, "shards"), "shards", record)


def stage_shards(
    ws: Workspace, kb: KBManifest | None, ds: DatasetManifest | None, overrides: list[str] | None
) -> dict[str, dict[str, Any]]:
    """`retformer shards`: a KB's shards and / or a dataset's split shards; records by name."""
    if kb is None and not ds:
        raise UserError("give --kb NAME and/or --dataset NAME")
    records = {}
    if kb is not None:
        records[kb.name] = stage_kb_shards(ws, kb, datasets_for_kb(kb, overrides))
    if ds:
        records[ds.name] = stage_dataset_shards(ws, ds)
    return records


def stage_download(
    ws: Workspace,
    kb: KBManifest,
    retry_failed: bool = False,
    *,
    dask: DaskTarget | None = None,
) -> dict[str, Any]:
    """`retformer download`: a KB's image-text pairs with img2dataset, one task per metadata chunk, on
    `dask` (a LocalCluster by default)."""
    from retformer.kb_builder.download import normalize_settings, plan_download, run_download

    source = kb.source
    if source.kind != "img2dataset":
        raise UserError(f"KB {kb.name} is not downloaded (source.kind is {source.kind!r}, not img2dataset)")
    # metadata and path: required by the schema (Img2datasetSource)
    tasks = plan_download(source.metadata, Path(source.path), normalize_settings(source.settings))
    with ExitStack() as stack:
        record = run_download(
            (dask or DaskTarget()).map_tasks(stack, parallel=True), tasks, retry_failed=retry_failed
        )
    return write_stage_record(ws.kb_stage_record(kb.name, "download"), "download", {"kb": kb.name, **record})
