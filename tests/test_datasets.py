"""Datasets: the CIFAR-LT rule, shot splits, the IDX reader, Fashion-MNIST(-LT) and ImageFolder."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets import fashion_mnist as fm
from retformer.kb_builder.datasets import (
    longtail_counts,
    longtail_indices,
    shot_split,
    shot_thresholds,
)
from retformer.kb_builder.datasets.base import DatasetSplit, make_uid
from tests.helpers import load_dataset

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_real = pytest.mark.skipif(
    not (REAL_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {REAL_ROOT} (apt-get install dataset-fashion-mnist)",
)


def write_fake_fmnist(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST-shaped IDX tree (random 28x28 images, shuffled labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        fm.write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        fm.write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


# ---------------------------------------------------------------- long-tail rule


def test_longtail_counts_reproduce_cifar100_lt_sizes():
    """C=100, n_max=500 gives the published CIFAR-100-LT sizes for r = 100 / 50 / 10."""
    assert sum(longtail_counts(100, 500, 100)) == 10847
    assert sum(longtail_counts(100, 500, 50)) == 12608
    assert sum(longtail_counts(100, 500, 10)) == 19573
    counts = longtail_counts(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and counts == sorted(counts, reverse=True)


def test_longtail_counts_ten_classes():
    """C=10, n_max=500, r=100 (the demo's Fashion-MNIST-LT) gives the expected per-class list."""
    assert longtail_counts(10, 500, 100) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert longtail_counts(10, 500, 1) == [500] * 10
    assert longtail_counts(1, 7, 100) == [7]
    with pytest.raises(ValueError):
        longtail_counts(10, 500, 0.5)


def test_longtail_indices_deterministic_unique_and_counted():
    """Same seed, same subset; other seed, other subset; no index twice; per-class counts follow the rule."""
    labels = np.repeat(np.arange(10), 600)
    np.random.default_rng(1).shuffle(labels)
    a = longtail_indices(labels, 500, 100, seed=0)
    b = longtail_indices(labels, 500, 100, seed=0)
    c = longtail_indices(labels, 500, 100, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=10).tolist() == longtail_counts(10, 500, 100)
    assert np.bincount(labels[c], minlength=10).tolist() == longtail_counts(10, 500, 100)


def test_longtail_indices_match_ldam_global_seed_recipe_without_touching_global_state():
    """The subset equals LDAM-DRW's np.random.seed + per-class shuffle; the global RNG is untouched."""
    labels = np.repeat(np.arange(5), 40)
    np.random.default_rng(3).shuffle(labels)
    saved = np.random.get_state()
    try:
        np.random.seed(7)
        before = np.random.get_state()
        ours = longtail_indices(labels, 40, 10, seed=0)
        after = np.random.get_state()
        assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2] == after[2]
        # LDAM-DRW imbalance_cifar.py, gen_imbalanced_data:
        np.random.seed(0)
        picked = []
        for the_class, the_img_num in zip(np.unique(labels), longtail_counts(5, 40, 10), strict=True):
            idx = np.where(labels == the_class)[0]
            np.random.shuffle(idx)
            picked.append(idx[:the_img_num])
        np.testing.assert_array_equal(ours, np.sort(np.concatenate(picked)))
    finally:
        np.random.set_state(saved)


def test_longtail_indices_small_class_keeps_all():
    """A class with fewer images than its quota keeps all of them rather than failing."""
    labels = np.array([0] * 10 + [1] * 2)
    idx = longtail_indices(labels, 10, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 2]


# ---------------------------------------------------------------- shot split


def test_shot_split_boundaries():
    """> 100 is many, 20..100 is medium, < 20 is few: 101 many, 100 and 20 medium, 19 few."""
    split = shot_split([101, 100, 20, 19, 500, 1])
    assert split == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}


def test_shot_split_scale_option():
    """scale=True multiplies both thresholds by max(counts)/500; reference_max sets that max explicitly."""
    counts = [50, 11, 10, 2, 1]  # largest class 50 -> thresholds 10 and 2
    assert shot_split(counts) == {"many": [], "medium": [0], "few": [1, 2, 3, 4]}
    assert shot_split(counts, scale=True) == {"many": [0, 1], "medium": [2, 3], "few": [4]}
    t = shot_thresholds(counts, scale=True)
    assert (
        t["many"] == pytest.approx(10)
        and t["few"] == pytest.approx(2)
        and t["scale_factor"] == pytest.approx(0.1)
    )
    # An explicit reference (e.g. the r=100 counts' maximum) implies scaling by it.
    assert shot_split(counts, reference_max=1000) == {"many": [], "medium": [0], "few": [1, 2, 3, 4]}
    assert shot_thresholds(counts, reference_max=1000)["many"] == pytest.approx(200)


# ---------------------------------------------------------------- IDX reader


def _hand_written_idx(images: np.ndarray) -> bytes:
    """IDX bytes built with struct, independent of the module's writer."""
    n, h, w = images.shape
    return struct.pack(">BBBBIII", 0, 0, 0x08, 3, n, h, w) + images.tobytes()


def test_idx_reader_on_hand_written_files(tmp_path):
    """The parser decodes header + data of plain and gzipped IDX files written by hand, any file name."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _hand_written_idx(images)
    (tmp_path / "plain").write_bytes(raw)
    (tmp_path / "zipped.bin").write_bytes(gzip.compress(raw))
    for name in ("plain", "zipped.bin"):
        out = fm.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, images)
    labels = struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + np.array([1, -2, 70000], dtype=">i4").tobytes()
    (tmp_path / "ints").write_bytes(labels)
    assert fm.read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]


def test_idx_reader_rejects_corrupt_files(tmp_path):
    """Bad magic, truncated header, or data length disagreeing with the dims -> UserError naming the file."""
    images = np.zeros((2, 3, 4), dtype=np.uint8)
    raw = _hand_written_idx(images)
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(UserError, match="bad-magic.*magic"):
        fm.read_idx(bad)
    short = tmp_path / "short-data"
    short.write_bytes(raw[:-1])
    with pytest.raises(UserError, match="short-data"):
        fm.read_idx(short)
    header = tmp_path / "short-header"
    header.write_bytes(raw[:6])
    with pytest.raises(UserError, match="short-header"):
        fm.read_idx(header)


def test_missing_idx_file_names_file_directory_and_remedy(tmp_path):
    """A Fashion-MNIST root missing one file -> UserError naming the file, the directory and how to get it."""
    root = write_fake_fmnist(tmp_path / "fm", 3, 2)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as info:
        load_dataset({"kind": "fashion_mnist", "root": str(root)})
    msg = str(info.value)
    assert (
        "t10k-labels-idx1-ubyte" in msg
        and str(root) in msg
        and "apt-get install dataset-fashion-mnist" in msg
    )
    with pytest.raises(UserError, match="not found"):
        load_dataset({"kind": "fashion_mnist", "root": str(tmp_path / "nowhere")})


def test_corrupt_fmnist_file_is_a_user_error(tmp_path):
    """A corrupt IDX file inside a Fashion-MNIST root -> UserError naming that file."""
    root = write_fake_fmnist(tmp_path / "fm", 3, 2)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x99\x01garbage"))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        load_dataset({"kind": "fashion_mnist", "root": str(root)})


@needs_real
def test_idx_reader_on_debian_fashion_mnist():
    """The real Debian files decode to 60k/10k 28x28 uint8 images with 6,000/1,000 images per class."""
    images, labels = fm.load_arrays(REAL_ROOT, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    assert labels[0] == 9  # the first training image is an ankle boot
    test_images, test_labels = fm.load_arrays(REAL_ROOT, "test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- Fashion-MNIST datasets


def test_fashion_mnist_lt_on_fake_root(tmp_path):
    """fashion_mnist_lt: train follows the rule, stable uids; test is the whole balanced set; images are L."""
    root = write_fake_fmnist(tmp_path / "fm", 60, 5)
    spec = {
        "name": "fm_lt",
        "kind": "fashion_mnist_lt",
        "root": str(root),
        "n_max": 50,
        "imbalance_ratio": 10,
        "shot_thresholds": {"many": 20, "few": 8},
        "shard_size": 100,  # keys of other stages are ignored
        "neighbors": {"k": 8},
        "_manifest_path": "x.yaml",
    }
    ds = load_dataset(spec)
    assert ds.train_class_counts() == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert ds.shot_split() == {"many": [0, 1, 2, 3], "medium": [4, 5, 6, 7], "few": [8, 9]}  # > 20, < 8
    assert ds.name == "fm_lt" and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.train_class_counts() == longtail_counts(10, 50, 10)
    train = ds.train
    assert train.uids[0] == make_uid("fmnist", "train", int(train.source_index[0]))
    assert all(u.startswith("fmnist-train-") and len(u) == len("fmnist-train-000000") for u in train.uids)
    assert len(ds.splits["test"]) == 50 and ds.splits["test"].class_counts(10) == [5] * 10
    images, _ = fm.load_arrays(root, "train")
    img = train.image(3)
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), images[train.source_index[3]])
    again = load_dataset(spec)
    assert again.train.uids == train.uids
    other = load_dataset({**spec, "seed": 1})
    assert other.train.uids != train.uids
    desc = ds.describe()
    assert desc["train_class_counts"] == longtail_counts(10, 50, 10) and set(desc["shot_split"]) == {
        "many",
        "medium",
        "few",
    }


def test_fashion_mnist_balanced_and_test_subsample(tmp_path):
    """fashion_mnist keeps all training images; test_limit keeps a seeded class-balanced test subsample."""
    root = write_fake_fmnist(tmp_path / "fm", 6, 8)
    ds = load_dataset({"kind": "fashion_mnist", "root": str(root), "test_limit": 35})
    assert len(ds.train) == 60 and ds.train.uids[0] == "fmnist-train-000000"
    assert ds.splits["test"].class_counts(10) == [3] * 10


def test_load_dataset_rejects_unknown_kind_and_keys(tmp_path):
    """An unknown kind lists the known kinds; a misspelt key is refused instead of silently defaulted;
    keys of other stages (shard_size, neighbors) pass."""
    with pytest.raises(UserError, match="fashion_mnist, fashion_mnist_lt, imagefolder"):
        load_dataset({"kind": "cifar1000"})
    with pytest.raises(UserError, match="imbalance_ration.*did you mean 'imbalance_ratio'"):
        load_dataset({"kind": "fashion_mnist_lt", "imbalance_ration": 10})
    with pytest.raises(UserError, match="n_max.*does not apply"):
        load_dataset({"kind": "fashion_mnist", "n_max": 10})
    with pytest.raises(UserError, match="shot_thresholds"):
        load_dataset({"kind": "fashion_mnist_lt", "shot_thresholds": {"manny": 3}})
    with pytest.raises(UserError, match="imbalance_ratio"):
        load_dataset({"kind": "fashion_mnist_lt", "imbalance_ratio": 0.5})


@needs_real
def test_fashion_mnist_lt_on_debian_files():
    """The demo's Fashion-MNIST-LT (n_max 500, r 100, seed 0): 1,236 training images, 10k balanced test."""
    ds = load_dataset({"kind": "fashion_mnist_lt", "n_max": 500, "imbalance_ratio": 100, "seed": 0})
    assert len(ds.train) == 1236 and ds.train_class_counts() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert len(ds.splits["test"]) == 10000
    assert ds.shot_split() == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}


# ---------------------------------------------------------------- ImageFolder


def _write_tree(root: Path, counts: dict[str, dict[str, int]]) -> None:
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 5), (i * 10, len(cls), 7)).save(d / f"img{i:02d}.png")
            (d / "notes.txt").write_text("not an image")


def test_imagefolder_with_imbalance(tmp_path):
    """root/<split>/<class>/*.png loads: sorted classes, non-images skipped, the LT rule applied to train."""
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"zebra": 8, "ant": 8, "moth": 8}, "val": {"ant": 2, "moth": 1, "zebra": 2}})
    ds = load_dataset(
        {"kind": "imagefolder", "root": str(root), "name": "bugs", "imbalance_ratio": 4, "seed": 0}
    )
    assert ds.class_names == ["ant", "moth", "zebra"]
    assert set(ds.splits) == {"train", "val"}
    assert ds.train_class_counts() == longtail_counts(3, 8, 4) == [8, 4, 2]
    assert ds.splits["val"].class_counts(3) == [2, 1, 2]
    assert all(u.startswith("bugs-train-") for u in ds.train.uids) and len(set(ds.train.uids)) == len(
        ds.train
    )
    img = ds.splits["val"].image(2)  # moth img00
    assert img.size == (6, 5) and img.getpixel((0, 0)) == (0, 4, 7)
    assert isinstance(ds.splits["val"].image_source(0), bytes)  # PNG bytes pass through unchanged
    balanced = load_dataset({"kind": "imagefolder", "root": str(root)})
    assert balanced.name == "tree" and balanced.train_class_counts() == [8, 8, 8]


def test_imagefolder_bad_roots(tmp_path):
    """A missing root, a file as root, or a root without train/ -> UserError naming it."""
    with pytest.raises(UserError, match="does not exist"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path / "missing")})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        load_dataset({"kind": "imagefolder", "root": str(f)})
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/"):
        load_dataset({"kind": "imagefolder", "root": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="root"):
        load_dataset({"kind": "imagefolder"})


def test_dataset_split_subset_keeps_uids_and_sources():
    """DatasetSplit.subset keeps the uids, labels, pixels and source indices of the chosen rows."""
    pixels = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2)
    split = DatasetSplit([f"x-train-{i}" for i in range(4)], [0, 1, 0, 1], pixels=pixels)
    sub = split.subset([3, 1])
    assert sub.uids == ["x-train-3", "x-train-1"] and sub.labels.tolist() == [1, 1]
    assert sub.source_index.tolist() == [3, 1]
    np.testing.assert_array_equal(np.asarray(sub.image(0)), pixels[3])
