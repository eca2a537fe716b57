"""Downstream datasets, loaded from a validated manifest entry (`manifests/datasets/<name>.yaml`,
read into its kind's model by `schema.validate_dataset`, which holds every key's default).

Kinds and the keys read here (besides `name`, `kind`, `shot_thresholds`):

- `fashion_mnist`: balanced Fashion-MNIST. `root`, `test_limit`, `seed`.
- `fashion_mnist_lt`: Fashion-MNIST-LT, the CIFAR-LT rule on the training set; test = balanced t10k.
  `root`, `n_max` (500), `imbalance_ratio` (100), `seed` (0), `test_limit` (None = all 10,000).
- `fashion_mnist_lt` also takes `val_per_class` / `val_seed`: a balanced val split from the training
  images outside the LT subset; the world pool then excludes it.
- `imagefolder`: `root/<split>/<class>/<image>`. `root`, `imbalance_ratio` (None), `n_max`, `seed`,
  `val_per_class` (a seeded per-class hold-out of train when there is no `val/`), world pool from
  `root/world/<class>/` or else the training images the LT rule left out.
- `sklearn_digits_lt`: scikit-learn's 8x8 digits, long-tailed, balanced val and test, and a world pool
  (`sklearn_digits.py`). `n_max` (50), `imbalance_ratio` (10), `seed`, `test_per_class` (50),
  `val_per_class` (30).
- `cifar100_lt`: CIFAR-100-LT from `root/cifar-100-python/` (LDAM-DRW's picks; `cifar.py`). `root`,
  `imbalance_ratio` (100), `n_max` (500), `seed` (0), `test_limit`, `shot_reference_ratio` (100).
- `imagenet_lt`: ImageNet-LT list files (`imagenet_lt.py`). `root`, `lists`, `num_classes` (1000).
- `mini_webvision`: first 50 WebVision classes, DivideMix conventions (`webvision.py`). `root`,
  `num_classes` (50), `imagenet_val_root`, `imagenet_val_list`.
- `cifar100_lt` and `mini_webvision` have no val split of their own: `val_per_class` or `val_fraction`
  holds one out of the training split (seeded, every class keeps one image), for experiments that
  select on val; without them the training split is the paper's, whole. ImageNet-LT uses its
  `ImageNet_LT_val.txt`.

Any kind also takes `class_names`: the display names used in captions and reports, a list in label
order or a mapping {folder or default name: display name} (e.g. `{digit_3: three}`).

Any kind also takes `label_noise: {kind: symmetric|asymmetric, rate, seed, mapping}`: the train
split's labels are replaced by noisy ones, the clean ones kept (`label_noise.py`).

`test_limit` keeps a seeded, class-balanced subsample of at most that many test images
(test_limit // num_classes per class). `shot_thresholds` is a mapping with any of `many` (100),
`few` (20), `scale` (False), `reference_max` (None); see `longtail.shot_split`.

A manifest also carries keys of other stages (`shard_size`, `neighbors`, ...), which are ignored
here; an unknown key (`imbalance_ration`) is refused by the schema rather than silently replaced by a
default.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets import (
    cifar,
    fashion_mnist,
    imagefolder,
    imagenet_lt,
    label_noise,
    sklearn_digits,
    webvision,
)
from retformer.kb_builder.datasets.base import (
    DatasetSplit,
    DownstreamDataset,
    hold_out_val,
    make_uid,
    safe_token,
)
from retformer.kb_builder.datasets.label_noise import apply_label_noise
from retformer.kb_builder.datasets.longtail import (
    longtail_counts,
    longtail_indices,
    shot_split,
    shot_thresholds,
)
from retformer.kb_builder.datasets.schema import (
    KINDS,
    Cifar100Lt,
    DatasetManifest,
    FashionMnist,
    FashionMnistLt,
    HeldOutVal,
    ImageFolder,
    ImagenetLt,
    MiniWebvision,
    SklearnDigitsLt,
    validate_dataset,
)

__all__ = [
    "DatasetManifest",
    "DatasetSplit",
    "DownstreamDataset",
    "KINDS",
    "apply_label_noise",
    "fashion_mnist_world_pool",
    "load_dataset",
    "longtail_counts",
    "longtail_indices",
    "make_uid",
    "safe_token",
    "shot_split",
    "shot_thresholds",
    "validate_dataset",
]


def load_dataset(dataset: DatasetManifest) -> DownstreamDataset:
    """The DownstreamDataset a validated manifest describes (see the module docstring for the kinds)."""
    if isinstance(dataset, FashionMnist):  # and FashionMnistLt
        loaded = fashion_mnist.load_fashion_mnist(dataset, long_tailed=isinstance(dataset, FashionMnistLt))
    elif isinstance(dataset, Cifar100Lt):
        loaded = cifar.load_cifar100_lt(dataset)
    elif isinstance(dataset, ImagenetLt):
        loaded = imagenet_lt.load_imagenet_lt(dataset)
    elif isinstance(dataset, MiniWebvision):
        loaded = webvision.load_mini_webvision(dataset)
    elif isinstance(dataset, SklearnDigitsLt):
        loaded = sklearn_digits.load_sklearn_digits_lt(dataset, None)
    elif isinstance(dataset, ImageFolder):
        loaded = imagefolder.load_imagefolder(dataset)
    else:
        raise TypeError(f"no loader for dataset kind {dataset.kind!r}")
    if isinstance(dataset, HeldOutVal) and "val" not in loaded.splits:
        if dataset.val_per_class is not None or dataset.val_fraction:
            seed, per_class, fraction = dataset.seed + 1, dataset.val_per_class, dataset.val_fraction
            hold_out_val(loaded.splits, loaded.notes, loaded.name, seed, per_class, fraction)
    if dataset.class_names is not None:
        loaded.class_names = rename_classes(loaded.class_names, dataset.class_names, str(dataset.name))
    if dataset.label_noise is not None:
        loaded = label_noise.add_label_noise(loaded, dataset.label_noise)
    return loaded


def rename_classes(names: list[str], mapping: Any, label: str) -> list[str]:
    """Display names from a manifest's `class_names`: a list (label order, same length) or a mapping
    {current name: display name} (names it does not mention stay)."""
    if isinstance(mapping, list):
        if len(mapping) != len(names) or not all(isinstance(n, str) and n for n in mapping):
            raise UserError(
                f"dataset {label}: class_names lists {len(mapping)} names for {len(names)} classes"
            )
        return list(mapping)
    if isinstance(mapping, dict):
        unknown = sorted(set(map(str, mapping)) - set(names))
        if unknown:
            raise UserError(
                f"dataset {label}: class_names renames unknown classes {unknown} (classes: {names})"
            )
        return [str(mapping.get(n, n)) for n in names]
    raise UserError(f"dataset {label}: class_names must be a list or mapping, not {type(mapping).__name__}")


def fashion_mnist_world_pool(dataset: DatasetManifest) -> np.ndarray:
    """Sorted Fashion-MNIST training indices NOT in the dataset's training split (the demo KB's pool)."""
    if not isinstance(dataset, FashionMnist):
        raise UserError(f"the world pool is defined for Fashion-MNIST datasets, not kind {dataset.kind!r}")
    return fashion_mnist.world_pool(dataset)
