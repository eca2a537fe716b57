"""Embeddings parts as the embed stage's done-markers: name, source-shard fingerprint, stats, leftovers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retformer.artifacts.atomic import remove_dead_temps


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
    from retformer.artifacts.shards import recorded_shard

    own = recorded_shard(shard)
    if own is not None:
        return own
    from retformer.kb_builder.download import SUCCESS_NAME, read_chunk_marker

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


@dataclass
class Coverage:
    """How an embeddings folder matches its current shard set (`embed_coverage`)."""

    shards: list[Path]  # the current shards, in part-name order
    parts: list[Path]  # the current parts: one per shard made from that very shard, in kb_id order
    missing: list[Path]  # shards without such a part (never embedded, or embedded from an older shard)
    extra: list[Path]  # parts of shards that are no longer in the set (deleted, or a smaller set)
    part_of: dict[Path, Path]  # current part -> its shard
    # parts named after a current shard whose Parquet footer cannot be read (cut short, overwritten):
    # counted as missing (embed redoes them), named as corrupt in messages
    unreadable: list[Path] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.missing and not self.extra

    def describe(self, what: str) -> str:
        """One sentence on what does not match, for an error line ("" when exact)."""
        said = []
        if self.unreadable:
            said.append(f"corrupt or unreadable Parquet file {self.unreadable[0]}")
        if self.missing:
            said.append(
                f"{len(self.missing)} of {len(self.shards)} shard(s) have no embeddings part made from "
                f"them (first: {self.missing[0].name})"
            )
        if self.extra:
            said.append(
                f"{len(self.extra)} part(s) belong to no shard of its current shard set "
                f"(first: {self.extra[0].name})"
            )
        return f"{what}: " + "; ".join(said) if said else ""


def embed_coverage(shards: list[Path], shard_root: Path, out_dir: Path) -> Coverage:
    """Match the parts in `out_dir` against the current `shards`: a shard is covered by the part named
    after it when that part was made from this very shard (its recorded size and mtime); any other
    part in the folder is extra. Reads only the parts' Parquet footers."""
    from retformer.artifacts.atomic import is_leftover_tmp
    from retformer.artifacts.shards import shard_stem

    out_dir = Path(out_dir)
    expected = sorted((part_path_for(shard_stem(s, shard_root), out_dir), Path(s)) for s in shards)
    present = (
        {p for p in out_dir.glob("part-*.parquet") if not is_leftover_tmp(p)} if out_dir.is_dir() else set()
    )
    parts, missing, part_of, unreadable = [], [], {}, []
    for part, shard in expected:
        ok = part in present and part_stats(part).get("shard_fingerprint") == shard_fingerprint(shard)
        if ok:
            parts.append(part)
            part_of[part] = shard
        else:
            missing.append(shard)
            if part in present and not _readable(part):
                unreadable.append(part)
    wanted = {part for part, _ in expected}
    extra = sorted(p for p in present if p not in wanted)
    return Coverage([s for _, s in expected], parts, missing, extra, part_of, unreadable)


def _readable(part: Path) -> bool:
    """Whether the part's Parquet footer can be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_schema(part)
    except (pa.ArrowInvalid, OSError, ValueError):
        return False
    return True


def remove_extra_parts(coverage: Coverage) -> list[Path]:
    """Delete the parts of shards that left the set (a take-down, a re-sharding); return them."""
    for part in coverage.extra:
        part.unlink(missing_ok=True)
    return coverage.extra


def check_unique_uids(parts: list[Path], part_of: dict[Path, Path], what: str) -> None:
    """A uid is unique in a KB: the first uid found in two parts (or twice in one) is a UserError
    naming it and the shards that hold it. Reads the parts' uid columns only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from retformer.artifacts.embeddings_io import read_part_arrow
    from retformer.artifacts.errors import UserError

    if not parts:
        return
    columns = [read_part_arrow(p, columns=["uid"]).column("uid") for p in parts]
    uids = pa.chunked_array([c for col in columns for c in col.chunks], type=pa.string())
    counts = pc.value_counts(uids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return
    uid = dup[0]["values"].as_py()
    holders = []
    for part, col in zip(parts, columns, strict=True):
        hits = int(pc.sum(pc.equal(col, uid)).as_py() or 0)
        if hits:
            name = part_of.get(part, part).name
            holders.append(name if hits == 1 else f"{name} ({hits} times)")
    more = f" ({len(dup) - 1} more uid(s) are duplicated too)" if len(dup) > 1 else ""
    raise UserError(
        f"{what}: uid {uid!r} is in more than one sample, in shard(s) {', '.join(holders)}{more}; "
        "a uid must be unique in a KB"
    )
