"""Images of embeddings parts, read from the webdataset shards they were embedded from, by byte offset
(nothing is extracted to disk): what the neighbor browser serves as `/img/dataset/<uid>` and
`/img/kb/<kb_id>`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retformer.artifacts.shards import ImageMember, image_members, shard_stem


class ShardImageReader:
    """Images of embeddings parts, read from the shards the parts were embedded from.

    A part's shard is the one whose `artifacts.shards.shard_stem` under one of `roots` names the part
    (`part-<stem>.parquet`, as the embed stage names it), else the absolute path the embed stage
    recorded in the part's metadata (`shard_stats.shard`).
    Each shard's offset index (`artifacts.shards.image_members`) is built on first use and kept in memory."""

    def __init__(self, parts: list[Path], roots: list[Path]) -> None:
        self.parts = parts
        self.roots = [r for r in roots if r.is_dir()]
        self._shards: dict[int, Path | None] = {}
        self._offsets: dict[Path, dict[str, ImageMember]] = {}
        self._by_stem: dict[str, Path] | None = None
        self._lock = threading.Lock()

    def shard_of(self, part: int) -> Path | None:
        """The shard part `part` was embedded from; None when it cannot be found."""
        with self._lock:
            if part not in self._shards:
                self._shards[part] = self._find_shard(self.parts[part])
            return self._shards[part]

    def _find_shard(self, part: Path) -> Path | None:
        # The shard named like the part under this workspace's roots first: the recorded path may be
        # relative to wherever the embed stage ran, or belong to a workspace since moved.
        if self._by_stem is None:
            self._by_stem = {}
            for root in self.roots:
                for tar in sorted(root.rglob("*.tar")):
                    self._by_stem.setdefault(shard_stem(tar, root), tar)
        found = self._by_stem.get(part.name[len("part-") : -len(".parquet")])
        if found is not None:
            return found
        try:
            meta = json.loads((pq.read_schema(part).metadata or {}).get(b"meta", b"{}"))
        except (pa.ArrowInvalid, OSError, ValueError):
            meta = {}
        recorded = (meta.get("shard_stats") or {}).get("shard")
        return (
            Path(recorded) if recorded and Path(recorded).is_absolute() and Path(recorded).is_file() else None
        )

    def read(self, part: int, uid: str) -> tuple[bytes, str] | None:
        """(bytes, extension) of sample `uid`'s image in part `part`'s shard; None if not found."""
        shard = self.shard_of(part)
        if shard is None:
            return None
        with self._lock:
            if shard not in self._offsets:
                self._offsets[shard] = image_members(shard)
            where = self._offsets[shard].get(uid)
        if where is None:
            return None
        offset, size, ext = where
        with open(shard, "rb") as fh:
            fh.seek(offset)
            return fh.read(size), ext
