"""A generic labelled image tree: `root/<split>/<class>/<image>`, splits among train / val / test.

Class names are the sorted subdirectory names of `root/train`; label i is the i-th name. Images are
the files with a known image extension, sorted by name within each class, classes in label order;
item i of a split gets the uid `<name>-<split>-<i>` (stable while the tree is unchanged). An optional
`imbalance_ratio` turns the training split long-tailed with the CIFAR-LT rule (`longtail.py`),
`n_max` defaulting to the largest training class.

Validation: `val/` when present; otherwise a seeded per-class hold-out of the training images, taken
before the long-tailed cut so train and val stay disjoint: `val_per_class` images of each class, or
else `val_fraction` of each class (default 0.2; 0 turns the hold-out off). Every class keeps at least
one training image, so a tail class of an already long-tailed folder is never emptied. The dataset's
`notes` say which. World pool (the images a world KB is built from, `kb_sources.py`): `world/<class>/`
when present, else the training images the long-tailed cut left out (none without `imbalance_ratio`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from artifacts.errors import UserError
from kb_builder.datasets.base import DatasetSplit, DownstreamDataset, hold_out_val, make_uid, safe_token
from kb_builder.datasets.longtail import longtail_indices

SPLITS = ("train", "val", "test")
POOL_DIR = "world"
# Held out for model selection when the folder has no val/ and the manifest names no val_per_class.
DEFAULT_VAL_FRACTION = 0.2
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read image folder {path}: {exc.strerror or exc}") from exc


def _scan_split(split_dir: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
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
        for f in _list_dir(class_dir):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                labels.append(label)
    return paths, labels


def load_imagefolder(spec: dict[str, Any]) -> DownstreamDataset:
    """Load `root/<split>/<class>/<image>` as a DownstreamDataset.

    spec keys: `root` (required), `name` (default: the root's directory name), `imbalance_ratio`
    (None = keep the training split as is), `n_max` (default: largest training class), `seed` (0),
    `shot_thresholds` (many/medium/few thresholds, see `DownstreamDataset`).
    """
    if not spec.get("root"):
        raise UserError("imagefolder dataset: `root` is required (a directory with train/ and val/ or test/)")
    root = Path(spec["root"]).expanduser()
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
    name = spec.get("name") or root.name
    prefix = safe_token(name)
    splits: dict[str, DatasetSplit] = {}
    for split in splits_present:
        paths, labels = _scan_split(root / split, class_names)
        if not paths:
            raise UserError(f"{root / split}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
        splits[split] = DatasetSplit(
            [make_uid(prefix, split, i) for i in range(len(paths))], np.asarray(labels), paths=paths
        )
    notes: dict[str, Any] = {}
    seed = int(spec.get("seed", 0))
    if "val" in splits:
        notes["val"] = f"{root / 'val'}"
    else:  # no val/: hold one out of train, before the long-tailed cut (train and val stay disjoint)
        fraction = spec.get("val_fraction", DEFAULT_VAL_FRACTION)
        hold_out_val(splits, notes, name, seed + 1, spec.get("val_per_class"), fraction)
    pool = None
    if (root / POOL_DIR).is_dir():
        paths, labels = _scan_split(root / POOL_DIR, class_names)
        pool = DatasetSplit([make_uid(prefix, POOL_DIR, i) for i in range(len(paths))], labels, paths=paths)
        notes["pool"] = f"{root / POOL_DIR}"
    ratio = spec.get("imbalance_ratio")
    if ratio is not None:
        train = splits["train"]
        n_max = spec.get("n_max") or int(np.bincount(train.labels).max())
        rows = longtail_indices(train.labels, int(n_max), float(ratio), seed, num_classes=len(class_names))
        splits["train"] = train.subset(rows)
        if pool is None:
            pool = train.subset(np.setdiff1d(np.arange(len(train)), rows))
            notes["pool"] = "training images the long-tailed cut left out"
    return DownstreamDataset(
        name=name,
        class_names=class_names,
        splits=splits,
        spec=dict(spec),
        shot=dict(spec.get("shot_thresholds") or {}),
        pool=pool,
        notes=notes,
    )
