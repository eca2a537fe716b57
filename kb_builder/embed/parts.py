"""Embeddings parts as the embed stage's done-markers: name, source-shard fingerprint, stats, leftovers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from artifacts.atomic import remove_dead_temps


def part_path_for(stem: str, out_dir: Path) -> Path:
    """The embeddings part of a shard (sorted shard paths give sorted part names)."""
    return out_dir / f"part-{stem}.parquet"


def shard_fingerprint(shard: Path) -> str:
    """Size and mtime of a shard: a part made from an older shard of the same name is stale."""
    st = shard.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def shard_record(shard: Path) -> dict[str, Any] | None:
    """What a manifest records for `shard`: {"count" (samples in the tar), "bytes", "manifest"}, from
    the shard set's `_SUCCESS-<prefix>.json` (artifacts/shards.py) or the img2dataset chunk's `_SUCCESS`
    (kb_builder/download/); None for a shard no manifest lists (the user's own webdataset shards)."""
    from artifacts.shards import recorded_shard

    own = recorded_shard(shard)
    if own is not None:
        return own
    from kb_builder.download import SUCCESS_NAME, read_chunk_marker

    # img2dataset: <chunk>/00000.tar, or <chunk>/retry-NNN/00000.tar listed as "retry-NNN/00000.tar".
    retry_name = f"{shard.parent.name}/{shard.name}"
    for chunk_dir, name in ((shard.parent, shard.name), (shard.parent.parent, retry_name)):
        if not (chunk_dir / SUCCESS_NAME).is_file():
            continue
        marker = read_chunk_marker(chunk_dir)
        for rnd in (marker or {}).get("rounds", []):
            for entry in rnd.get("shards", []):
                if entry.get("name") == name:
                    # img2dataset writes only its successes into the tar (failures go to the Parquet).
                    return {
                        "count": int(entry["successes"]),
                        "bytes": int(entry["bytes"]),
                        "manifest": chunk_dir / SUCCESS_NAME,
                    }
    return None


def part_stats(part: Path) -> dict[str, Any]:
    """The per-shard stats a finished part carries in its metadata ({} if it has none or is unreadable:
    an unreadable part is then recomputed, like a missing one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(part).metadata or {}
        meta = json.loads(md.get(b"meta", b"{}"))
    except (pa.ArrowInvalid, OSError, ValueError):
        return {}
    return meta.get("shard_stats", {})


def remove_leftovers(part: Path) -> list[Path]:
    """Delete `<part>.tmp-<pid>` files whose writer (a killed run on this host) is gone; return them.

    A live writer's file is kept: Dask may still be running an older attempt of the same task.
    """
    return remove_dead_temps(part.parent.glob(f"{part.name}.tmp-*"))
