"""Long-tailed subsets and many/medium/few-shot splits, with the CIFAR-LT conventions.

The rule is LDAM-DRW's `imbalance_cifar.py` (Cao et al. 2019): class i of C keeps
n_i = int(n_max * (1/r) ** (i / (C - 1))) images, classes in label order, so class 0 keeps n_max
and class C-1 keeps n_max / r. The images kept are picked per class by seeding NumPy's legacy
generator once and shuffling each class's index list in turn; this module does the same with a
private `np.random.RandomState(seed)`, which draws the identical sequence without touching NumPy's
global state. For CIFAR-100 (n_max = 500) this gives 10,847 / 12,608 / 19,573 images at
r = 100 / 50 / 10.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# CIFAR-100-LT's largest class: the size the 100 / 20 shot thresholds were defined for.
CIFAR_REFERENCE_MAX = 500


def longtail_counts(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """Images kept per class, in label order: n_i = int(n_max * (1/ratio) ** (i / (C - 1)))."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1 (largest / smallest class), got {ratio}")
    if num_classes == 1:
        return [int(n_max)]
    factor = 1.0 / ratio  # LDAM passes imb_factor = 0.01 for r = 100: the same float as 1 / 100
    return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def longtail_indices(
    labels: np.ndarray | Sequence[int],
    n_max: int,
    ratio: float,
    seed: int = 0,
    num_classes: int | None = None,
) -> np.ndarray:
    """Indices into `labels` of the long-tailed subset, sorted ascending.

    For each class c in label order: shuffle the indices of class c with one
    `np.random.RandomState(seed)` (shared across classes, as LDAM-DRW's global `np.random.seed`)
    and keep the first n_c of `longtail_counts`. A class with fewer than n_c images keeps all of
    them (LDAM does the same silently). `num_classes` defaults to max(label) + 1; a class without
    images still consumes its n_c slot in the rule but draws nothing from the generator.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if num_classes == 0:
        return np.zeros(0, dtype=np.int64)
    counts = longtail_counts(num_classes, n_max, ratio)
    rng = np.random.RandomState(seed)
    picked = []
    # LDAM iterates over np.unique(targets): classes that occur, in ascending order.
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        picked.append(idx[: counts[c]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def shot_thresholds(
    counts: Sequence[int],
    many: float = 100,
    few: float = 20,
    reference_max: int | None = None,
    scale: bool = False,
) -> dict[str, float]:
    """The many / few thresholds `shot_split` applies, after optional scaling.

    Scaling rule: the conventional thresholds (> 100 many, < 20 few) were set for CIFAR-100-LT,
    whose largest class has 500 images. A dataset whose largest class is much smaller (or larger)
    would put nearly every class in one group, so with `scale=True` -- or whenever `reference_max`
    is given -- both thresholds are multiplied by n_ref / 500, where n_ref is `reference_max` when
    given and otherwise max(counts). Without scaling the thresholds are used as given.
    """
    factor = 1.0
    if scale or reference_max is not None:
        n_ref = reference_max if reference_max is not None else (max(counts) if len(counts) else 0)
        if n_ref <= 0:
            raise ValueError("cannot scale shot thresholds: reference class size is 0")
        factor = n_ref / CIFAR_REFERENCE_MAX
    return {"many": many * factor, "few": few * factor, "scale_factor": factor}


def shot_split(
    counts: Sequence[int],
    many: float = 100,
    few: float = 20,
    reference_max: int | None = None,
    scale: bool = False,
) -> dict[str, list[int]]:
    """Group class ids by training-set size: `many` if count > many, `few` if count < few, else `medium`.

    So with the defaults 101 is many, 100 and 20 are medium, 19 is few. See `shot_thresholds` for
    the scaling rule (`scale=True` or `reference_max`). Note LIFT's convention for CIFAR-100-LT:
    the split of every imbalance ratio is defined by the r = 100 counts -- pass those counts here.
    """
    t = shot_thresholds(counts, many, few, reference_max, scale)
    out: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        if n > t["many"]:
            out["many"].append(c)
        elif n < t["few"]:
            out["few"].append(c)
        else:
            out["medium"].append(c)
    return out
