"""CIFAR-100-LT (Cao et al. 2019) from the standard `cifar-100-python/` pickles.

Layout: `<root>/cifar-100-python/{train,test,meta}` (the extracted cifar-100-python.tar.gz). `root`
may also be the `cifar-100-python/` folder itself. `train` / `test` hold `data` (N x 3072 uint8: the
1024 red, then 1024 green, then 1024 blue values of a 32x32 image, rows top to bottom),
`fine_labels` and `coarse_labels`; `meta` holds `fine_label_names` and `coarse_label_names`. The
files are Python-2 pickles, read here with `encoding="latin1"`; keys may come back as `str` or
`bytes` (b"data"), both are accepted. Unpickling is restricted to what these files contain (dicts,
lists, numpy arrays), so a tampered file cannot run code.

The long-tailed training split is LDAM-DRW's `imbalance_cifar.py` exactly (see `cifar_lt_indices`);
the test split is the balanced 10,000. Many / medium / few are defined by the r = 100 counts for every
imbalance ratio (LIFT's convention): `shot_reference_ratio: 100`, the default.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset, make_uid
from retformer.kb_builder.datasets.fashion_mnist import balanced_subsample
from retformer.kb_builder.datasets.longtail import longtail_counts, longtail_indices
from retformer.kb_builder.datasets.schema import Cifar100Lt

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
# Uids name the source images: `cifar100-train-000123` is training image 123 of the 50,000 in every
# dataset and KB built from it (the LT subset keeps the original index).
UID_PREFIX = "cifar100"
LAYOUT = (
    f"expected <root>/{FOLDER}/ holding the pickles train, test and meta "
    "(extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into root)"
)
IMAGE_SHAPE = (3, 32, 32)

# What the CIFAR pickles reference: numpy's array reconstruction (numpy 1.x and 2.x names) and the
# codec py3 uses for bytes in protocol-2 pickles. Nothing else may be imported while unpickling.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


@dataclass
class ShotReferenceDataset(DownstreamDataset):
    """A DownstreamDataset whose many/medium/few split is computed from fixed `shot_counts`.

    Why: LIFT defines CIFAR-100-LT's groups by the r = 100 counts for every ratio, and a dataset with
    label noise keeps the groups of its clean counts. `shot_counts` None = the training counts, as in
    DownstreamDataset. `superclass[c]` is class c's superclass where the source has one (CIFAR-100's
    coarse labels), used by asymmetric label noise. `extra_info` is merged into `describe()`.
    """

    shot_counts: list[int] | None = None
    superclass: list[int] | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)

    def shot_counts_used(self) -> list[int]:
        """`shot_counts` (or the training counts): what the many / medium / few split is computed from."""
        return list(self.shot_counts) if self.shot_counts is not None else self.train_class_counts()

    def describe(self) -> dict[str, Any]:
        """DownstreamDataset.describe() plus `shot_counts`, `superclass` and `extra_info`."""
        out = super().describe()
        if self.shot_counts is not None:
            out["shot_counts"] = list(self.shot_counts)
        if self.superclass is not None:
            out["superclass"] = list(self.superclass)
        out.update(self.extra_info)
        return out


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return super().find_class(module, name)


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_pickle(path: Path | str) -> dict[str, Any]:
    """One CIFAR python-version pickle as a dict with `str` keys (bytes keys are decoded)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise UserError(f"cannot read CIFAR-100 file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # any unpickling failure: not a CIFAR pickle
        raise UserError(f"corrupt CIFAR-100 file {path}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise UserError(f"corrupt CIFAR-100 file {path}: expected a dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def data_dir(root: Path | str) -> Path:
    """The folder holding train/test/meta: `<root>/cifar-100-python`, or `root` itself if it holds them."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    if folder.is_dir():
        return folder
    if all((root / name).is_file() for name in FILES):
        return root
    if not root.is_dir():
        raise UserError(f"CIFAR-100 root {root} not found: {LAYOUT}")
    raise UserError(f"CIFAR-100 folder {folder} not found: {LAYOUT}")


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(f"CIFAR-100 file {path} not found: {LAYOUT}")
    return path


@functools.lru_cache(maxsize=4)
def _load_split_cached(
    path: str, mtime_ns: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d = read_cifar_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise UserError(f"corrupt CIFAR-100 file {path}: no {key!r} entry (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    n = len(d["fine_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise UserError(
            f"corrupt CIFAR-100 file {path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    if len(data) != n:
        raise UserError(f"corrupt CIFAR-100 file {path}: {len(data)} images but {n} fine_labels")
    # Channel-first rows -> (N, 32, 32, 3), made contiguous once so every subset copy is cheap.
    images = np.ascontiguousarray(data.reshape((n, *IMAGE_SHAPE)).transpose(0, 2, 3, 1))
    fine = np.asarray(d["fine_labels"], dtype=np.int64)
    coarse = np.asarray(d["coarse_labels"], dtype=np.int64) if "coarse_labels" in d else None
    if coarse is not None and len(coarse) != n:
        raise UserError(f"corrupt CIFAR-100 file {path}: {len(coarse)} coarse_labels for {n} images")
    for arr in (images, fine, coarse):
        if arr is not None:
            arr.flags.writeable = False  # shared between callers through the cache
    return images, fine, coarse


def load_arrays(root: Path | str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images uint8 (N, 32, 32, 3), fine labels int64 (N,), coarse labels or None) of `train` / `test`.

    Decoded arrays are cached per file (keyed by path, mtime and size) and read-only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-100 has splits train and test, not {split!r}")
    path = _file(data_dir(root), split)
    st = path.stat()
    return _load_split_cached(str(path), st.st_mtime_ns, st.st_size)


def load_meta(root: Path | str) -> tuple[list[str], list[str] | None]:
    """(fine class names, coarse class names or None) from the `meta` pickle."""
    path = _file(data_dir(root), "meta")
    d = read_cifar_pickle(path)
    if "fine_label_names" not in d:
        raise UserError(f"corrupt CIFAR-100 file {path}: no 'fine_label_names' entry (keys: {sorted(d)})")
    fine = [_text(x) for x in d["fine_label_names"]]
    coarse = [_text(x) for x in d["coarse_label_names"]] if "coarse_label_names" in d else None
    return fine, coarse


def cifar_lt_indices(
    labels: np.ndarray | Sequence[int],
    imbalance_ratio: float,
    img_max: int | None = None,
    seed: int = 0,
    num_classes: int = 100,
) -> np.ndarray:
    """Sorted indices into `labels` of LDAM-DRW's long-tailed subset (`imbalance_cifar.py`).

    LDAM: `np.random.seed(rand_number)`; img_max = int(len(data) / cls_num) (500 for CIFAR-100);
    imb_type 'exp': n_i = int(img_max * imb_factor ** (i / (cls_num - 1.0))) with imb_factor = 1/r;
    then for each class of np.unique(targets) in ascending order: idx = np.where(targets == c)[0],
    np.random.shuffle(idx), keep idx[:n_c]. Here `img_max` defaults to the same int(len / C), the
    generator is a private RandomState(seed) (same draws, global state untouched), and the result is
    sorted (LDAM concatenates per class; the set is the same).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if img_max is None:
        img_max = int(len(labels) / num_classes)
    return longtail_indices(labels, int(img_max), float(imbalance_ratio), int(seed), num_classes=num_classes)


def superclass_map(fine: np.ndarray, coarse: np.ndarray, num_classes: int) -> list[int]:
    """superclass[c] = the coarse label every image of fine class c has (UserError if inconsistent)."""
    out: list[int] = []
    for c in range(num_classes):
        values = np.unique(coarse[fine == c])
        if len(values) != 1:
            raise UserError(
                f"CIFAR-100 fine class {c} has coarse labels {values.tolist()}: expected exactly one"
            )
        out.append(int(values[0]))
    return out


def load_cifar100_lt(dataset: Cifar100Lt) -> ShotReferenceDataset:
    """CIFAR-100-LT as a ShotReferenceDataset with splits `train` (long-tailed) and `test` (balanced).

    Manifest keys: `root` (required), `imbalance_ratio` (100; 1 = the full balanced training set),
    `n_max` (LDAM's img_max; default int(len(train) / 100) = 500), `seed` (0, LDAM's rand_number),
    `test_limit` (None = all 10,000; else a seeded class-balanced subsample), `shot_reference_ratio`
    (100: many/medium/few from the counts of that ratio; null = from this split's own counts).
    """
    if not dataset.root:
        raise UserError(f"dataset kind cifar100_lt: `root` is required ({LAYOUT})")
    root = Path(dataset.root).expanduser()
    ref_ratio = float(dataset.shot_reference_ratio) if dataset.shot_reference_ratio is not None else None
    class_names, _ = load_meta(root)
    num_classes = len(class_names)
    train_images, train_labels, train_coarse = load_arrays(root, "train")
    test_images, test_labels, _ = load_arrays(root, "test")
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(
                f"CIFAR-100 {split} labels range {labels.min()}..{labels.max()}, outside the "
                f"{num_classes} classes of {data_dir(root) / 'meta'}"
            )
    missing = sorted(set(range(num_classes)) - set(np.unique(train_labels).tolist()))
    if missing:
        # LDAM pairs the k-th class present with the k-th count: a missing class would shift them all.
        raise UserError(
            f"CIFAR-100 train split has no images of classes {missing[:10]}: cannot apply the LT rule"
        )
    ratio = float(dataset.imbalance_ratio)
    n_max = dataset.n_max or int(len(train_labels) / num_classes)
    seed = dataset.seed
    train_rows = cifar_lt_indices(train_labels, ratio, int(n_max), seed, num_classes)
    test_rows = np.arange(len(test_labels), dtype=np.int64)
    if dataset.test_limit is not None:
        per_class = dataset.test_limit // num_classes
        if per_class < 1:
            raise UserError(f"test_limit {dataset.test_limit} is below one image per class ({num_classes})")
        test_rows = balanced_subsample(test_labels, per_class, seed)
    shot_counts = longtail_counts(num_classes, int(n_max), ref_ratio) if ref_ratio is not None else None
    superclass = superclass_map(train_labels, train_coarse, num_classes) if train_coarse is not None else None

    def split(name: str, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> DatasetSplit:
        return DatasetSplit(
            [make_uid(UID_PREFIX, name, int(i)) for i in rows],
            labels[rows],
            pixels=images[rows],
            source_index=rows,
        )

    return ShotReferenceDataset(
        name=dataset.name or "cifar100_lt",
        class_names=class_names,
        splits={
            "train": split("train", train_images, train_labels, train_rows),
            "test": split("test", test_images, test_labels, test_rows),
        },
        spec=dataset,
        shot=dataset.shot_thresholds,
        shot_counts=shot_counts,
        superclass=superclass,
        extra_info={"shot_reference_ratio": ref_ratio},
    )
