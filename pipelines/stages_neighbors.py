"""The neighbors stage: top-k KB neighbors of every dataset split (kb_builder/neighbors.py), after
the checks that the KB's index and the split's embeddings are those of their current shards."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from retformer.artifacts.embeddings_io import list_parts, part_num_rows
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.names import INDEX_JSON
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.dask_runner import task_mapper
from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.stages_embed import ensure_dataset_embedded, kb_coverage, split_coverage
from retformer.pipelines.stages_index import check_kb_encoders

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest


def _check_index_matches_kb(ws: Workspace, kb: KBManifest, index_rec: dict[str, Any]) -> None:
    """The KB's embeddings are those of its current shard set (all of them, unless the index was built
    with --allow-partial), and the index was built from exactly the parts in its folder now: the
    neighbor tables' kb_ids count rows over those parts."""
    name = kb.name
    covered = kb_coverage(ws, kb)
    if covered.extra or (covered.missing and not index_rec.get("partial")):
        raise UserError(
            covered.describe(f"KB {name}'s embeddings do not match its shards")
            + f": rerun `retformer embed --kb {name}` and `retformer index --kb {name}`"
        )
    indexed = [(p.get("name"), p.get("rows")) for p in index_rec.get("parts", [])]
    present = [(p.name, part_num_rows(p)) for p in list_parts(ws.kb_embeddings(name))]
    if indexed != present:
        raise UserError(
            f"the index of KB {name} was built from other embeddings parts than the KB has now "
            f"({len(indexed)} parts, {sum(r for _, r in indexed)} rows indexed; {len(present)} parts, "
            f"{sum(r for _, r in present)} rows now): rerun `retformer index --kb {name}`"
        )


def check_split_embeddings(ws: Workspace, dataset: str, kb: str, splits: Any) -> None:
    """Every split's embeddings are exactly the parts of its current shards (a test image deleted and
    re-sharded is no longer evaluated); a dataset without shards (embeddings brought as they are) has
    nothing to check."""
    if not ws.dataset_shards(dataset).is_dir():
        return
    for split in splits:
        covered = split_coverage(ws, dataset, split)
        if not covered.exact:
            raise UserError(
                covered.describe(f"dataset {dataset} split {split}: its embeddings do not match its shards")
                + f": rerun `retformer neighbors --dataset {dataset} --kb {kb}` (it embeds what changed)"
            )


def _kb_rows(ws: Workspace, kb_name: str) -> int:
    return sum(part_num_rows(p) for p in list_parts(ws.kb_embeddings(kb_name)))


def stage_neighbors(
    ws: Workspace,
    ds: DatasetManifest,
    kb: KBManifest,
    k: int | None = None,
    client: Any | None = None,
    *,
    dask: DaskTarget | None = None,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """`retformer neighbors`: top-k KB neighbors for every split of the dataset (embedded first when
    needed), plus the compact store. `k` defaults to the dataset manifest's `neighbors.k` (32).
    `splits`: these splits only (`evaluate --kb`: the eval split); a set holding more is reused.

    The search tasks (one per split, or per slice of a large split) run on `client` when given, else on
    `dask` under its one rule (`DaskTarget.runs_here`: on its cluster when given, else in this process);
    the dataset's embedding (when needed) always on a cluster.
    """
    from retformer.kb_builder.neighbors import run_neighbors

    dask = dask or DaskTarget()
    k = int(k if k is not None else ds.neighbors.k)
    if k < 1:
        raise UserError(f"k must be >= 1 (got {k})")
    # index.json lands only after the recall check (kb_builder/index): its check is what makes it usable.
    index_rec = read_json(ws.kb_index(kb.name) / INDEX_JSON) or {}
    if "recall_check" not in index_rec:
        raise UserError(f"KB {kb.name} has no index: run `retformer index --kb {kb.name}` first")
    check_kb_encoders(ws, kb)
    _check_index_matches_kb(ws, kb, index_rec)
    rows = _kb_rows(ws, kb.name)
    if k > rows:
        raise UserError(f"k={k} is larger than the knowledge base {kb.name} ({rows} rows)")
    ensure_dataset_embedded(ws, ds, kb, dask)
    info = read_json(ws.dataset_info(ds.name))
    wanted = [s for s in info["splits"] if splits is None or s in splits]
    query_dirs = {split: ws.dataset_embeddings(ds.name, split) for split in wanted}
    out = ws.neighbors_dir(ds.name, kb.name, k)

    def run(map_tasks: Any) -> dict[str, Any]:
        index_dir, emb_dir = ws.kb_index(kb.name), ws.kb_embeddings(kb.name)
        extra = {"dataset": ds.name, "kb": kb.name}
        return run_neighbors(index_dir, emb_dir, query_dirs, out, k, map_tasks, record_extra=extra)

    # One writer per table set; run_neighbors skips a complete one (also after waiting here).
    with output_lock(out, f"the neighbor tables {out}"), ExitStack() as stack:
        return run(task_mapper(client) if client is not None else dask.map_tasks(stack, parallel=False))
