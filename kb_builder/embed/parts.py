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
