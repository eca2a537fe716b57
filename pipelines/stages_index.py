"""The index stage: the KB's faiss index (kb_builder/index), and the check that the KB's embeddings
were made with the encoders its manifest names."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from retformer.artifacts.embeddings_io import list_parts, part_num_rows
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.workspace import Workspace, read_json, write_stage_record
from retformer.pipelines.dask_runner import task_mapper
from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.stages_embed import encoders_given, kb_coverage

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import KBManifest

log = logging.getLogger(__name__)


def stage_index(
    ws: Workspace,
    kb: KBManifest,
    client: Any | None = None,
    *,
    dask: DaskTarget | None = None,
    allow_partial: bool = False,
    in_process: bool = False,
) -> dict[str, Any]:
    """`retformer index`: choose, build (sharded), tune and recall-check the KB's faiss index.

    The index holds exactly the parts of the KB's current shard set: a shard without a part made from
    it (an embed interrupted, or not rerun after `retformer shards`) is refused unless `allow_partial`
    (then the parts there are indexed and index.json records `partial`), a part of a shard no longer in
    the set always is, and so is a uid that two samples share.

    Tasks run on `client` when given; otherwise on `dask` under its one rule (`DaskTarget.runs_here`: on
    a cluster for a sharded build or a given target, a one-shard build here, faster than a cluster's
    start); `in_process` runs even a sharded build here (a tiny KB, the tests' workspace).
    """
    from retformer.kb_builder.embed.parts import check_unique_uids
    from retformer.kb_builder.index import run_index

    name = kb.name
    if not list_parts(ws.kb_embeddings(name)):
        raise UserError(f"KB {name} has no embeddings: run `retformer embed --kb {name}` first")
    covered = kb_coverage(ws, kb)
    if covered.extra:
        raise UserError(
            covered.describe(f"KB {name}'s embeddings do not match its shards")
            + f": rerun `retformer embed --kb {name}` (it removes them), then index"
        )
    if covered.missing and not (allow_partial and covered.parts):
        raise UserError(
            covered.describe(f"KB {name} is not completely embedded")
            + f": rerun `retformer embed --kb {name}` (finished parts are kept)"
            + ("" if allow_partial else ", or pass --allow-partial to index the embedded shards only")
        )
    partial = None
    if covered.missing:
        partial = {"shards": len(covered.shards), "shards_without_part": len(covered.missing)}
        log.warning(
            "KB %s: indexing %d of %d shards (--allow-partial)",
            name,
            len(covered.parts),
            len(covered.shards),
        )
    if sum(part_num_rows(p) for p in covered.parts) == 0:
        raise UserError(f"the KB {name} is empty: its embeddings parts hold no rows (see its shards)")
    check_kb_encoders(ws, kb)
    check_unique_uids(covered.parts, covered.part_of, f"KB {name}")

    def run(map_tasks: Any) -> dict[str, Any]:
        emb_dir, index_dir = ws.kb_embeddings(name), ws.kb_index(name)
        return run_index(emb_dir, index_dir, kb.index, map_tasks, parts=covered.parts, partial=partial)

    # One writer per index folder; run_index skips a complete, recall-checked index (also after a wait).
    with output_lock(ws.kb_index(kb.name), f"the index of KB {kb.name}"), ExitStack() as stack:
        if client is not None or in_process:
            record = run(task_mapper(client))
        else:
            sharded = kb.index.num_shards > 1
            record = run((dask or DaskTarget()).map_tasks(stack, parallel=sharded))
    return write_stage_record(ws.kb_stage_record(kb.name, "index"), "index", {"kb": kb.name, **record})


def check_kb_encoders(ws: Workspace, kb: KBManifest) -> None:
    """The KB's embeddings (and so its index) were made with the encoders the manifest names now;
    otherwise the dataset would be embedded into another space than the one searched."""
    done = read_json(ws.kb_stage_record(kb.name, "embed"), torn_ok=True)
    encoders = encoders_given(kb.encoders)
    if done and done.get("encoders") != encoders:
        raise UserError(
            f"KB {kb.name} was embedded with encoders {_encoder_names(done.get('encoders'))}, the "
            f"manifest names {_encoder_names(encoders)}: rerun `retformer embed --kb {kb.name}` "
            f"and `retformer index --kb {kb.name}` (or use the encoders it was embedded with)"
        )


def _encoder_names(encoders: Any) -> str:
    parts = []
    for role, spec in (encoders or {}).items():
        if spec:
            detail = "/".join(str(spec[k]) for k in ("model", "pretrained") if spec.get(k))
            parts.append(f"{role}={spec.get('name')}" + (f"({detail})" if detail else ""))
    return ", ".join(parts) or "none"
