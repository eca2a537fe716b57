"""Synthetic label noise on a training split: symmetric or asymmetric, stratified per class.

Conventions (fixed here, so results are comparable between runs):

- Stratified: in every class c with n_c training items, exactly round(rate * n_c) items (half rounds
  up) are chosen uniformly without replacement and relabelled, so the realised rate is `rate` in every
  class up to rounding -- tail classes included. (DivideMix picks int(rate * N) items over the whole
  set instead; the expected per-class rate is the same.)
- symmetric: a chosen item gets a uniformly random OTHER class (never its own), so `rate` is the
  fraction of wrong labels. The "any class" convention (DivideMix's `sym`, where a draw may return
  the true class) corresponds to rate_other = rate_any * (C - 1) / C.
- asymmetric: a chosen item of class c gets the fixed confusable class T(c):
  - with a superclass map (CIFAR-100's coarse labels, which the cifar100_lt loader provides): the
    next class of the same superclass, in ascending class-id order, cyclically (the "flip to the next
    class within the superclass" convention). Note that the widely copied code of Patrini et al.
    (2017) groups fine ids in contiguous blocks of five (0-4, 5-9, ...) which are not CIFAR-100's
    real superclasses; pass `mapping` to reproduce it;
  - without one: T(c) = (c + 1) mod C;
  - or an explicit `mapping` (list of C class ids). A class with T(c) = c is never flipped.

A manifest says `label_noise: {kind: symmetric, rate: 0.4, seed: 0}` (and optionally `mapping`);
`load_dataset` then replaces the train split's labels. The split keeps `clean_labels` and
`noise_mask` for analysis, the many/medium/few groups stay those of the clean counts, and
`describe()` records the realised rate. Validation and test splits are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset
from retformer.kb_builder.datasets.cifar import ShotReferenceDataset
from retformer.kb_builder.datasets.schema import LabelNoise

KINDS = ("symmetric", "asymmetric")


class NoisyLabelSplit(DatasetSplit):
    """A DatasetSplit whose `labels` are noisy; `clean_labels` are the originals (kept through subset)."""

    def __init__(
        self,
        uids: Sequence[str],
        labels: np.ndarray | Sequence[int],
        *,
        clean_labels: np.ndarray | Sequence[int],
        pixels: np.ndarray | None = None,
        paths: Sequence[Path | str] | None = None,
        source_index: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        super().__init__(uids, labels, pixels=pixels, paths=paths, source_index=source_index)
        self.clean_labels: np.ndarray = np.asarray(clean_labels, dtype=np.int64)
        if len(self.clean_labels) != len(self.labels):
            raise ValueError(f"{len(self.clean_labels)} clean labels for {len(self.labels)} items")

    @property
    def noise_mask(self) -> np.ndarray:
        """True where the label was changed."""
        return self.labels != self.clean_labels

    def subset(self, rows: np.ndarray | Sequence[int]) -> NoisyLabelSplit:
        """The split restricted to `rows`, clean labels included."""
        rows = np.asarray(rows, dtype=np.int64)
        base = super().subset(rows)
        return NoisyLabelSplit(
            base.uids,
            base.labels,
            clean_labels=self.clean_labels[rows],
            pixels=base.pixels,
            paths=base.paths,
            source_index=base.source_index,
        )


def asymmetric_targets(num_classes: int, superclass: Sequence[int] | None = None) -> np.ndarray:
    """T(c) for every class: next class within c's superclass (cyclic, by class id), else (c + 1) mod C."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if superclass is None:
        return (np.arange(num_classes, dtype=np.int64) + 1) % num_classes
    superclass = np.asarray(superclass, dtype=np.int64)
    if len(superclass) != num_classes:
        raise ValueError(f"superclass map has {len(superclass)} entries for {num_classes} classes")
    targets = np.arange(num_classes, dtype=np.int64)
    for group in np.unique(superclass):
        members = np.flatnonzero(superclass == group)  # ascending class ids
        targets[members] = np.roll(members, -1)
    return targets


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"noise rate must be a number in [0, 1], got {rate!r}")
    return float(rate)


def apply_label_noise(
    labels: np.ndarray | Sequence[int],
    num_classes: int,
    kind: str = "symmetric",
    rate: float = 0.0,
    seed: int = 0,
    *,
    superclass: Sequence[int] | None = None,
    mapping: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels int64, mask of changed items) for `labels` (see the module docstring).

    Deterministic per `seed` (a private np.random.default_rng). rate = 0 returns the labels unchanged.
    `mapping` (asymmetric only) overrides the superclass / next-class rule.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rate = _check_rate(rate)
    if kind not in KINDS:
        raise ValueError(f"noise kind must be one of {KINDS}, got {kind!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    if kind == "symmetric" and num_classes < 2 and rate > 0:
        raise ValueError("symmetric noise needs at least two classes")
    if mapping is not None:
        if kind != "asymmetric":
            raise ValueError("a noise mapping applies to asymmetric noise only")
        targets = np.asarray(mapping, dtype=np.int64)
        if targets.shape != (num_classes,) or targets.min() < 0 or targets.max() >= num_classes:
            raise ValueError(f"mapping must list {num_classes} class ids in 0..{num_classes - 1}")
    else:
        targets = asymmetric_targets(num_classes, superclass)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(rate * len(idx) + 0.5))
        if k == 0:
            continue
        chosen = rng.permutation(idx)[:k]
        if kind == "symmetric":
            # c + U{1..C-1} mod C: uniform over the C-1 other classes.
            noisy[chosen] = (c + rng.integers(1, num_classes, size=k)) % num_classes
        else:
            noisy[chosen] = targets[c]
    return noisy, noisy != labels


def add_label_noise(dataset: DownstreamDataset, noise: LabelNoise) -> ShotReferenceDataset:
    """`dataset` with its train split's labels replaced by noisy ones (other splits unchanged).

    The new train split is a NoisyLabelSplit (`clean_labels`, `noise_mask`). Many/medium/few stay
    those of the dataset before noise (its reference counts, else its clean training counts).
    `describe()` gains `label_noise` (the config plus the realised number and rate of changed labels)
    and `clean_train_class_counts`.
    """
    label = f"dataset {dataset.name!r}"
    if noise.mapping is not None and noise.kind != "asymmetric":
        raise UserError(f"{label}: label_noise.mapping must be a list of class ids, with kind asymmetric")
    train = dataset.train
    superclass = getattr(dataset, "superclass", None)
    try:
        noisy, mask = apply_label_noise(
            train.labels,
            dataset.num_classes,
            noise.kind,
            noise.rate,
            noise.seed,
            superclass=superclass,
            mapping=noise.mapping,
        )
    except ValueError as exc:
        raise UserError(f"dataset {dataset.name!r}: label_noise: {exc}") from None
    clean = getattr(train, "clean_labels", train.labels)  # noise on noise keeps the first clean labels
    mask = noisy != clean
    new_train = NoisyLabelSplit(
        train.uids,
        noisy,
        clean_labels=clean,
        pixels=train.pixels,
        paths=train.paths,
        source_index=train.source_index,
    )
    ref = getattr(dataset, "shot_counts", None)
    extra = dict(getattr(dataset, "extra_info", {}))
    extra["label_noise"] = {
        **{k: v for k, v in noise.model_dump().items() if v is not None},
        "noisy_labels": int(mask.sum()),
        "realised_rate": float(mask.mean()) if mask.size else 0.0,
    }
    extra["clean_train_class_counts"] = np.bincount(clean, minlength=dataset.num_classes).astype(int).tolist()
    return ShotReferenceDataset(
        name=dataset.name,
        class_names=list(dataset.class_names),
        splits={**dataset.splits, "train": new_train},
        spec=dataset.spec,
        shot=dataset.shot,
        shot_counts=list(ref) if ref is not None else dataset.train_class_counts(),
        superclass=superclass,
        extra_info=extra,
        # Noise touches train only: the pool (and a world KB built from it) and the split notes stay.
        pool=dataset.pool,
        notes=dict(dataset.notes),
    )
