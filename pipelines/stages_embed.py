"""The embed stage: a KB's shards and a dataset's splits, with the KB's encoders, on a Dask cluster
(one task per shard; `kb_builder.embed`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retformer.artifacts.devices import resolve_device
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.workspace import Workspace, read_json, write_stage_record
from retformer.pipelines.dask_runner import dask_client, task_mapper
from retformer.pipelines.dask_target import DaskTarget
from retformer.pipelines.stages_manifests import datasets_for_kb
from retformer.pipelines.stages_shards import (
    EXTERNAL_SHARD_KINDS,
    kb_shard_paths,
    kb_shard_root,
    stage_dataset_shards,
    stage_kb_shards,
)

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import EmbedSection, Encoders, KBManifest

log = logging.getLogger(__name__)


def _embed_shards(
    client: Any,
    shards: list[Path],
    root: Path,
    out_dir: Path,
    encoders: Encoders,
    embed: EmbedSection,
    desc: str,
) -> dict[str, Any]:
    """One embed task per shard on `client`; `embed`: the manifest's `embed:` (`embed_shard`'s options).
    One writer per embeddings folder (a KB's, a dataset split's): a second run waits, then finds the
    parts written and skips them."""
    from retformer.kb_builder.embed import run_embed

    with output_lock(out_dir, f"the embeddings {out_dir}"):
        return run_embed(shards, root, out_dir, encoders, embed, desc, task_mapper(client))


def stage_embed(
    ws: Workspace,
    kb: KBManifest,
    ds: DatasetManifest | None,
    overrides: list[str] | None,
    *,
    dask: DaskTarget | None = None,
) -> dict[str, dict[str, Any]]:
    """`retformer embed`: the KB's shards (built first when missing) and, with `ds`, the dataset's
    splits with the KB's encoders, on `dask` (a LocalCluster by default: embedding is always parallel);
    records by title (`<kb>`, `<dataset>/<split>`)."""
    dask = dask or DaskTarget()
    if dask.local:  # GPUs torch cannot use fail now, not after the shards are built
        resolve_device(kb.embed.device, f"embed of KB {kb.name}")
    if not kb_shard_paths(ws, kb):
        stage_kb_shards(ws, kb, datasets_for_kb(kb, overrides))
    if ds and read_json(ws.dataset_info(ds.name), torn_ok=True) is None:
        stage_dataset_shards(ws, ds)
    with dask_client(**dask.client_options, gpu=True) as client:
        records = {kb.name: stage_embed_kb(ws, kb, client)}
        if ds:
            for split, rec in stage_embed_dataset(ws, ds, kb.encoders, client, kb.embed).items():
                records[f"{ds.name}/{split}"] = rec
    return records


def _shards_held(shard_dir: Path | None, what: str) -> Any:
    """The lock of a shard folder the shards stage writes (None: the user's or img2dataset's shards,
    which it does not): held while embedding it, so that a `retformer shards` rewriting the set waits
    for the embed instead of changing the shards under it (the parts would then mix two sets)."""
    return output_lock(shard_dir, what) if shard_dir is not None else nullcontext()


def stage_embed_kb(ws: Workspace, kb: KBManifest, client: Any) -> dict[str, Any]:
    """Embed every KB shard (missing parts only) into work/kb/<kb>/embeddings/; the folder then holds
    exactly the parts of the KB's current shard set, and every uid in it is unique."""
    from retformer.kb_builder.embed.parts import check_unique_uids, embed_coverage

    name = kb.name
    own = kb.source.kind not in EXTERNAL_SHARD_KINDS
    with _shards_held(ws.kb_shards(name) if own else None, f"the shards of KB {name}"):
        shards = kb_shard_paths(ws, kb)
        if not shards:
            raise UserError(f"KB {name} has no shards yet: run `retformer shards --kb {name}` first")
        out = ws.kb_embeddings(name)
        _guard_encoder_change(ws.kb_stage_record(name, "embed"), kb.encoders, out)
        root = kb_shard_root(ws, kb)
        summary = _embed_shards(client, shards, root, out, kb.encoders, kb.embed, f"embed {name}")
        covered = embed_coverage(shards, root, out)
    check_unique_uids(covered.parts, covered.part_of, f"KB {name}")
    if summary["images"] == 0:
        # Refused here: the index stage would only report a k larger than a 0-row KB.
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        named = ", ".join(str(s) for s in shards[:3]) + more
        raise UserError(
            f"the KB {name} is empty: its {len(shards)} shard(s) ({named}) hold no embeddable "
            f"sample (skipped: {summary['skipped'] or 'none'})"
        )
    record = {
        "kb": name,
        "encoders": encoders_given(kb.encoders),
        "embed": kb.as_loaded().get("embed") or {},  # evaluate / predict --kb compare them with a run's
        "shards": len(shards),
        **summary,
    }
    return write_stage_record(ws.kb_stage_record(name, "embed"), "embed", record)


def stage_embed_dataset(
    ws: Workspace, ds: DatasetManifest, encoders: Encoders, client: Any, embed: EmbedSection | None = None
) -> dict[str, Any]:
    """Embed a downstream dataset's splits with the KB's encoders (the same feature space);
    `embed` is an `embed:` section (the KB's), defaults when None."""
    from retformer.kb_builder.kb_schema import EmbedSection

    embed = embed or EmbedSection()
    shard_dir = ws.dataset_shards(ds.name)
    info = read_json(ws.dataset_info(ds.name))
    if info is None:
        raise UserError(f"dataset {ds.name} has no shards yet: run `retformer shards --dataset {ds.name}`")
    records = {}
    for split in info["splits"]:
        out = ws.dataset_embeddings(ds.name, split)
        _guard_encoder_change(ws.dataset_stage_record(ds.name, f"embed-{split}"), encoders, out)
        with _shards_held(shard_dir, f"the shards of dataset {ds.name}"):
            shards = split_shard_paths(ws, ds.name, split)
            records[split] = _embed_shards(
                client, shards, shard_dir, out, encoders, embed, f"embed {ds.name}/{split}"
            )
        if records[split]["images"] == 0:
            raise UserError(
                f"split {split} of dataset {ds.name} is empty: its {len(shards)} shard(s) in "
                f"{shard_dir} hold no embeddable sample (skipped: {records[split]['skipped'] or 'none'})"
            )
        write_stage_record(
            ws.dataset_stage_record(ds.name, f"embed-{split}"),
            "embed",
            {"dataset": ds.name, "split": split, "encoders": encoders_given(encoders), **records[split]},
        )
    return records


def split_shard_paths(ws: Workspace, dataset: str, split: str) -> list[Path]:
    """The shards of one split of a dataset (its complete shard set)."""
    from retformer.artifacts.shards import list_shards

    shard_dir = ws.dataset_shards(dataset)
    return [p for p in list_shards(shard_dir) if p.name.startswith(f"{split}-")] if shard_dir.is_dir() else []


def kb_coverage(ws: Workspace, kb: KBManifest) -> Any:
    """How the KB's embeddings folder matches its current shard set (kb_builder/embed/parts.py)."""
    from retformer.kb_builder.embed.parts import embed_coverage

    return embed_coverage(kb_shard_paths(ws, kb), kb_shard_root(ws, kb), ws.kb_embeddings(kb.name))


def split_coverage(ws: Workspace, dataset: str, split: str) -> Any:
    """How a dataset split's embeddings folder matches the split's current shard set."""
    from retformer.kb_builder.embed.parts import embed_coverage

    shards = split_shard_paths(ws, dataset, split)
    return embed_coverage(shards, ws.dataset_shards(dataset), ws.dataset_embeddings(dataset, split))


def encoders_given(encoders: Encoders) -> dict[str, Any]:
    """The `encoders:` section as the manifest gave it: what the embed records store and compare."""
    return encoders.model_dump(exclude_unset=True)


def _guard_encoder_change(record_path: Path, encoders: Encoders, out_dir: Path) -> None:
    """Parts embedded with other encoders are stale: remove them so they are recomputed."""
    previous = read_json(record_path, torn_ok=True)
    if previous and previous.get("encoders") != encoders_given(encoders) and out_dir.is_dir():
        log.warning("encoders changed since the last embed of %s: re-embedding", out_dir)
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()


def ensure_dataset_embedded(ws: Workspace, ds: DatasetManifest, kb: KBManifest, dask: DaskTarget) -> None:
    """Shard and embed the dataset with the KB's encoders, on `dask`, unless its embed records already
    match."""
    info = read_json(ws.dataset_info(ds.name), torn_ok=True)
    if info is None:  # never sharded, or its dataset.json torn: the shards stage redoes it
        stage_dataset_shards(ws, ds)
        info = read_json(ws.dataset_info(ds.name))
    stale = False
    for split in info["splits"]:
        rec = read_json(ws.dataset_stage_record(ds.name, f"embed-{split}"), torn_ok=True)
        stale |= rec is None or rec.get("encoders") != encoders_given(kb.encoders)
        # A part missing (an embed interrupted) or one of a shard no longer in the split (a take-down,
        # a re-sharding): the embed resumes, and removes the parts of vanished shards.
        stale |= not split_coverage(ws, ds.name, split).exact
    if stale:
        with dask_client(**dask.client_options, gpu=True) as client:
            stage_embed_dataset(ws, ds, kb.encoders, client, kb.embed)
