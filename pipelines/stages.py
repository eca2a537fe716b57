"""The stages as functions from manifests + workspace to artifacts on disk, each writing a record.

Each function is idempotent: what is complete on disk is reused, what is missing is (re)built.
Stage order: shards -> embed -> index -> neighbors -> train/evaluate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from artifacts.errors import UserError
from artifacts.workspace import Workspace, read_json, write_stage_record

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- shards
EXTERNAL_SHARD_KINDS = ("webdataset", "img2dataset")


def kb_shard_root(ws: Workspace, kb: dict[str, Any]) -> Path:
    """The folder a KB's shards live under (part names are shard paths relative to it)."""
    source = kb.get("source", {})
    if source.get("kind") in EXTERNAL_SHARD_KINDS:
        return Path(source["path"])
    return ws.kb_shards(kb["name"])


def kb_shard_paths(ws: Workspace, kb: dict[str, Any]) -> list[Path]:
    """The webdataset shards of a KB: downloaded by img2dataset (complete chunks only), the user's
    own (`source.kind: webdataset`, any depth), or the ones the shards stage built."""
    from artifacts.atomic import is_leftover_tmp

    source = kb.get("source", {})
    if source.get("kind") in EXTERNAL_SHARD_KINDS:
        root = kb_shard_root(ws, kb)
        if source["kind"] == "img2dataset":
            from kb_builder.download import list_downloaded_shards

            return list_downloaded_shards(root) if root.is_dir() else []
        shards = sorted(p for p in root.rglob("*.tar") if not is_leftover_tmp(p))
        if not shards:
            raise UserError(f"no webdataset shards (*.tar) under {root} (KB {kb['name']})")
        return shards
    from kb_builder.shards import list_shards

    shard_dir = ws.kb_shards(kb["name"])
    # Only shards of complete sets: a set whose writer died before its _SUCCESS file is not listed.
    return list_shards(shard_dir) if shard_dir.is_dir() else []


def stage_kb_shards(ws: Workspace, kb: dict[str, Any], datasets: dict[str, dict]) -> dict[str, Any]:
    """Build the KB's shards from its source (demo world pool, downstream split, or both)."""
    from kb_builder.datasets import load_dataset
    from kb_builder.kb_sources import build_kb_shards

    source = kb.get("source", {})
    if source.get("kind") in EXTERNAL_SHARD_KINDS:
        shards = kb_shard_paths(ws, kb)
        return {"source": source, "shards": len(shards)}
    dataset_name = source.get("dataset")
    if dataset_name not in datasets:
        raise UserError(f"KB {kb['name']}: source.dataset {dataset_name!r} has no manifest")
    started = time.perf_counter()
    dataset = load_dataset(datasets[dataset_name])
    spec = {"name": kb["name"], **source}
    info = build_kb_shards(spec, dataset, ws.kb_shards(kb["name"]), int(kb.get("shard_size", 5000)))
    record = {
        "kb": kb["name"],
        "source": source,
        "result": info,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return write_stage_record(ws.kb_stage_record(kb["name"], "shards"), "shards", record)


def stage_dataset_shards(ws: Workspace, ds: dict[str, Any]) -> dict[str, Any]:
    """Write a downstream dataset's splits as shards and its dataset.json (classes, counts, shot split)."""
    from artifacts.atomic import write_json_atomic
    from kb_builder.datasets import load_dataset
    from kb_builder.kb_sources import write_dataset_shards

    started = time.perf_counter()
    dataset = load_dataset(ds)
    info = write_dataset_shards(dataset, ws.dataset_shards(ds["name"]), int(ds.get("shard_size", 5000)))
    # describe() applies the manifest's shot_thresholds (scaled when asked) to the train counts.
    description = dataset.describe()
    description["splits"] = description["split_sizes"]
    write_json_atomic(ws.dataset_info(ds["name"]), description)
    record = {"dataset": ds["name"], "result": info, "seconds": round(time.perf_counter() - started, 2)}
    return write_stage_record(ws.dataset_stage_record(ds["name"], "shards"), "shards", record)


def stage_download(ws: Workspace, kb: dict[str, Any], client: Any, retry_failed: bool) -> dict[str, Any]:
    """Download a KB's image-text pairs with img2dataset: one task per metadata Parquet chunk."""
    from kb_builder.download import plan_download, run_download

    source = kb.get("source", {})
    if source.get("kind") != "img2dataset":
        raise UserError(
            f"KB {kb['name']} is not downloaded (source.kind is {source.get('kind')!r}, not img2dataset)"
        )
    for key in ("metadata", "path"):
        if key not in source:
            raise UserError(f"KB {kb['name']}: source.{key} is required for img2dataset downloads")
    tasks = plan_download(source["metadata"], Path(source["path"]), source.get("settings"))
    record = run_download(client, tasks, retry_failed=retry_failed)
    return write_stage_record(
        ws.kb_stage_record(kb["name"], "download"), "download", {"kb": kb["name"], **record}
    )


# ------------------------------------------------------------------------------------------ embed
def _embed_shards(
    client: Any, shards: list[Path], root: Path, out_dir: Path, encoders: dict, options: dict, desc: str
) -> dict[str, Any]:
    """One embed task per shard; `options` are `embed_shard`'s (the manifest's `embed:` section)."""
    from kb_builder.embed import embed_shard, part_stem, summarize
    from pipelines.dask_runner import run_tasks

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(s, part_stem(s, root)) for s in shards]
    results = run_tasks(
        client,
        embed_shard,
        tasks,
        desc=desc,
        count_key="images",
        out_dir=out_dir,
        image_spec=encoders["image"],
        text_spec=encoders.get("text"),
        **options,
    )
    summary = summarize(results, out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["images_per_s"] = round(summary["embedded_this_run"] / max(summary["seconds"], 1e-9), 1)
    return summary


def stage_embed_kb(ws: Workspace, kb: dict[str, Any], client: Any) -> dict[str, Any]:
    """Embed every KB shard (missing parts only) into work/kb/<kb>/embeddings/."""
    shards = kb_shard_paths(ws, kb)
    if not shards:
        raise UserError(f"KB {kb['name']} has no shards yet: run `retformer shards --kb {kb['name']}` first")
    out = ws.kb_embeddings(kb["name"])
    _guard_encoder_change(ws.kb_stage_record(kb["name"], "embed"), kb["encoders"], out)
    from kb_builder.embed import embed_options

    options = embed_options(kb.get("embed"))
    summary = _embed_shards(
        client, shards, kb_shard_root(ws, kb), out, kb["encoders"], options, f"embed {kb['name']}"
    )
    record = {"kb": kb["name"], "encoders": kb["encoders"], "shards": len(shards), **summary}
    return write_stage_record(ws.kb_stage_record(kb["name"], "embed"), "embed", record)


def stage_embed_dataset(
    ws: Workspace, ds: dict[str, Any], encoders: dict, client: Any, embed_cfg: dict | None = None
) -> dict[str, Any]:
    """Embed a downstream dataset's splits with the KB's encoders (the same feature space);
    `embed_cfg` is an `embed:` section (the KB's), defaults when None."""
    from kb_builder.embed import embed_options

    options = embed_options(embed_cfg)
    shard_dir = ws.dataset_shards(ds["name"])
    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(
            f"dataset {ds['name']} has no shards yet: run `retformer shards --dataset {ds['name']}`"
        )
    from kb_builder.shards import list_shards

    records = {}
    for split in info["splits"]:
        shards = [p for p in list_shards(shard_dir) if p.name.startswith(f"{split}-")]
        out = ws.dataset_embeddings(ds["name"], split)
        _guard_encoder_change(ws.dataset_stage_record(ds["name"], f"embed-{split}"), encoders, out)
        records[split] = _embed_shards(
            client, shards, shard_dir, out, encoders, options, f"embed {ds['name']}/{split}"
        )
        write_stage_record(
            ws.dataset_stage_record(ds["name"], f"embed-{split}"),
            "embed",
            {"dataset": ds["name"], "split": split, "encoders": encoders, **records[split]},
        )
    return records


def _guard_encoder_change(record_path: Path, encoders: dict, out_dir: Path) -> None:
    """Parts embedded with other encoders are stale: remove them so they are recomputed."""
    previous = read_json(record_path)
    if previous and previous.get("encoders") != encoders and out_dir.is_dir():
        log.warning("encoders changed since the last embed of %s: re-embedding", out_dir)
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()


# ------------------------------------------------------------------------------------------ index
def stage_index(ws: Workspace, kb: dict[str, Any], client: Any | None = None) -> dict[str, Any]:
    """Choose, build (sharded), tune and recall-check the KB's faiss index."""
    from kb_builder.index_stage import build_kb_index

    record = build_kb_index(
        ws.kb_embeddings(kb["name"]), ws.kb_index(kb["name"]), kb.get("index", {}), client=client
    )
    return write_stage_record(ws.kb_stage_record(kb["name"], "index"), "index", {"kb": kb["name"], **record})


# -------------------------------------------------------------------------------------- neighbors
def stage_neighbors(ws: Workspace, ds: dict[str, Any], kb: dict[str, Any], k: int) -> dict[str, Any]:
    """Top-k KB neighbours for every split of the dataset, plus the compact store."""
    from kb_builder.index_stage import load_kb_index
    from kb_builder.neighbors import run_neighbors

    info = read_json(ws.dataset_info(ds["name"]))
    if info is None:
        raise UserError(
            f"dataset {ds['name']} is not embedded yet: run `retformer embed --dataset {ds['name']}`"
        )
    index = load_kb_index(ws.kb_index(kb["name"]))
    query_dirs = {split: ws.dataset_embeddings(ds["name"], split) for split in info["splits"]}
    out = ws.neighbors_dir(ds["name"], kb["name"], k)
    record = run_neighbors(index, ws.kb_embeddings(kb["name"]), query_dirs, out, k)
    record.update({"dataset": ds["name"], "kb": kb["name"]})
    return write_stage_record(out / "_neighbors.json", "neighbors", record)
