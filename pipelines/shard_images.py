"""Images of embeddings parts, read from the webdataset shards they were embedded from, by byte offset
(nothing is extracted to disk): what the neighbor browser serves as `/img/dataset/<uid>` and
`/img/kb/<kb_id>`."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.errors import UserError
from artifacts.shards import shard_stem, to_record
from artifacts.tar_reader import split_name

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # what a shard sample's image member may be (artifacts/shards)


def shard_offsets(path: Path) -> dict[str, tuple[int, int, str]]:
    """uid -> (byte offset, size, extension) of each sample's image member in a webdataset tar.

    One pass over the headers (tarfile's `offset_data`, as `trainer.images` reads fine-tune images);
    only the small json members are read, for the uid a sample's json may give (img2dataset shards:
    `__key__` is not the uid), with `artifacts.shards.to_record`'s rule: json uid, else the key."""
    images: dict[str, tuple[int, int, str]] = {}
    uids: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name.rsplit("/", 1)[-1])
                if ext.lower() in IMAGE_EXTS:
                    images[key] = (member.offset_data, member.size, ext.lower())
                elif ext == "json":
                    fh = tar.extractfile(member)
                    try:
                        uids[key] = to_record(key, {"json": fh.read() if fh else b"{}"})["uid"]
                    except ValueError:  # unreadable json: the key stands for the uid, as a reader would fail
                        uids[key] = key
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"cannot index shard {path}: {exc}") from exc
    return {uids.get(key, key): where for key, where in images.items()}


class ShardImageReader:
    """Images of embeddings parts, read from the shards the parts were embedded from.

    A part's shard is the one whose `artifacts.shards.shard_stem` under one of `roots` names the part
    (`part-<stem>.parquet`, as the embed stage names it), else the absolute path the embed stage
    recorded in the part's metadata (`shard_stats.shard`).
    Each shard's offset index (`shard_offsets`) is built on first use and kept in memory."""

    def __init__(self, parts: list[Path], roots: list[Path]) -> None:
        self.parts = parts
        self.roots = [r for r in roots if r.is_dir()]
        self._shards: dict[int, Path | None] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int, str]]] = {}
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
                self._offsets[shard] = shard_offsets(shard)
            where = self._offsets[shard].get(uid)
        if where is None:
            return None
        offset, size, ext = where
        with open(shard, "rb") as fh:
            fh.seek(offset)
            return fh.read(size), ext
