"""Webdataset tar shards: the input format of the embed stage (docs/architecture.md).

One sample per key: `__key__` = uid (`[A-Za-z0-9_-]` only), `png` or `jpg` = the encoded image,
`txt` = the caption (absent when there is none), `json` = {"uid", "label", "source", ...extra}.

A shard set is the files `<prefix>-00000.tar`, `<prefix>-00001.tar`, ... in one directory plus a
manifest `_SUCCESS-<prefix>.json` listing every shard with its sample count and size. Each shard is
written under a temporary name (`<shard>.tmp-<pid>`) and renamed when complete; the manifest is
written last, so its presence means the whole set is complete. A rerun whose manifest matches
(same fingerprint and shard size, every listed shard present with its recorded size) writes nothing.
"""

from __future__ import annotations

import filecmp
import io
import json
import os
import re
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import webdataset
from PIL import Image

from retformer.artifacts.atomic import (
    is_leftover_tmp,
    remove_dead_temps,
    remove_dead_temps_of,
    tmp_name,
    write_json_atomic,
)
from retformer.artifacts.errors import UserError
from retformer.artifacts.faults import maybe_die
from retformer.artifacts.tar_reader import Member, iter_shard_files, iter_shard_members

SHARD_FORMAT = "{prefix}-{index:05d}.tar"
MANIFEST_FORMAT = "_SUCCESS-{prefix}.json"
FORMAT_VERSION = 1
UID_RE = re.compile(r"[A-Za-z0-9_-]+")  # the uid contract (docs/architecture.md)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# What a sample's image member may be, in the order one is picked when a sample has several.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
IMG2DATASET_SOURCE = "img2dataset"  # `source` of samples read from img2dataset shards


class Sample(NamedTuple):
    """One shard record. `image` is encoded bytes (PNG/JPEG kept as they are), a PIL image or a
    uint8 array (encoded to PNG). `meta` adds fields to the json (e.g. `true_label`)."""

    uid: str
    image: bytes | Image.Image | np.ndarray
    caption: str | None
    label: int | None
    source: str
    meta: dict[str, Any] | None = None


def encode_image(image: bytes | Image.Image | np.ndarray) -> tuple[bytes, str]:
    """(encoded bytes, extension): PNG and JPEG bytes pass through; anything else becomes PNG.

    Grayscale stays grayscale (the encoders convert to RGB); modes PNG cannot hold become RGB.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if data.startswith(_PNG_MAGIC):
            return data, "png"
        if data.startswith(_JPEG_MAGIC):
            return data, "jpg"
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = img.copy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot encode an image of type {type(image).__name__}")
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def shard_path(out_dir: Path, prefix: str, index: int) -> Path:
    """The path of shard `index` of the set `prefix`."""
    return Path(out_dir) / SHARD_FORMAT.format(prefix=prefix, index=index)


def manifest_path(out_dir: Path, prefix: str) -> Path:
    """The completion manifest of the shard set `prefix`."""
    return Path(out_dir) / MANIFEST_FORMAT.format(prefix=prefix)


def read_manifest(out_dir: Path, prefix: str) -> dict[str, Any] | None:
    """The manifest of a complete shard set, or None when there is none (or it is unreadable)."""
    path = manifest_path(out_dir, prefix)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_shard_set(
    out_dir: Path, prefix: str, shard_size: int, fingerprint: str | None = None
) -> list[Path] | None:
    """The shards of a complete set matching `shard_size` and `fingerprint`, or None (must rewrite)."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir, prefix)
    if m is None or m.get("format_version") != FORMAT_VERSION or m.get("shard_size") != shard_size:
        return None
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        return None
    paths = []
    for entry in m.get("shards", []):
        p = out_dir / entry["name"]
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            return None
        paths.append(p)
    return paths


def _remove_stale(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete this set's shards not in `keep` and temporary files whose writer process is gone."""
    shard_re = re.compile(rf"^{re.escape(prefix)}-\d{{5}}\.tar$")
    own = re.compile(
        rf"^({re.escape(prefix)}-\d{{5}}\.tar|{re.escape(MANIFEST_FORMAT.format(prefix=prefix))})"
    )
    entries = list(out_dir.iterdir())
    remove_dead_temps(p for p in entries if is_leftover_tmp(p) and own.match(p.name))
    for p in entries:
        if not is_leftover_tmp(p) and shard_re.match(p.name) and p.name not in keep:
            p.unlink()


def _record(sample: Sample) -> dict[str, Any]:
    if not UID_RE.fullmatch(sample.uid or ""):
        raise ValueError(f"uid {sample.uid!r} has characters outside [A-Za-z0-9_-]")
    data, ext = encode_image(sample.image)
    meta = {
        "uid": sample.uid,
        "label": None if sample.label is None else int(sample.label),
        "source": sample.source,
        **(sample.meta or {}),
    }
    rec: dict[str, Any] = {"__key__": sample.uid, ext: data, "json": json.dumps(meta).encode()}
    if sample.caption is not None:
        rec["txt"] = sample.caption.encode("utf-8")
    return rec


def write_shards(
    samples: Iterable[Sample],
    out_dir: Path,
    prefix: str,
    shard_size: int,
    fingerprint: str | None = None,
) -> list[Path]:
    """Write `samples` as `<prefix>-%05d.tar` shards of `shard_size` samples; return their paths.

    Idempotent: when `_SUCCESS-<prefix>.json` matches (`fingerprint`, which the caller derives from
    everything that determines the content, and `shard_size`), `samples` is not even iterated and the
    existing shards are returned. Otherwise the set is rewritten: the old manifest goes first, each
    shard is written to a temporary name and renamed, shards left over from an older, larger set are
    deleted, and the manifest is written last. Tar entries carry a fixed mtime, so a rewrite of the
    same samples is byte-identical; a shard whose bytes did not change is left untouched (mtime kept),
    so rebuilding a set with one damaged shard re-embeds only that shard.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not re.match(r"^[A-Za-z0-9_-]+$", prefix):
        raise ValueError(f"shard prefix {prefix!r} has characters outside [A-Za-z0-9_-]")
    out_dir = Path(out_dir)
    existing = complete_shard_set(out_dir, prefix, shard_size, fingerprint)
    if existing is not None:
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path(out_dir, prefix).unlink(missing_ok=True)
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    it = iter(samples)
    index = 0
    exhausted = False
    while not exhausted:
        path = shard_path(out_dir, prefix, index)
        tmp = tmp_name(path)
        remove_dead_temps_of(path)  # a killed writer's half tar
        count = 0
        try:
            with open(tmp, "wb") as f, webdataset.TarWriter(f, encoder=False, mtime=0) as writer:
                while count < shard_size:
                    try:
                        sample = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if sample.uid in seen:
                        raise ValueError(f"duplicate uid {sample.uid!r} in shard set {prefix!r}")
                    seen.add(sample.uid)
                    writer.write(_record(sample))
                    count += 1
            if count == 0:
                tmp.unlink()
                break
            if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
                # Same bytes: keep the old file and its mtime, so the embeddings part made from it
                # (keyed by the shard's size and mtime) stays valid; a rewrite redoes only what changed.
                tmp.unlink()
            else:
                maybe_die(f"rename:{path}")  # test hook (artifacts/faults.py): the kill matrix's mid-set kill
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        entries.append({"name": path.name, "count": count, "bytes": path.stat().st_size})
        index += 1
    _remove_stale(out_dir, prefix, {e["name"] for e in entries})
    write_json_atomic(
        manifest_path(out_dir, prefix),
        {
            "format_version": FORMAT_VERSION,
            "prefix": prefix,
            "shard_size": shard_size,
            "fingerprint": fingerprint,
            "num_samples": sum(e["count"] for e in entries),
            "shards": entries,
        },
    )
    return [out_dir / e["name"] for e in entries]


def recorded_shard(shard: Path | str) -> dict[str, Any] | None:
    """What the manifest of the set holding `shard` records for it: {"count" (samples), "bytes",
    "manifest" (its path)}, or None when the shard is not part of a set with a readable manifest."""
    shard = Path(shard)
    match = re.match(r"^([A-Za-z0-9_-]+)-\d{5}\.tar$", shard.name)
    if match is None:
        return None
    info = read_manifest(shard.parent, match.group(1))
    if info is None:
        return None
    for entry in info.get("shards", []):
        if entry.get("name") == shard.name:
            return {
                "count": int(entry["count"]),
                "bytes": int(entry["bytes"]),
                "manifest": manifest_path(shard.parent, match.group(1)),
            }
    return None


def list_shards(out_dir: Path) -> list[Path]:
    """Every shard of every complete set (one with a manifest) in `out_dir`, in sorted name order.

    Temporary files and shards of incomplete sets are never listed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"shard directory not found: {out_dir}")
    paths: list[Path] = []
    for m in sorted(out_dir.glob(MANIFEST_FORMAT.format(prefix="*"))):
        if is_leftover_tmp(m):
            continue
        prefix = m.name[len("_SUCCESS-") : -len(".json")]
        info = read_manifest(out_dir, prefix)
        if info is not None:
            paths.extend(out_dir / e["name"] for e in info.get("shards", []))
    return sorted(paths)


def _is_img2dataset(meta: dict[str, Any]) -> bool:
    # img2dataset's json always carries these; our own shards never do.
    return "source" not in meta and {"url", "key", "status"} <= meta.keys()


def to_record(key: str, files: dict[str, bytes]) -> dict[str, Any]:
    """One sample's files (extension -> bytes) as read_shard's record (see there)."""
    meta = json.loads(files["json"]) if "json" in files else {}
    image_ext = image_ext_of(files)
    caption = files["txt"].decode("utf-8") if "txt" in files else None
    source = meta.get("source")
    if _is_img2dataset(meta):
        # img2dataset: `__key__` is its shard/row key, the uid is in the json (save_additional_columns),
        # a missing caption is written as an empty txt, and there is no source field.
        source = IMG2DATASET_SOURCE
        caption = caption or None
    uid = meta.get("uid")
    return {
        "uid": key if uid is None else str(uid),
        "image_bytes": files.get(image_ext) if image_ext else None,
        "image_ext": image_ext,
        "caption": caption,
        "label": meta.get("label"),
        "source": source,
        "meta": meta,
    }


def image_ext_of(exts: Container[str]) -> str | None:
    """The extension of a sample's image member among its files' `exts`: the first of IMAGE_EXTS it
    has (None: the sample has no image)."""
    return next((e for e in IMAGE_EXTS if e in exts), None)


class ImageMember(NamedTuple):
    """Where a sample's image lies in its shard (read `size` bytes at `offset`) and its extension."""

    offset: int
    size: int
    ext: str


def image_members(path: Path | str) -> dict[str, ImageMember]:
    """uid -> where the image of each sample of a shard lies, for reading one image later without
    scanning the shard (the browser, fine-tune mode).

    One pass over the headers; only the small json members are read. The uid and the image member are
    the ones `read_shard` gives the sample (`to_record`'s rule: the json's uid, else the key, so an
    img2dataset sample is found under its uid too). A sample whose json is unreadable is found under its
    key (the embed stage fails on it, so no part names it)."""
    found: dict[str, ImageMember] = {}
    for key, where, small in iter_shard_members(Path(path), read=("json",)):
        ext = image_ext_of(where)
        if ext is None:
            continue
        try:
            uid = to_record(key, small)["uid"]
        except ValueError:
            uid = key
        member: Member = where[ext]
        found[uid] = ImageMember(member.offset, member.size, ext)
    return found


def read_shard(path: Path | str) -> Iterator[dict[str, Any]]:
    """Yield each sample of a shard as dict(uid, image_bytes, image_ext, caption, label, source, meta).

    `meta` is the whole json. img2dataset shards (kb_builder/download/) are read too: uid from their
    json's `uid`, `label` None, `source` "img2dataset", an empty caption as None; their json (url,
    caption, key, status, width, ...) stays in `meta`. A truncated or corrupt shard raises a UserError
    naming it.
    """
    for _, key, files in iter_shard_files(Path(path)):
        yield to_record(key, files or {})


def shard_stem(shard: Path | str, shard_root: Path | str) -> str:
    """A flat name, unique under `shard_root` and sorting like the shard paths, for a shard's outputs
    (the embeddings part `part-<stem>.parquet`): its path under the root with '/' -> '-', e.g.
    `<chunk>/00000.tar` -> `<chunk>-00000`, `<chunk>/retry-001/00000.tar` -> `<chunk>-retry-001-00000`
    (img2dataset names the shards of every chunk folder 00000.tar, 00001.tar, ...)."""
    shard, root = Path(shard), Path(shard_root)
    # as given first: a shard that is a symlink to a file elsewhere is still this root's shard
    for path, base in ((shard, root), (shard.absolute(), root.absolute()), (shard.resolve(), root.resolve())):
        try:
            rel = path.relative_to(base)
            break
        except ValueError:
            continue
    else:
        raise UserError(f"shard {shard} is not under its shard folder {root}")
    return "-".join(rel.with_suffix("").parts)
