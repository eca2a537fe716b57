"""A generic labelled image tree: `root/<split>/<class>/<image>`, splits among train / val / test.

Class names are the sorted subdirectory names of `root/train`; label i is the i-th name. Images are
the files with a known image extension, sorted by name within each class, classes in label order;
item i of a split gets the uid `<name>-<split>-<i>` (stable while the tree is unchanged; made of
`safe_token`s, so always inside the uid contract `[A-Za-z0-9_-]`, whatever the file names). A file
with an image extension that Pillow does not recognise as an image (text saved as `x.png`) is skipped
and counted (`not_an_image`) in the dataset's notes (`skipped_files`), with a warning, and so is a
non-PNG/JPEG file whose header claims more pixels than Pillow's MAX_IMAGE_PIXELS
(`decompression_bomb`: it would be decoded to be re-encoded); a class folder
without images gets a warning naming it. An optional `imbalance_ratio` turns the training split
long-tailed with the CIFAR-LT rule (`longtail.py`), `n_max` defaulting to the largest training class.

Validation: `val/` when present; otherwise a seeded per-class hold-out of the training images, taken
before the long-tailed cut so train and val stay disjoint: `val_per_class` images of each class, or
else `val_fraction` of each class (default 0.2; 0 turns the hold-out off). Every class keeps at least
one training image, so a tail class of an already long-tailed folder is never emptied. The dataset's
`notes` say which. World pool (the images a world KB is built from, `kb_sources.py`): `world/<class>/`
when present, else the training images the long-tailed cut left out (none without `imbalance_ratio`).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import (
    DatasetSplit,
    DownstreamDataset,
    hold_out_val,
    make_uid,
    safe_token,
)
from retformer.kb_builder.datasets.longtail import longtail_indices
from retformer.kb_builder.datasets.schema import ImageFolder

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MAX_EXAMPLES = 5  # skipped files named per reason in the dataset's notes
# PNG and JPEG files go into the shards as they are (base.DatasetSplit.image_source), so their signature
# is all the scan checks (broken data is the embed stage's to skip); other formats are re-encoded by
# Pillow, so Pillow must recognise them.
_PASSED_AS_IS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
POOL_DIR = "world"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read image folder {path}: {exc.strerror or exc}") from exc


def _image_problem(path: Path) -> str | None:
    """None when Pillow recognises `path` as an image (from its header only: no pixel is decoded
    here), else the skip reason, in the embed stage's vocabulary (artifacts/decode.py)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "unreadable_file"
    if head.startswith(_PASSED_AS_IS):
        return None  # the usual case, half the cost of asking Pillow (a folder is scanned at each load)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that. This file would be
            # decoded and re-encoded by `retformer shards` (image_source): a header claiming more
            # pixels is skipped here, as the embed stage skips a PNG/JPEG bomb (artifacts/decode.py).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path):
                return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "decompression_bomb"
    except UnidentifiedImageError:
        return "not_an_image"
    except OSError:
        return "unreadable_file"


class _Scan:
    """The files a scan skipped, by reason, with a few examples (for the dataset's notes)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples.setdefault(reason, [])) < MAX_EXAMPLES:
            self.examples[reason].append(str(path))

    def note(self) -> dict[str, Any]:
        return {"counts": dict(self.skipped), "examples": self.examples}


def _scan_split(split_dir: Path, class_names: list[str], scan: _Scan) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    present = [p for p in _list_dir(split_dir) if p.is_dir()]
    unknown = sorted({p.name for p in present} - set(class_names))
    if unknown:
        raise UserError(
            f"{split_dir}: classes {unknown} do not appear in the train split {split_dir.parent / 'train'}"
        )
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = 0
        for f in _list_dir(class_dir):
            if not (f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            # A file named like an image that is not one (text saved as x.png) is skipped and counted,
            # as the embed stage skips an undecodable image inside a shard.
            problem = _image_problem(f)
            if problem is not None:
                scan.skip(f, problem)
                continue
            paths.append(f)
            labels.append(label)
            found += 1
        if not found:
            log.warning("class folder %s has no images: class %r has none in %s", class_dir, name, split_dir)
    return paths, labels


def load_imagefolder(dataset: ImageFolder) -> DownstreamDataset:
    """Load `root/<split>/<class>/<image>` as a DownstreamDataset.

    Manifest keys: `root` (required), `name` (default: the root's directory name), `imbalance_ratio`
    (None = keep the training split as is), `n_max` (default: largest training class), `seed` (0),
    `shot_thresholds` (many/medium/few thresholds, see `DownstreamDataset`).
    """
    if not dataset.root:
        raise UserError("imagefolder dataset: `root` is required (a directory with train/ and val/ or test/)")
    root = Path(dataset.root).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder root {root} does not exist or is not a directory")
    splits_present = [s for s in SPLITS if (root / s).is_dir()]
    _list_dir(root)  # an unreadable root fails here with a clear message
    if "train" not in splits_present:
        raise UserError(
            f"image folder root {root} has no train/ subdirectory (expected root/<split>/<class>/<image>)"
        )
    class_names = [p.name for p in _list_dir(root / "train") if p.is_dir()]
    if not class_names:
        raise UserError(f"{root / 'train'} has no class subdirectories")
    name = dataset.name or root.name
    prefix = safe_token(name)
    splits: dict[str, DatasetSplit] = {}
    scan = _Scan()
    for split in splits_present:
        paths, labels = _scan_split(root / split, class_names, scan)
        if not paths:
            raise UserError(f"{root / split}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
        splits[split] = DatasetSplit(
            [make_uid(prefix, split, i) for i in range(len(paths))], np.asarray(labels), paths=paths
        )
    notes: dict[str, Any] = {}
    seed = dataset.seed
    if "val" in splits:
        notes["val"] = f"{root / 'val'}"
    else:  # no val/: hold one out of train, before the long-tailed cut (train and val stay disjoint)
        hold_out_val(splits, notes, name, seed + 1, dataset.val_per_class, dataset.val_fraction)
    pool = None
    if (root / POOL_DIR).is_dir():
        paths, labels = _scan_split(root / POOL_DIR, class_names, scan)
        pool = DatasetSplit([make_uid(prefix, POOL_DIR, i) for i in range(len(paths))], labels, paths=paths)
        notes["pool"] = f"{root / POOL_DIR}"
    if scan.skipped:
        notes["skipped_files"] = scan.note()
        log.warning(
            "image folder %s: skipped %s (e.g. %s)",
            root,
            ", ".join(f"{n} {reason}" for reason, n in sorted(scan.skipped.items())),
            next(iter(scan.examples.values()))[0],
        )
    ratio = dataset.imbalance_ratio
    if ratio is not None:
        train = splits["train"]
        n_max = dataset.n_max or int(np.bincount(train.labels).max())
        rows = longtail_indices(train.labels, int(n_max), float(ratio), seed, num_classes=len(class_names))
        splits["train"] = train.subset(rows)
        if pool is None:
            pool = train.subset(np.setdiff1d(np.arange(len(train)), rows))
            notes["pool"] = "training images the long-tailed cut left out"
    return DownstreamDataset(
        name=name,
        class_names=class_names,
        splits=splits,
        spec=dataset,
        shot=dataset.shot_thresholds,
        pool=pool,
        notes=notes,
    )
