"""One stage_* per `retformer` command, holding the command's checks; the CLI and the demo call these.

Each stage is idempotent: what is complete on disk is reused, what is missing is (re)built, and a
record lands in the workspace. Stage order: shards -> (download) -> embed -> index -> neighbors ->
train -> evaluate. The building blocks the commands share (stage_kb_shards, stage_embed_kb, ...)
take a Dask client or None; the Dask stages take where their tasks run as one `DaskTarget`
(pipelines/dask_target.py); the fan-out itself is pipelines/dask_runner.py's `task_mapper`.

This module gathers the stages' public names; each stage lives in a module of its own:
stages_manifests (manifests and `--set`), stages_shards (shards, download), stages_embed,
stages_index, stages_neighbors, stages_train (train, evaluate).
"""

from __future__ import annotations

from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.stages_embed import (
    ensure_dataset_embedded,
    kb_coverage,
    split_coverage,
    split_shard_paths,
    stage_embed,
    stage_embed_dataset,
    stage_embed_kb,
)
from retformer.pipelines.stages_index import check_kb_encoders, stage_index
from retformer.pipelines.stages_manifests import (
    datasets_for_kb,
    load_dataset_manifest,
    load_experiment,
    load_kb,
    split_overrides,
    unread_overrides,
)
from retformer.pipelines.stages_neighbors import check_split_embeddings, stage_neighbors
from retformer.pipelines.stages_shards import (
    EXTERNAL_SHARD_KINDS,
    kb_shard_paths,
    kb_shard_root,
    stage_dataset_shards,
    stage_download,
    stage_kb_shards,
    stage_shards,
)
from retformer.pipelines.stages_train import stage_evaluate, stage_train

__all__ = [
    "EXTERNAL_SHARD_KINDS",
    "DaskTarget",
    "check_kb_encoders",
    "check_split_embeddings",
    "datasets_for_kb",
    "ensure_dataset_embedded",
    "kb_coverage",
    "kb_shard_paths",
    "kb_shard_root",
    "load_dataset_manifest",
    "load_experiment",
    "load_kb",
    "split_coverage",
    "split_overrides",
    "split_shard_paths",
    "stage_dataset_shards",
    "stage_download",
    "stage_embed",
    "stage_embed_dataset",
    "stage_embed_kb",
    "stage_evaluate",
    "stage_index",
    "stage_kb_shards",
    "stage_neighbors",
    "stage_shards",
    "stage_train",
    "unread_overrides",
]
