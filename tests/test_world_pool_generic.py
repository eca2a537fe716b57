"""Validation splits and the generic world KB: Fashion-MNIST-LT val, sklearn digits LT, imagefolder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import read_shard
from retformer.kb_builder.datasets import fashion_mnist as fm
from retformer.kb_builder.kb_sources import build_kb_shards, source_from_mapping, world_samples
from tests.helpers import fashion_mnist_world_pool, load_dataset

DIGITS = {
    "name": "digits_lt",
    "kind": "sklearn_digits_lt",
    "n_max": 50,
    "imbalance_ratio": 10,
    "test_per_class": 50,
    "val_per_class": 30,
    "class_names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}


def _uid_sets(ds) -> list[set[str]]:
    return [set(s.uids) for s in ds.splits.values()] + [set(ds.pool.uids)]


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 200), ("t10k", 5)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        fm.write_idx(
            root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28), np.uint8)
        )
        fm.write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_fmnist_val_is_balanced_and_outside_train_and_world_pool(fake_fmnist):
    """val_per_class gives a balanced val split disjoint from the LT train split and the world pool;
    train, val and pool partition the 2,000 training images; without the key there is no val split."""
    spec = {"kind": "fashion_mnist_lt", "root": str(fake_fmnist), "n_max": 100, "imbalance_ratio": 10}
    ds = load_dataset({**spec, "val_per_class": 20})
    assert np.bincount(ds.splits["val"].labels).tolist() == [20] * 10
    train, val, pool = ds.train.source_index, ds.splits["val"].source_index, fashion_mnist_world_pool(ds.spec)
    assert not set(train) & set(val) and not set(val) & set(pool) and not set(train) & set(pool)
    assert len(train) + len(val) + len(pool) == 2000
    np.testing.assert_array_equal(ds.pool.source_index, pool)
    uids, *_ = world_samples(source_from_mapping({"kind": "world", "dataset": ds.name, "size": None}), ds)
    assert not set(uids) & (set(ds.train.uids) | set(ds.splits["val"].uids))
    assert "val" not in load_dataset(spec).splits


def test_digits_parts_are_disjoint_long_tailed_and_seeded():
    """Digits LT: balanced test and val, train follows the CIFAR-LT counts, the four parts partition the
    1,797 images, and the same spec gives the same uids (another seed different ones)."""
    ds = load_dataset(DIGITS)
    assert ds.train_class_counts() == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert np.bincount(ds.splits["test"].labels).tolist() == [50] * 10
    assert np.bincount(ds.splits["val"].labels).tolist() == [30] * 10
    sets = _uid_sets(ds)
    assert sum(map(len, sets)) == len(set().union(*sets)) == 1797
    assert load_dataset(DIGITS).splits["val"].uids == ds.splits["val"].uids
    assert load_dataset({**DIGITS, "seed": 1}).splits["val"].uids != ds.splits["val"].uids
    assert ds.train.pixels.dtype == np.uint8 and ds.train.pixels.max() == 255


def test_digits_world_kb_uses_manifest_templates_and_class_names(tmp_path):
    """The generic world builder captions pool images with the manifest's templates and display names,
    20% naming a wrong class, and writes none of train / val / test."""
    ds = load_dataset(DIGITS)
    spec = {"kind": "world", "templates": ["a handwritten {name}."], "wrong_caption_fraction": 0.2}
    record = build_kb_shards(source_from_mapping({**spec, "dataset": ds.name}), ds, tmp_path, shard_size=500)
    recs = [r for p in record["shards"] for r in read_shard(p)]
    assert len(recs) == len(ds.pool) and {r["uid"] for r in recs} == set(ds.pool.uids)
    assert all(r["caption"] == f"a handwritten {ds.class_names[r['label']]}." for r in recs)
    wrong = np.mean([r["label"] != r["meta"]["true_label"] for r in recs])
    assert wrong == pytest.approx(0.2, abs=1 / len(recs))
    true = {u: int(y) for u, y in zip(ds.pool.uids, ds.pool.labels, strict=True)}
    assert all(r["meta"]["true_label"] == true[r["uid"]] for r in recs)


def _tree(root, splits, per_class):
    for split in splits:
        for c in ("digit_0", "digit_1"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((4, 4), i * 10 + len(c), np.uint8)).save(d / f"{i:03d}.png")


def test_imagefolder_val_holdout_world_dir_and_class_names(tmp_path):
    """Imagefolder: a seeded per-class val hold-out when there is no val/; world/ becomes the pool;
    class_names renames folder names for captions; a mapping naming an unknown class is refused."""
    _tree(tmp_path, ("train", "test", "world"), 12)
    spec = {
        "kind": "imagefolder",
        "root": str(tmp_path),
        "val_per_class": 3,
        "class_names": {"digit_0": "zero", "digit_1": "one"},
    }
    ds = load_dataset(spec)
    assert ds.class_names == ["zero", "one"]
    assert np.bincount(ds.splits["val"].labels).tolist() == [3, 3] and len(ds.train) == 18
    assert not set(ds.train.uids) & set(ds.splits["val"].uids) and len(ds.pool) == 24
    assert "hold-out" in ds.notes["val"]
    uids, captions, *_ = world_samples(
        source_from_mapping(
            {"kind": "world", "dataset": ds.name, "templates": ["{name}"], "wrong_caption_fraction": 0}
        ),
        ds,
    )
    assert set(uids) == set(ds.pool.uids) and set(captions) == {"zero", "one"}
    with pytest.raises(UserError, match="unknown classes"):
        load_dataset({**spec, "class_names": {"digit_7": "seven"}})


def test_imagefolder_pool_defaults_to_long_tail_leftovers(tmp_path):
    """Without world/, the pool is the training images the long-tailed cut dropped (disjoint from train)."""
    _tree(tmp_path, ("train", "test"), 12)
    spec = {"kind": "imagefolder", "root": str(tmp_path), "imbalance_ratio": 4, "val_fraction": 0}
    ds = load_dataset(spec)
    assert ds.train_class_counts() == [12, 3] and "val" not in ds.splits
    assert len(ds.pool) == 9 and not set(ds.pool.uids) & set(ds.train.uids)


def test_imagefolder_default_val_is_a_fraction_that_never_empties_a_class(tmp_path):
    """A folder with no val/ and no val_per_class still gets a val split (every selection needs one):
    20% of each class, seeded, disjoint from train; a class of one image keeps it for training."""
    _tree(tmp_path, ("train", "test"), 10)
    (tmp_path / "train" / "digit_2").mkdir()
    Image.new("L", (8, 8), 3).save(tmp_path / "train" / "digit_2" / "only.png")
    ds = load_dataset({"kind": "imagefolder", "root": str(tmp_path)})
    assert np.bincount(ds.splits["val"].labels, minlength=3).tolist() == [2, 2, 0]
    assert ds.train_class_counts() == [8, 8, 1]
    assert not set(ds.train.uids) & set(ds.splits["val"].uids)
    assert "20% of each class" in ds.notes["val"]
    again = load_dataset({"kind": "imagefolder", "root": str(tmp_path)})
    assert again.splits["val"].uids == ds.splits["val"].uids
    with pytest.raises(UserError, match="val_fraction: input should be less than 1"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path), "val_fraction": 1.5})


def test_label_noise_keeps_the_pool_val_and_notes(tmp_path):
    """Label noise replaces train labels only: the digits' val split, world pool and split notes are those
    of the clean dataset, so a world KB can still be built from a noisy dataset."""
    clean = load_dataset(DIGITS)
    noisy = load_dataset({**DIGITS, "label_noise": {"kind": "symmetric", "rate": 0.4, "seed": 0}})
    assert (noisy.train.labels != clean.train.labels).any()
    assert noisy.pool is not None and noisy.pool.uids == clean.pool.uids
    np.testing.assert_array_equal(noisy.splits["val"].labels, clean.splits["val"].labels)
    assert noisy.notes == clean.notes and noisy.describe()["world_pool_size"] == len(clean.pool)
    uids, *_ = world_samples(source_from_mapping({"kind": "world", "dataset": noisy.name, "size": 50}), noisy)
    assert set(uids) <= set(clean.pool.uids)
