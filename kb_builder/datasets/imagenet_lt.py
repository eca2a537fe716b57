"""ImageNet-LT (Liu et al. 2019, OLTR) from its list files, and the list helpers mini-WebVision shares.

Layout: `lists/ImageNet_LT_{train,val,test}.txt`, one `relative/path label` a line, paths relative
to `root` (the ImageNet folder holding `train/` and `val/`, e.g. `train/n01440764/n01440764_190.JPEG`),
labels 0..999. `train` and `test` are required, `val` is loaded when its list exists. Class names come
from `lists/classnames.txt` (one name a line, in label order) when present, else `class_<i>`. The
training split has 115,846 images, 1,280 down to 5 per class; the standard many / medium / few
thresholds (> 100, 20..100, < 20) apply unchanged.

Uids are `imagenet-<file stem>` (`imagenet-n01440764_190`, `imagenet-ILSVRC2012_val_00000293`):
ImageNet's file stems are unique, so one image has one uid in ImageNet-LT, in mini-WebVision's
`imagenet_val` split and in any KB built from them, whatever folder layout holds it.

Only the first image of each list is checked to exist (a wrong `root` fails at load time, in one
line); checking all 186K files would cost minutes on network storage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset, safe_token
from retformer.kb_builder.datasets.schema import ImagenetLt

LIST_FILES = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}
REQUIRED_SPLITS = ("train", "test")
CLASSNAMES_FILE = "classnames.txt"
UID_PREFIX = "imagenet"
LAYOUT = (
    "expected lists/ImageNet_LT_{train,val,test}.txt (lines `relative/path label`) with the paths "
    "relative to root (root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG)"
)


def read_file_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(relative paths, labels int64, 1-based line numbers) of a `relative/path label` list file.

    Blank lines are skipped; the label is the last whitespace-separated token, so a path may contain
    spaces. A line without an integer label -> UserError naming file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read list file {path}: {exc.strerror or exc}") from exc
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise UserError(
                f"{path}:{lineno}: expected `relative/path label`, got {line.strip()!r}"
            ) from None
        paths.append(parts[0].strip())
        labels.append(label)
        lines.append(lineno)
    return paths, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def check_labels(labels: np.ndarray, lines: np.ndarray, path: Path, num_classes: int) -> None:
    """UserError naming the first line whose label is outside 0..num_classes-1."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise UserError(f"{path}:{int(lines[i])}: label {int(labels[i])} outside 0..{num_classes - 1}")


def stem_uid(prefix: str, rel_path: str) -> str:
    """`<prefix>-<file stem>` in the uid alphabet (for ImageNet files, whose stems are unique)."""
    return f"{safe_token(prefix)}-{safe_token(Path(rel_path).stem)}"


def path_uid(prefix: str, rel_path: str) -> str:
    """`<prefix>-<relative path without extension, separators as _>` (for trees whose stems repeat)."""
    p = Path(rel_path)
    return f"{safe_token(prefix)}-{safe_token(str(p.with_suffix('')) if p.suffix else str(p))}"


def check_unique(uids: list[str], paths: list[str], where: Path | str) -> None:
    """UserError naming two entries of `where` that map to the same uid (e.g. a duplicated line)."""
    seen: dict[str, str] = {}
    for uid, p in zip(uids, paths, strict=True):
        if uid in seen:
            raise UserError(
                f"{where}: {seen[uid]!r} and {p!r} map to the same uid {uid!r} (duplicate image?)"
            )
        seen[uid] = p


def check_first_exists(files: list[Path], listed_in: Path | str, root: Path, layout: str) -> None:
    """UserError if the first image of a split is missing: almost always a wrong `root`."""
    if files and not files[0].is_file():
        raise UserError(
            f"image {files[0]} (first entry of {listed_in}) not found under root {root}: {layout}"
        )


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """Class names from `path` (one a line, label order) if it exists, else `class_<i>`."""
    if not path.is_file():
        return [f"class_{i}" for i in range(num_classes)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise UserError(f"{path}: {len(names)} class names for {num_classes} classes (one name a line)")
    return names


def load_imagenet_lt(dataset: ImagenetLt) -> DownstreamDataset:
    """ImageNet-LT as a DownstreamDataset with splits `train`, `test` and (if listed) `val`.

    Manifest keys: `root` (required: the folder the list paths are relative to), `lists` (the folder of
    the three list files; default: root), `num_classes` (1000), `shot_thresholds`.
    """
    if not dataset.root:
        raise UserError(f"dataset kind imagenet_lt: `root` is required ({LAYOUT})")
    root = Path(dataset.root).expanduser()
    lists = Path(dataset.lists or root).expanduser()
    num_classes = dataset.num_classes
    if not root.is_dir():
        raise UserError(f"ImageNet-LT image root {root} not found: {LAYOUT}")
    if not lists.is_dir():
        raise UserError(f"ImageNet-LT lists folder {lists} not found: {LAYOUT}")
    splits: dict[str, DatasetSplit] = {}
    for split, filename in LIST_FILES.items():
        list_path = lists / filename
        if not list_path.is_file():
            if split in REQUIRED_SPLITS:
                raise UserError(f"ImageNet-LT list {list_path} not found: {LAYOUT}")
            continue
        rel, labels, lines = read_file_list(list_path)
        if not rel:
            raise UserError(f"ImageNet-LT list {list_path} is empty: {LAYOUT}")
        check_labels(labels, lines, list_path, num_classes)
        uids = [stem_uid(UID_PREFIX, p) for p in rel]
        check_unique(uids, rel, list_path)
        files = [root / p for p in rel]
        check_first_exists(files, list_path, root, LAYOUT)
        # source_index = row in the list file, so every item traces back to its line.
        splits[split] = DatasetSplit(uids, labels, paths=files)
    return DownstreamDataset(
        name=dataset.name or "imagenet_lt",
        class_names=read_class_names(lists / CLASSNAMES_FILE, num_classes),
        splits=splits,
        spec=dataset,
        shot=dataset.shot_thresholds,
    )
