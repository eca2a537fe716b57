"""One stage_* per `retformer` command, holding the command's checks; the CLI and the demo call these.

Each stage is idempotent: what is complete on disk is reused, what is missing is (re)built, and a
record lands in the workspace. Stage order: shards -> (download) -> embed -> index -> neighbors ->
train -> evaluate. The building blocks the commands share (stage_kb_shards, stage_embed_kb, ...)
take a Dask client or None; the fan-out itself is pipelines/dask_runner.py's `task_mapper`.
"""

from __future__ import annotations

import difflib
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from artifacts import manifest
from artifacts.embeddings_io import list_parts, part_num_rows
from artifacts.errors import UserError
from artifacts.lock import output_lock
from artifacts.workspace import Workspace, read_json, write_stage_record
from pipelines.dask_runner import dask_client, task_mapper

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- manifests
def _schema_keys() -> dict[str, set[str]]:
    """The top-level keys each manifest kind's schema takes (to route unprefixed `--set` items)."""
    from kb_builder.datasets.schema import KEY_TYPES, DatasetCommon
    from kb_builder.kb_schema import KBManifest
    from pipelines.experiment_schema import ExperimentManifest

    return {
        "kb": set(KBManifest.model_fields),
        "dataset": set(DatasetCommon.model_fields) | set(KEY_TYPES),
        "experiment": set(ExperimentManifest.model_fields),
    }


def split_overrides(overrides: list[str] | None, prefix: str) -> list[str]:
    """The overrides addressed to one manifest kind: `kb.index.k=8` -> `index.k=8` for "kb", and an
    unprefixed `train.epochs=3` for every kind whose schema has a top-level `train`. An unprefixed
    key no manifest has is an error (a typo would otherwise be dropped without a word)."""
    keys = _schema_keys()
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not of the form key=value")
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in keys:
            if head == prefix:
                out.append(item.split(".", 1)[1])
            continue
        owners = [kind for kind, fields in keys.items() if head in fields]
        if not owners:
            every = sorted(set().union(*keys.values()))
            close = difflib.get_close_matches(head, every, n=1, cutoff=0.6)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else " (prefix it with kb., dataset. or experiment.)"
            )
            raise UserError(f"--set {item}: no manifest has a key {head!r}{hint}")
        if prefix in owners:
            out.append(item)
    return out


def _load(category: str, kind: str, name: str, overrides: list[str] | None) -> tuple[dict, str, list]:
    mine = split_overrides(overrides, kind)
    data = manifest.load(category, name, mine)
    # Error lines quote the override as the user typed it (`kb.shard_size=0`).
    typed = [o for o in overrides or [] if split_overrides([o], kind)]
    return data, data["_manifest_path"], typed


def load_kb(name: str, overrides: list[str] | None) -> dict[str, Any]:
    """A KB manifest (a name under manifests/kb/ or a path) with its `--set` overrides, validated."""
    from kb_builder.kb_schema import validate_kb

    return validate_kb(*_load("kb", "kb", name, overrides))


def load_dataset_manifest(name: str, overrides: list[str] | None) -> dict[str, Any]:
    """A dataset manifest (a name under manifests/datasets/ or a path) with its overrides, validated."""
    from kb_builder.datasets.schema import validate_dataset

    return validate_dataset(*_load("datasets", "dataset", name, overrides))


def load_experiment(name: str, overrides: list[str] | None) -> dict[str, Any]:
    """An experiment manifest (a name under manifests/experiments/ or a path) with its overrides,
    validated; values coerced to their types (pipelines/experiment_schema.py)."""
    from pipelines.experiment_schema import validate_experiment

    exp = validate_experiment(*_load("experiments", "experiment", name, overrides))
    for item in unread_overrides(exp, split_overrides(overrides, "experiment")):
        log.warning("--set %s is not read by this experiment: %s", *item)
    return exp


# Keys of `train:` a selection replaces from its `select:` grids: an override of them changes nothing.
_SELECTED_KEYS = {
    "train.epochs": "epochs come from select.baseline_epochs (mlp_only, linear_probe) and "
    "select.retformer_epochs (RetFormer)",
    "train.lr": "lr comes from select.lr_grid (mlp_only, linear_probe) and select.retformer_grid (RetFormer)",
}


def unread_overrides(exp: dict[str, Any], overrides: list[str]) -> list[tuple[str, str]]:
    """(override, why) for each experiment override the run will never read: train.epochs / train.lr
    where every trained method is chosen on a select split (the grids set them)."""
    from trainer.methods import METHODS

    methods = exp.get("methods") or []
    selected = exp.get("select_split") and all(
        m not in METHODS or METHODS[m].mode in ("frozen", "vote") for m in methods
    )
    if not selected:
        return []
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _SELECTED_KEYS:
            out.append((item, _SELECTED_KEYS[key]))
    return out


def datasets_for_kb(kb: dict[str, Any], overrides: list[str] | None) -> dict[str, dict]:
    """The manifest of the dataset a KB is built from ({} for downloaded or external shards)."""
    name = kb.get("source", {}).get("dataset")
    return {name: load_dataset_manifest(name, overrides)} if name else {}


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
    from artifacts.shards import list_shards

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
    # One writer per shard folder; a complete set (its _SUCCESS manifest matches) is not rewritten.
    with output_lock(ws.kb_shards(kb["name"]), f"the shards of KB {kb['name']}"):
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
    shard_dir = ws.dataset_shards(ds["name"])
    with output_lock(shard_dir, f"the shards of dataset {ds['name']}"):
        info = write_dataset_shards(dataset, shard_dir, int(ds.get("shard_size", 5000)))
        # describe() applies the manifest's shot_thresholds (scaled when asked) to the train counts.
        description = dataset.describe()
        description["splits"] = description["split_sizes"]
        write_json_atomic(ws.dataset_info(ds["name"]), description)
    record = {"dataset": ds["name"], "result": info, "seconds": round(time.perf_counter() - started, 2)}
    return write_stage_record(ws.dataset_stage_record(ds["name"], "shards"), "shards", record)


def stage_shards(
    ws: Workspace, kb: dict[str, Any] | None, ds: dict[str, Any] | None, overrides: list[str] | None
) -> dict[str, dict[str, Any]]:
    """`retformer shards`: a KB's shards and / or a dataset's split shards; records by name."""
    if not kb and not ds:
        raise UserError("give --kb NAME and/or --dataset NAME")
    records = {}
    if kb:
        records[kb["name"]] = stage_kb_shards(ws, kb, datasets_for_kb(kb, overrides))
    if ds:
        records[ds["name"]] = stage_dataset_shards(ws, ds)
    return records


def stage_download(
    ws: Workspace,
    kb: dict[str, Any],
    retry_failed: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    *,
    cluster: str | None = None,
    scheduler_file: str | None = None,
) -> dict[str, Any]:
    """`retformer download`: a KB's image-text pairs with img2dataset, one task per metadata chunk."""
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
    with dask_client(scheduler, workers, cluster=cluster, scheduler_file=scheduler_file) as client:
        record = run_download(task_mapper(client), tasks, retry_failed=retry_failed)
    return write_stage_record(
        ws.kb_stage_record(kb["name"], "download"), "download", {"kb": kb["name"], **record}
    )


# ------------------------------------------------------------------------------------------ embed
def _embed_shards(
    client: Any, shards: list[Path], root: Path, out_dir: Path, encoders: dict, options: dict, desc: str
) -> dict[str, Any]:
    """One embed task per shard on `client`; `options` are `embed_shard`'s (the manifest's `embed:`).
    One writer per embeddings folder (a KB's, a dataset split's): a second run waits, then finds the
    parts written and skips them."""
    from kb_builder.embed import run_embed

    with output_lock(out_dir, f"the embeddings {out_dir}"):
        return run_embed(shards, root, out_dir, encoders, options, desc, task_mapper(client))


def stage_embed(
    ws: Workspace,
    kb: dict[str, Any],
    ds: dict[str, Any] | None,
    overrides: list[str] | None,
    scheduler: str | None = None,
    workers: int | None = None,
    *,
    cluster: str | None = None,
    scheduler_file: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`retformer embed`: the KB's shards (built first when missing) and, with `ds`, the dataset's
    splits with the KB's encoders; records by title (`<kb>`, `<dataset>/<split>`)."""
    from kb_builder.embed import embed_options

    options = embed_options(kb.get("embed"))  # a bad `embed:` option fails now, not after the shards
    local = cluster is None or getattr(cluster, "kind", None) == "local"
    if local and not (scheduler or scheduler_file):  # are built; GPUs torch cannot use fail now too
        from artifacts.devices import pick

        pick(options.get("device"), f"embed of KB {kb['name']}")
    if not kb_shard_paths(ws, kb):
        stage_kb_shards(ws, kb, datasets_for_kb(kb, overrides))
    if ds and read_json(ws.dataset_info(ds["name"]), torn_ok=True) is None:
        stage_dataset_shards(ws, ds)
    with dask_client(scheduler, workers, cluster=cluster, scheduler_file=scheduler_file, gpu=True) as client:
        records = {kb["name"]: stage_embed_kb(ws, kb, client)}
        if ds:
            for split, rec in stage_embed_dataset(ws, ds, kb["encoders"], client, kb.get("embed")).items():
                records[f"{ds['name']}/{split}"] = rec
    return records


def _shards_held(shard_dir: Path | None, what: str) -> Any:
    """The lock of a shard folder the shards stage writes (None: the user's or img2dataset's shards,
    which it does not): held while embedding it, so that a `retformer shards` rewriting the set waits
    for the embed instead of changing the shards under it (the parts would then mix two sets)."""
    from contextlib import nullcontext

    return output_lock(shard_dir, what) if shard_dir is not None else nullcontext()


def stage_embed_kb(ws: Workspace, kb: dict[str, Any], client: Any) -> dict[str, Any]:
    """Embed every KB shard (missing parts only) into work/kb/<kb>/embeddings/; the folder then holds
    exactly the parts of the KB's current shard set, and every uid in it is unique."""
    from kb_builder.embed import embed_options
    from kb_builder.embed.parts import check_unique_uids, embed_coverage

    own = kb.get("source", {}).get("kind") not in EXTERNAL_SHARD_KINDS
    with _shards_held(ws.kb_shards(kb["name"]) if own else None, f"the shards of KB {kb['name']}"):
        shards = kb_shard_paths(ws, kb)
        if not shards:
            name = kb["name"]
            raise UserError(f"KB {name} has no shards yet: run `retformer shards --kb {name}` first")
        out = ws.kb_embeddings(kb["name"])
        _guard_encoder_change(ws.kb_stage_record(kb["name"], "embed"), kb["encoders"], out)
        options = embed_options(kb.get("embed"))
        root = kb_shard_root(ws, kb)
        summary = _embed_shards(client, shards, root, out, kb["encoders"], options, f"embed {kb['name']}")
        covered = embed_coverage(shards, root, out)
    check_unique_uids(covered.parts, covered.part_of, f"KB {kb['name']}")
    if summary["images"] == 0:
        # Refused here: the index stage would only report a k larger than a 0-row KB.
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        named = ", ".join(str(s) for s in shards[:3]) + more
        raise UserError(
            f"the KB {kb['name']} is empty: its {len(shards)} shard(s) ({named}) hold no embeddable "
            f"sample (skipped: {summary['skipped'] or 'none'})"
        )
    record = {
        "kb": kb["name"],
        "encoders": kb["encoders"],
        "embed": kb.get("embed") or {},  # evaluate / predict --kb compare them with a run's
        "shards": len(shards),
        **summary,
    }
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
    records = {}
    for split in info["splits"]:
        out = ws.dataset_embeddings(ds["name"], split)
        _guard_encoder_change(ws.dataset_stage_record(ds["name"], f"embed-{split}"), encoders, out)
        with _shards_held(shard_dir, f"the shards of dataset {ds['name']}"):
            shards = split_shard_paths(ws, ds["name"], split)
            records[split] = _embed_shards(
                client, shards, shard_dir, out, encoders, options, f"embed {ds['name']}/{split}"
            )
        if records[split]["images"] == 0:
            raise UserError(
                f"split {split} of dataset {ds['name']} is empty: its {len(shards)} shard(s) in "
                f"{shard_dir} hold no embeddable sample (skipped: {records[split]['skipped'] or 'none'})"
            )
        write_stage_record(
            ws.dataset_stage_record(ds["name"], f"embed-{split}"),
            "embed",
            {"dataset": ds["name"], "split": split, "encoders": encoders, **records[split]},
        )
    return records


def split_shard_paths(ws: Workspace, dataset: str, split: str) -> list[Path]:
    """The shards of one split of a dataset (its complete shard set)."""
    from artifacts.shards import list_shards

    shard_dir = ws.dataset_shards(dataset)
    return [p for p in list_shards(shard_dir) if p.name.startswith(f"{split}-")] if shard_dir.is_dir() else []


def kb_coverage(ws: Workspace, kb: dict[str, Any]) -> Any:
    """How the KB's embeddings folder matches its current shard set (kb_builder/embed/parts.py)."""
    from kb_builder.embed.parts import embed_coverage

    return embed_coverage(kb_shard_paths(ws, kb), kb_shard_root(ws, kb), ws.kb_embeddings(kb["name"]))


def split_coverage(ws: Workspace, dataset: str, split: str) -> Any:
    """How a dataset split's embeddings folder matches the split's current shard set."""
    from kb_builder.embed.parts import embed_coverage

    shards = split_shard_paths(ws, dataset, split)
    return embed_coverage(shards, ws.dataset_shards(dataset), ws.dataset_embeddings(dataset, split))


def _guard_encoder_change(record_path: Path, encoders: dict, out_dir: Path) -> None:
    """Parts embedded with other encoders are stale: remove them so they are recomputed."""
    previous = read_json(record_path, torn_ok=True)
    if previous and previous.get("encoders") != encoders and out_dir.is_dir():
        log.warning("encoders changed since the last embed of %s: re-embedding", out_dir)
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()


# ------------------------------------------------------------------------------------------ index
def _cluster_on_demand(
    stack: ExitStack,
    scheduler: str | None,
    workers: int | None,
    cluster: str | None,
    scheduler_file: str | None,
) -> Any:
    """A `map_tasks` that starts (or joins) the Dask cluster at its first non-empty call, closed with
    `stack`: a stage that finds its output complete never pays for a cluster's start."""
    mapper: Any = None

    def map_tasks(fn: Any, items: list[Any], **kwargs: Any) -> list[Any]:
        nonlocal mapper
        if not items:
            return []
        if mapper is None:
            own = dask_client(scheduler, workers, cluster=cluster, scheduler_file=scheduler_file)
            mapper = task_mapper(stack.enter_context(own))
        return mapper(fn, items, **kwargs)

    return map_tasks


def stage_index(
    ws: Workspace,
    kb: dict[str, Any],
    client: Any | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    scheduler_file: str | None = None,
    allow_partial: bool = False,
    in_process: bool = False,
) -> dict[str, Any]:
    """`retformer index`: choose, build (sharded), tune and recall-check the KB's faiss index.

    The index holds exactly the parts of the KB's current shard set: a shard without a part made from
    it (an embed interrupted, or not rerun after `retformer shards`) is refused unless `allow_partial`
    (then the parts there are indexed and index.json records `partial`), a part of a shard no longer in
    the set always is, and so is a uid that two samples share.

    Tasks run on `client` when given; otherwise on a cluster only for a sharded build or a given
    `scheduler` / `cluster` / `scheduler_file` (a one-shard build is faster here than a cluster's start);
    `in_process` runs even a sharded build here (a tiny KB, the tests' workspace).
    """
    from kb_builder.embed.parts import check_unique_uids
    from kb_builder.index import run_index

    name = kb["name"]
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
        cfg = kb.get("index", {})
        return run_index(emb_dir, index_dir, cfg, map_tasks, parts=covered.parts, partial=partial)

    # One writer per index folder; run_index skips a complete, recall-checked index (also after a wait).
    with output_lock(ws.kb_index(kb["name"]), f"the index of KB {kb['name']}"), ExitStack() as stack:
        if client is not None:
            record = run(task_mapper(client))
        elif in_process:
            record = run(task_mapper(None))
        elif int(kb.get("index", {}).get("num_shards", 1)) > 1 or scheduler or cluster or scheduler_file:
            record = run(_cluster_on_demand(stack, scheduler, workers, cluster, scheduler_file))
        else:
            record = run(task_mapper(None))
    return write_stage_record(ws.kb_stage_record(kb["name"], "index"), "index", {"kb": kb["name"], **record})


# -------------------------------------------------------------------------------------- neighbors
def check_kb_encoders(ws: Workspace, kb: dict[str, Any]) -> None:
    """The KB's embeddings (and so its index) were made with the encoders the manifest names now;
    otherwise the dataset would be embedded into another space than the one searched."""
    done = read_json(ws.kb_stage_record(kb["name"], "embed"), torn_ok=True)
    if done and done.get("encoders") != kb["encoders"]:
        raise UserError(
            f"KB {kb['name']} was embedded with encoders {_encoder_names(done.get('encoders'))}, the "
            f"manifest names {_encoder_names(kb['encoders'])}: rerun `retformer embed --kb {kb['name']}` "
            f"and `retformer index --kb {kb['name']}` (or use the encoders it was embedded with)"
        )


def _encoder_names(encoders: Any) -> str:
    parts = []
    for role, spec in (encoders or {}).items():
        if spec:
            detail = "/".join(str(spec[k]) for k in ("model", "pretrained") if spec.get(k))
            parts.append(f"{role}={spec.get('name')}" + (f"({detail})" if detail else ""))
    return ", ".join(parts) or "none"


def _check_index_matches_kb(ws: Workspace, kb: dict[str, Any], index_rec: dict[str, Any]) -> None:
    """The KB's embeddings are those of its current shard set (all of them, unless the index was built
    with --allow-partial), and the index was built from exactly the parts in its folder now: the
    neighbor tables' kb_ids count rows over those parts."""
    name = kb["name"]
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


def _ensure_dataset_embedded(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    scheduler: str | None,
    workers: int | None,
    cluster: str | None = None,
    scheduler_file: str | None = None,
) -> None:
    """Shard and embed the dataset with the KB's encoders unless its embed records already match."""
    info = read_json(ws.dataset_info(ds["name"]), torn_ok=True)
    if info is None:  # never sharded, or its dataset.json torn: the shards stage redoes it
        stage_dataset_shards(ws, ds)
        info = read_json(ws.dataset_info(ds["name"]))
    stale = False
    for split in info["splits"]:
        rec = read_json(ws.dataset_stage_record(ds["name"], f"embed-{split}"), torn_ok=True)
        stale |= rec is None or rec.get("encoders") != kb["encoders"]
        # A part missing (an embed interrupted) or one of a shard no longer in the split (a take-down,
        # a re-sharding): the embed resumes, and removes the parts of vanished shards.
        stale |= not split_coverage(ws, ds["name"], split).exact
    if stale:
        where = {"cluster": cluster, "scheduler_file": scheduler_file, "gpu": True}
        with dask_client(scheduler, workers, **where) as client:
            stage_embed_dataset(ws, ds, kb["encoders"], client, kb.get("embed"))


def stage_neighbors(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    k: int | None = None,
    client: Any | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    scheduler_file: str | None = None,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """`retformer neighbors`: top-k KB neighbors for every split of the dataset (embedded first when
    needed), plus the compact store. `k` defaults to the dataset manifest's `neighbors.k` (32).
    `splits`: these splits only (`evaluate --kb`: the eval split); a set holding more is reused.

    The search tasks (one per split, or per slice of a large split) run on `client` when given, on a
    cluster when `scheduler`, `cluster`, `scheduler_file` or `workers` is given, else in this process.
    """
    from kb_builder.neighbors import run_neighbors

    k = int(k if k is not None else (ds.get("neighbors") or {}).get("k", 32))
    if k < 1:
        raise UserError(f"k must be >= 1 (got {k})")
    # index.json lands only after the recall check (kb_builder/index): its check is what makes it usable.
    index_rec = read_json(ws.kb_index(kb["name"]) / "index.json") or {}
    if "recall_check" not in index_rec:
        raise UserError(f"KB {kb['name']} has no index: run `retformer index --kb {kb['name']}` first")
    check_kb_encoders(ws, kb)
    _check_index_matches_kb(ws, kb, index_rec)
    rows = _kb_rows(ws, kb["name"])
    if k > rows:
        raise UserError(f"k={k} is larger than the knowledge base {kb['name']} ({rows} rows)")
    _ensure_dataset_embedded(ws, ds, kb, scheduler, workers, cluster, scheduler_file)
    info = read_json(ws.dataset_info(ds["name"]))
    wanted = [s for s in info["splits"] if splits is None or s in splits]
    query_dirs = {split: ws.dataset_embeddings(ds["name"], split) for split in wanted}
    out = ws.neighbors_dir(ds["name"], kb["name"], k)

    def run(map_tasks: Any) -> dict[str, Any]:
        index_dir, emb_dir = ws.kb_index(kb["name"]), ws.kb_embeddings(kb["name"])
        extra = {"dataset": ds["name"], "kb": kb["name"]}
        return run_neighbors(index_dir, emb_dir, query_dirs, out, k, map_tasks, record_extra=extra)

    # One writer per table set; run_neighbors skips a complete one (also after waiting here).
    with output_lock(out, f"the neighbor tables {out}"), ExitStack() as stack:
        if client is None and (scheduler or workers or cluster or scheduler_file):
            return run(_cluster_on_demand(stack, scheduler, workers, cluster, scheduler_file))
        return run(task_mapper(client))


# ------------------------------------------------------------------------------ train and evaluate
def stage_train(
    ws: Workspace,
    ds: dict[str, Any],
    kb: dict[str, Any],
    exp: dict[str, Any],
    run: str | None = None,
    force: bool = False,
    tensorboard: Path | None = None,
) -> dict[str, Any]:
    """`retformer train`: every method of the experiment on the neighbor tables; the run's eval.json,
    per-sample predictions and report.html (pipelines/report.py). The run is named
    `<dataset>-<kb>-<experiment>-<config hash>` (pipelines/runs.py) unless `run` is given; a finished
    run of another configuration under that name is refused unless `force`. `tensorboard`: a folder
    that gets each trained model's per-epoch figures under `<run>/<method>/` (pipelines/tensorboard.py).

    One writer per run folder. A finished run of this configuration (its eval.json's config_hash) is
    skipped: its eval.json is returned (`force` trains it again); a killed one is resumed
    (pipelines/experiment.py).

    Under torchrun (`trainer/distributed.py`) every process runs this; rank 0 alone takes the run
    folder's lock, makes the checks above and writes, the other ranks follow its decisions (an error
    there ends every rank with the same message) and log warnings only."""
    from artifacts.atomic import remove_dead_temps
    from pipelines import console
    from pipelines.experiment import run_experiment
    from pipelines.experiment_plan import eval_splits, plan_experiment
    from pipelines.report import write_report
    from pipelines.runs import check_overwrite, config_hash, default_run_name
    from pipelines.tensorboard import tensorboard_logging
    from trainer import distributed

    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 says it once

    # What can be checked without training is checked before the run folder (or its lock) exists.
    _refuse_stale_tables(ws, ds, kb, max(plan_experiment(exp, kb)["k_values"]))
    if (info := read_json(ws.dataset_info(ds["name"]))) is not None:
        eval_splits(exp, info)
        check_split_embeddings(ws, ds["name"], kb["name"], info.get("splits", {}))
    wanted = config_hash(ds, kb, exp)
    run_dir = ws.run_dir(run or default_run_name(ds, kb, exp))
    asked = time.time()
    with ExitStack() as stack:

        def prepare() -> dict[str, Any] | None:
            """Rank 0, under the run's lock: another run's fresh eval.json to return, else None (train)."""
            held = stack.enter_context(output_lock(run_dir, f"the run {run_dir.name}"))
            report = read_json(run_dir / "eval.json", torn_ok=True)  # torn: trained again
            same = bool(report and report.get("config_hash") == wanted)
            if same and held.waited_s and (run_dir / "eval.json").stat().st_mtime >= asked:
                log.info("run %s was finished by the run this one waited for: using its eval.json", run_dir)
                return report
            if same and not force:
                # Complete with this very configuration: a rerun skips it, as every stage does.
                if not (run_dir / "report.html").is_file():
                    write_report(run_dir)  # killed between eval.json and its report
                log.info("run %s is complete with this configuration (--force trains it again)", run_dir.name)
                return report
            if run_dir.is_dir():
                remove_dead_temps(run_dir.iterdir())  # a killed run's half-written checkpoint, model, ...
            check_overwrite(run_dir, wanted, force)
            return None

        finished = distributed.from_main(prepare)
        if finished is not None:
            return finished
        progress = console.progress_enabled()
        board = run_dir.name if tensorboard is not None and distributed.is_main() else None
        with tensorboard_logging(tensorboard / board if board else None):  # rank 0 alone writes
            report = run_experiment(ws, ds, kb, exp, run_dir, progress=progress, config_hash=wanted)
        if distributed.is_main():
            log.info("report: %s", write_report(run_dir))
        distributed.barrier()  # every rank returns once rank 0's files are complete
    return report


def _refuse_stale_tables(ws: Workspace, ds: dict[str, Any], kb: dict[str, Any], kmax: int) -> None:
    """The neighbor tables a run would read were computed against the KB's index as it is (a KB grown
    in place, or re-indexed, makes them stale until `retformer neighbors` recomputes them)."""
    from kb_builder.neighbors import stale_reason
    from trainer.features import neighbor_k_values

    usable = [k for k in neighbor_k_values(ws, ds["name"], kb["name"]) if k >= kmax]
    if usable and (
        why := stale_reason(ws.neighbors_dir(ds["name"], kb["name"], usable[0]), ws.kb_index(kb["name"]))
    ):
        raise UserError(
            f"the neighbor tables {ws.neighbors_dir(ds['name'], kb['name'], usable[0])} are stale ({why}): "
            f"run `retformer neighbors --dataset {ds['name']} --kb {kb['name']}` first"
        )


def stage_evaluate(ws: Workspace, run: str | None = None) -> tuple[str, dict[str, Any]]:
    """`retformer evaluate`: (run name, report) of a finished run: `run` as `resolve_run` reads it (a
    name, a pattern, a unique prefix), by default the latest one."""
    from pipelines.run_index import EVAL, resolve_run

    run_dir = resolve_run(ws.root, run)
    return run_dir.name, read_json(run_dir / EVAL) or {}
