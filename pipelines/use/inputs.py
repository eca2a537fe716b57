"""What `retformer predict` reads: image files, folders and webdataset shards -> `ImageInput`s (bytes,
uid and label where a shard gives them, or why the input cannot be read)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import to_record
from retformer.artifacts.tar_reader import iter_shard_files

# The most bytes read from one input file: an uncompressed RGB image at Pillow's MAX_IMAGE_PIXELS
# (3 x 89.5 M = 256 MiB); any larger image is refused as a decompression bomb anyway. Beyond it the
# file is skipped after reading this much (`/dev/zero` read until MemoryError).
MAX_INPUT_BYTES = 256 * 1024 * 1024


def _image_suffixes() -> frozenset[str]:
    """File suffixes Pillow can open (what a folder is searched for), plus webdataset shards."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class NotAnImage(UserError):
    """Bytes that do not decode to an image the model's encoder can read (`Predictor.predict_bytes`)."""


@dataclass(frozen=True)
class ImageInput:
    """One image to predict: its name (path, or `shard.tar#key`), its bytes, its uid and true label when
    a shard gives them, or why it cannot be read."""

    name: str
    data: bytes | None = None
    uid: str | None = None
    error: str | None = None
    label: int | None = None


def iter_inputs(paths: Iterable[Path | str]) -> Iterator[ImageInput]:
    """The images of `paths`: image files, folders (image files and shards under them, sorted) and
    webdataset shards (`.tar`, every sample). Unreadable inputs come back with their `error`."""
    suffixes = _image_suffixes() | {".tar"}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                yield ImageInput(str(path), error="no image files or shards in this folder")
            for p in found:
                yield from _path_inputs(p)
        elif path.exists():
            yield from _path_inputs(path)
        else:
            yield ImageInput(str(path), error="no such file or folder")


def _path_inputs(path: Path) -> Iterator[ImageInput]:
    if path.suffix.lower() == ".tar":
        yield from _shard_inputs(path)
        return
    try:
        with open(path, "rb") as f:
            # a regular file's size says it up front; a device or a pipe is read up to the cap
            too_big = os.fstat(f.fileno()).st_size > MAX_INPUT_BYTES
            data = b"" if too_big else f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        yield ImageInput(str(path), error=f"unreadable ({exc.strerror or exc})")
        return
    if too_big or len(data) > MAX_INPUT_BYTES:
        del data
        yield ImageInput(
            str(path), error=f"larger than {MAX_INPUT_BYTES >> 20} MiB, the most read from one input"
        )
        return
    yield ImageInput(str(path), data)


def _shard_inputs(shard: Path) -> Iterator[ImageInput]:
    """Every sample of a webdataset shard; a corrupt shard ends with one error for the rest of it."""
    try:
        for _, key, files in iter_shard_files(shard):
            name = f"{shard}#{key}"
            try:
                rec = to_record(key, files or {})
            except Exception:  # noqa: BLE001 - unreadable json: this sample, not the shard
                yield ImageInput(name, error="bad_metadata")
                continue
            if rec["image_bytes"] is None:
                yield ImageInput(name, uid=rec["uid"], error="missing_image")
            else:
                yield ImageInput(name, rec["image_bytes"], uid=rec["uid"], label=class_label(rec["label"]))
    except UserError as exc:
        yield ImageInput(str(shard), error=str(exc))


def class_label(value: Any) -> int | None:
    """A shard json's (or an embeddings frame's) `label` as a class index; None when absent or not a
    non-negative integer (a KB of web pairs has none; -1 means none in the embeddings parts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        return None
    return int(value)


def count_inputs(paths: Iterable[Path | str]) -> int | None:
    """How many images `paths` hold without reading them: None when a shard is among them."""
    total = 0
    suffixes = _image_suffixes()
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".tar" or (path.is_dir() and any(path.rglob("*.tar"))):
            return None
        if path.is_dir():
            total += sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            total += 1
    return total
