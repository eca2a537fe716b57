"""scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`): 1,797 real 8x8 images
(pixel values 0..16, stored here as uint8 0..255), 10 classes, ~180 per class. No download: the data
ships inside the scikit-learn wheel.

`sklearn_digits_lt` cuts it into disjoint parts, all seeded:

1. test: `test_per_class` (50) images per class, balanced;
2. val: `val_per_class` (30) per class from the rest, balanced;
3. train: the CIFAR-LT rule (`longtail.py`, `n_max` 50, `imbalance_ratio` 10) on what is left;
4. pool: everything else (798 images with the defaults), the "world" a KB can be built from (`kb_sources.py`).

Uids name the source image: `digits-all-0042` is row 42 of load_digits() in every part and KB.
"""

from __future__ import annotations

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset, make_uid
from retformer.kb_builder.datasets.fashion_mnist import balanced_subsample
from retformer.kb_builder.datasets.longtail import longtail_indices
from retformer.kb_builder.datasets.schema import SklearnDigitsLt

UID_PREFIX = "digits"
DEFAULT_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) scaled from 0..16 to 0..255, labels int64 (1797,))."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise UserError(
            "dataset kind sklearn_digits_lt needs scikit-learn (pip install scikit-learn)"
        ) from exc
    d = load_digits()
    images = np.rint(np.asarray(d.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, np.asarray(d.target, dtype=np.int64)


def part_indices(dataset: SklearnDigitsLt, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted row indices of the four disjoint parts: test, val, train (long-tailed) and pool."""
    seed = dataset.seed
    rows = np.arange(len(labels), dtype=np.int64)
    test = rows[balanced_subsample(labels, dataset.test_per_class, seed)]
    rest = np.setdiff1d(rows, test, assume_unique=True)
    val = rest[balanced_subsample(labels[rest], dataset.val_per_class, seed + 1)]
    rest = np.setdiff1d(rest, val, assume_unique=True)
    train = rest[
        longtail_indices(
            labels[rest],
            dataset.n_max,
            float(dataset.imbalance_ratio),
            seed + 2,
            num_classes=10,
        )
    ]
    pool = np.setdiff1d(rest, train, assume_unique=True)
    return {"train": train, "val": val, "test": test, "pool": pool}


def load_sklearn_digits_lt(dataset: SklearnDigitsLt, class_names: list[str] | None) -> DownstreamDataset:
    """The long-tailed digits dataset of `dataset` (see the module docstring for the keys)."""
    images, labels = load_arrays()
    parts = part_indices(dataset, labels)
    seed = dataset.seed

    def split(rows: np.ndarray) -> DatasetSplit:
        return DatasetSplit(
            [make_uid(UID_PREFIX, "all", int(i), width=4) for i in rows],
            labels[rows],
            pixels=images[rows],
            source_index=rows,
        )

    return DownstreamDataset(
        name=dataset.name or "digits_lt",
        class_names=list(class_names or DEFAULT_CLASS_NAMES),
        splits={s: split(parts[s]) for s in ("train", "val", "test")},
        spec=dataset,
        shot=dataset.shot_thresholds,
        pool=split(parts["pool"]),
        notes={
            "test": f"{dataset.test_per_class} per class of the 1,797 images, balanced (seed {seed})",
            "val": (
                f"{dataset.val_per_class} per class of the images outside test, balanced (seed {seed + 1})"
            ),
            "pool": "every image in none of train / val / test",
        },
    )
