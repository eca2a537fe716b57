"""mini-WebVision (Ma et al. 2020; DivideMix's `dataloader_webvision.py` conventions).

Layout under `root` (the WebVision 1.0 folder):

- `info/train_filelist_google.txt`: `relative/path label` a line, paths relative to root
  (`google/q0001/<image>.jpg`); split `train` = the lines with label < num_classes (50).
- `info/val_filelist.txt`: `name label` a line, images under `root/val_images_256/`; split
  `webvision_val` = the lines with label < num_classes.
- `info/synsets.txt` (optional): one `<wnid> <description>` a line in label order (WebVision's labels
  are ILSVRC12's); class names are the first comma-separated name of each description, else `class_<i>`.

Split `imagenet_val` (the same classes of the ILSVRC12 validation set) is loaded when
`imagenet_val_root` is given, from the first of these layouts that applies:

1. `imagenet_val_list` given: a `relative/path label` list (ILSVRC12 labels 0..999), paths relative to
   imagenet_val_root (e.g. Caffe's `val.txt` with a flat folder of ILSVRC2012_val_*.JPEG); lines with
   label < num_classes are kept.
2. DivideMix's `imagenet/val/<c>/<image>`: sub-folders named `0`, `1`, ... (class index, decimal).
3. The standard ILSVRC12 val tree `<wnid>/<image>` (as ImageNet-LT's test list expects): class c is the
   c-th wnid of `root/info/synsets.txt`, or of the sorted wnid folder names when that file is absent
   (ILSVRC12's label order is the sorted wnids).

Within a class folder, images are sorted by name (DivideMix uses os.listdir order: same set, different
order). Uids: `webvision-<path without extension>` for WebVision images (stems repeat across query
folders), `imagenet-<file stem>` for ILSVRC12 images (the same uid as in ImageNet-LT). Only the first
image of each split is checked to exist (a wrong root fails at load time in one line).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset
from retformer.kb_builder.datasets.imagefolder import IMAGE_EXTENSIONS
from retformer.kb_builder.datasets.imagenet_lt import (
    check_first_exists,
    check_unique,
    path_uid,
    read_file_list,
    stem_uid,
)
from retformer.kb_builder.datasets.schema import MiniWebvision

TRAIN_LIST = "info/train_filelist_google.txt"
VAL_LIST = "info/val_filelist.txt"
VAL_IMAGES = "val_images_256"
SYNSETS = "info/synsets.txt"
UID_PREFIX = "webvision"
IMAGENET_UID_PREFIX = "imagenet"
LAYOUT = (
    f"expected root/{TRAIN_LIST} and root/{VAL_LIST} (lines `relative/path label`), train images under "
    f"root/ (google/...), val images under root/{VAL_IMAGES}/"
)
IMAGENET_LAYOUT = (
    "expected imagenet_val_root/<c>/<image> with c = 0..num_classes-1 (DivideMix), "
    "imagenet_val_root/<wnid>/<image> (ILSVRC12 val tree), or imagenet_val_list = a `path label` list"
)
_WNID = re.compile(r"^n\d{8}$")


def _list_split(
    list_path: Path, image_root: Path, num_classes: int, prefix_root: str, what: str
) -> DatasetSplit:
    """The lines of a WebVision list with label < num_classes (DivideMix's `if target < num_class`)."""
    if not list_path.is_file():
        raise UserError(f"mini-WebVision {what} list {list_path} not found: {LAYOUT}")
    rel, labels, lines = read_file_list(list_path)
    if labels.size and labels.min() < 0:
        i = int(np.argmin(labels))
        raise UserError(f"{list_path}:{int(lines[i])}: negative label {int(labels[i])}")
    keep = np.flatnonzero(labels < num_classes)
    if keep.size == 0:
        raise UserError(f"{list_path}: no line with a label below {num_classes} (the mini-WebVision classes)")
    rel = [rel[i] for i in keep]
    uids = [path_uid(UID_PREFIX, f"{prefix_root}/{p}" if prefix_root else p) for p in rel]
    check_unique(uids, rel, list_path)
    files = [image_root / p for p in rel]
    check_first_exists(files, list_path, image_root, LAYOUT)
    # source_index = position among ALL lines of the list, so an item traces back to its line.
    return DatasetSplit(uids, labels[keep], paths=files, source_index=keep)


def read_synsets(root: Path) -> list[tuple[str, str]] | None:
    """[(wnid, first name)] from `root/info/synsets.txt` in label order, or None when absent."""
    path = root / SYNSETS
    if not path.is_file():
        return None
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        name = parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0]
        out.append((parts[0], name or parts[0]))
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _imagenet_val_split(dataset: MiniWebvision, val_root: Path, root: Path, num_classes: int) -> DatasetSplit:
    val_root = val_root.expanduser()
    if not val_root.is_dir():
        raise UserError(f"ILSVRC12 val folder {val_root} (imagenet_val_root) not found: {IMAGENET_LAYOUT}")
    files: list[Path] = []
    labels: list[int] = []
    where: Path = val_root
    if dataset.imagenet_val_list:
        where = Path(dataset.imagenet_val_list).expanduser()
        if not where.is_file():
            raise UserError(f"ILSVRC12 val list {where} (imagenet_val_list) not found: {IMAGENET_LAYOUT}")
        rel, lab, _ = read_file_list(where)
        keep = [i for i in range(len(rel)) if 0 <= lab[i] < num_classes]
        files = [val_root / rel[i] for i in keep]
        labels = [int(lab[i]) for i in keep]
    else:
        subdirs = {p.name: p for p in val_root.iterdir() if p.is_dir()}
        if "0" in subdirs:  # DivideMix: imagenet/val/<class index>/
            folders = [val_root / str(c) for c in range(num_classes)]
        elif any(_WNID.match(name) for name in subdirs):
            synsets = read_synsets(root)
            order = [w for w, _ in synsets] if synsets else sorted(n for n in subdirs if _WNID.match(n))
            if len(order) < num_classes:
                raise UserError(f"{val_root}: only {len(order)} wnid classes known, need {num_classes}")
            folders = [val_root / w for w in order[:num_classes]]
        else:
            raise UserError(f"ILSVRC12 val folder {val_root} has no class folders: {IMAGENET_LAYOUT}")
        for c, folder in enumerate(folders):
            if not folder.is_dir():
                raise UserError(
                    f"ILSVRC12 val class folder {folder} (class {c}) not found: {IMAGENET_LAYOUT}"
                )
            images = _images_in(folder)
            files.extend(images)
            labels.extend([c] * len(images))
    if not files:
        raise UserError(f"{where}: no ILSVRC12 val images of classes 0..{num_classes - 1}: {IMAGENET_LAYOUT}")
    uids = [stem_uid(IMAGENET_UID_PREFIX, f.name) for f in files]
    check_unique(uids, [str(f) for f in files], where)
    check_first_exists(files, where, val_root, IMAGENET_LAYOUT)
    return DatasetSplit(uids, np.asarray(labels), paths=files)


def load_mini_webvision(dataset: MiniWebvision) -> DownstreamDataset:
    """mini-WebVision: splits `train`, `webvision_val` and (when configured) `imagenet_val`.

    Manifest keys: `root` (required), `num_classes` (50: the first 50 classes), `imagenet_val_root` and
    `imagenet_val_list` (see the module docstring), `shot_thresholds`.
    """
    if not dataset.root:
        raise UserError(f"dataset kind mini_webvision: `root` is required ({LAYOUT})")
    root = Path(dataset.root).expanduser()
    if not root.is_dir():
        raise UserError(f"WebVision root {root} not found: {LAYOUT}")
    num_classes = dataset.num_classes
    splits = {
        "train": _list_split(root / TRAIN_LIST, root, num_classes, "", "train"),
        "webvision_val": _list_split(root / VAL_LIST, root / VAL_IMAGES, num_classes, VAL_IMAGES, "val"),
    }
    if dataset.imagenet_val_root:
        splits["imagenet_val"] = _imagenet_val_split(
            dataset, Path(dataset.imagenet_val_root), root, num_classes
        )
    elif dataset.imagenet_val_list:
        raise UserError(
            "mini-WebVision: imagenet_val_list needs imagenet_val_root (the folder its paths are in)"
        )
    synsets = read_synsets(root)
    if synsets is not None and len(synsets) < num_classes:
        raise UserError(f"{root / SYNSETS}: {len(synsets)} synsets for {num_classes} classes")
    names = (
        [name for _, name in synsets[:num_classes]] if synsets else [f"class_{i}" for i in range(num_classes)]
    )
    return DownstreamDataset(
        name=dataset.name or "mini_webvision",
        class_names=names,
        splits=splits,
        spec=dataset,
        shot=dataset.shot_thresholds,
    )
