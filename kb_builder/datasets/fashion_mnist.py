"""Fashion-MNIST from its four standard IDX files, and its long-tailed variant Fashion-MNIST-LT.

The files (gzipped or not) are those of Debian's `dataset-fashion-mnist` package, installed under
`/usr/share/datasets/fashion-mnist/`: 60,000 training and 10,000 test images of 28x28 grayscale,
10 classes. Fashion-MNIST-LT applies the CIFAR-LT rule (`longtail.py`) to the training set; its test
set is the balanced 10,000.

IDX format: a 4-byte magic (two zero bytes, a type code, the number of dimensions), then one
big-endian uint32 per dimension, then the values in C order, big-endian.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset, make_uid
from retformer.kb_builder.datasets.longtail import longtail_indices
from retformer.kb_builder.datasets.schema import FASHION_MNIST_ROOT, FashionMnist, FashionMnistLt

DEFAULT_ROOT = Path(FASHION_MNIST_ROOT)
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# Uids name the source images, not the derived dataset: the same training image is
# `fmnist-train-000123` in Fashion-MNIST, Fashion-MNIST-LT and the world KB.
UID_PREFIX = "fmnist"
HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` or put the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) there"
)

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file into an array; a bad header raises UserError."""
    if len(data) < 4:
        raise UserError(f"corrupt IDX file {name}: only {len(data)} bytes, no header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_TYPES or ndim == 0:
        raise UserError(
            f"corrupt IDX file {name}: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 + type code 08/09/0B/0C/0D/0E + number of dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UserError(f"corrupt IDX file {name}: header truncated ({len(data)} bytes for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_len != expected:
        raise UserError(
            f"corrupt IDX file {name}: header says {dims} x {dtype} = {expected} bytes of data, "
            f"found {len(data) - header_len}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file, gzipped or not (told apart by the gzip magic, not the name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"corrupt IDX file {path}: bad gzip data ({exc})") from exc
    return parse_idx(raw, str(path))


def write_idx(path: Path | str, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file (gzipped when `compress`, default: when the name ends in .gz).

    The inverse of `read_idx`; handy for turning another 28x28 dataset into the Fashion-MNIST layout.
    """
    path = Path(path)
    codes = {v.newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise UserError(f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {root}: {HOW_TO_GET}")


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    arr = read_idx(path)
    arr.flags.writeable = False  # shared between callers: nobody may modify it in place
    return arr


def _load(path: Path) -> np.ndarray:
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


def load_arrays(root: Path | str = DEFAULT_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the `train` or `test` split, validated.

    Decoded arrays are cached per file (keyed by path, mtime and size) and read-only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST has splits train and test, not {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST directory {root} not found: {HOW_TO_GET}")
    img_path = _find(root, FILES[(split, "images")])
    lab_path = _find(root, FILES[(split, "labels")])
    images = _load(img_path)
    labels = _load(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{img_path}: expected a 3-d uint8 IDX image array, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise UserError(
            f"{lab_path}: expected a 1-d uint8 IDX label array, got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise UserError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise UserError(f"{lab_path}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def _split(split: str, images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None) -> DatasetSplit:
    if rows is None:
        rows = np.arange(len(labels), dtype=np.int64)
    return DatasetSplit(
        [make_uid(UID_PREFIX, split, int(i)) for i in rows],
        labels[rows],
        pixels=images[rows],
        source_index=rows,
    )


def balanced_subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded pick of at most `per_class` items of every class."""
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        picked.append(idx[:per_class])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def lt_train_indices(dataset: FashionMnistLt) -> np.ndarray:
    """Indices into the 60,000 training images of the Fashion-MNIST-LT training subset of `dataset`."""
    _, labels = load_arrays(dataset.root, "train")
    return longtail_indices(
        labels,
        dataset.n_max,
        float(dataset.imbalance_ratio),
        dataset.seed,
        num_classes=len(CLASS_NAMES),
    )


def val_indices(dataset: FashionMnist) -> np.ndarray:
    """Indices into the 60,000 training images of the balanced val split (`val_per_class` per class,
    seeded by `val_seed`, default seed + 1), drawn from the images the LT training subset leaves out.
    Empty when the manifest has no `val_per_class` (or for the balanced dataset, which uses all 60,000)."""
    if not isinstance(dataset, FashionMnistLt) or not dataset.val_per_class:
        return np.zeros(0, dtype=np.int64)
    _, labels = load_arrays(dataset.root, "train")
    left = np.setdiff1d(np.arange(len(labels), dtype=np.int64), lt_train_indices(dataset))
    return left[balanced_subsample(labels[left], dataset.val_per_class, dataset.val_split_seed)]


def load_fashion_mnist(dataset: FashionMnist, long_tailed: bool) -> DownstreamDataset:
    """Fashion-MNIST (balanced) or Fashion-MNIST-LT as a DownstreamDataset.

    Manifest keys: `root` (default /usr/share/datasets/fashion-mnist), and for the LT variant `n_max`
    (500), `imbalance_ratio` (100), `seed` (0), `val_per_class` (None = no val split; else a balanced
    val split from the training images outside the LT subset, seeded by `val_seed`). The LT
    variant's `pool` is every training image in neither train nor val (the world KB draws from it).
    `test_limit` (None = all 10,000) keeps a seeded, class-balanced subsample of test_limit // 10
    images per class (for quick runs on small machines).
    """
    root = Path(dataset.root)
    train_images, train_labels = load_arrays(root, "train")
    test_images, test_labels = load_arrays(root, "test")
    lt = dataset if long_tailed and isinstance(dataset, FashionMnistLt) else None
    train_rows = lt_train_indices(lt) if lt is not None else None
    test_rows = None
    if dataset.test_limit is not None:
        per_class = dataset.test_limit // len(CLASS_NAMES)
        if per_class < 1:
            raise UserError(
                f"test_limit {dataset.test_limit} is below one image per class ({len(CLASS_NAMES)})"
            )
        test_rows = balanced_subsample(test_labels, per_class, dataset.seed)
    name = dataset.name or ("fashion_mnist_lt" if long_tailed else "fashion_mnist")
    splits = {"train": _split("train", train_images, train_labels, train_rows)}
    notes: dict[str, Any] = {"test": "Fashion-MNIST t10k"}
    pool = None
    if lt is not None:
        val_rows = val_indices(lt)
        if len(val_rows):
            splits["val"] = _split("train", train_images, train_labels, val_rows)
            notes["val"] = (
                f"{lt.val_per_class} per class (seed {lt.val_split_seed}) from training images outside "
                "the LT subset (and hence outside the world pool)"
            )
        pool = _split("train", train_images, train_labels, world_pool(lt))
        notes["pool"] = "training images in neither the LT subset nor val"
    splits["test"] = _split("test", test_images, test_labels, test_rows)
    return DownstreamDataset(
        name=name,
        class_names=list(CLASS_NAMES),
        splits=splits,
        spec=dataset,
        shot=dataset.shot_thresholds,
        pool=pool,
        notes=notes,
    )


def world_pool(dataset: FashionMnist) -> np.ndarray:
    """Training indices (sorted) in neither the dataset's training nor its val split: the pool the
    world KB draws from.

    For Fashion-MNIST-LT that is every training image the long-tailed subset (and the val split, when
    the manifest asks for one) left out; for the balanced dataset (which uses all 60,000) it is empty.
    """
    _, labels = load_arrays(dataset.root, "train")
    if not isinstance(dataset, FashionMnistLt):
        return np.zeros(0, dtype=np.int64)
    used = np.union1d(lt_train_indices(dataset), val_indices(dataset))
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), used, assume_unique=True)
