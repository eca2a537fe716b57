"""KB shard sets from local data: world (disjoint, noisy synthetic captions), downstream, all; shard I/O."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import Sample, list_shards, manifest_path, read_shard, write_shards
from retformer.kb_builder.datasets import fashion_mnist as fm
from retformer.kb_builder.kb_sources import (
    TEMPLATES,
    build_kb_shards,
    caption_for,
    source_from_mapping,
    world_samples,
    write_dataset_shards,
)
from tests.helpers import fashion_mnist_world_pool, load_dataset

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped IDX tree: 200 random training images per class, 5 test images per class."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 200), ("t10k", 5)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        fm.write_idx(
            root / f"{split}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8),
        )
        fm.write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def lt_spec(fake_root) -> dict:
    return {
        "name": "fm_lt",
        "kind": "fashion_mnist_lt",
        "root": str(fake_root),
        "n_max": 100,
        "imbalance_ratio": 10,
    }


@pytest.fixture(scope="module")
def dataset(lt_spec):
    return load_dataset(lt_spec)


# A KB manifest's `source:` mapping, validated as the shards stage passes it (`_src`).
WORLD_SPEC = {
    "kind": "fashion_mnist_world",
    "dataset": "fm_lt",
    "size": 300,
    "seed": 0,
    "wrong_caption_fraction": 0.2,
}


def _src(raw: dict):
    """A `source:` mapping (dataset fm_lt unless given) as the builder's `LocalSource`."""
    return source_from_mapping({"dataset": "fm_lt", **raw})


WORLD = _src(WORLD_SPEC)


def _parse(caption: str) -> tuple[int, str]:
    """(class named, template used) of a synthetic caption, by exact match against every template x class."""
    hits = {
        (k, t) for k, name in enumerate(fm.CLASS_NAMES) for t in TEMPLATES if caption_for(t, name) == caption
    }
    assert len(hits) == 1, caption
    return hits.pop()


def _named_class(caption: str) -> int:
    return _parse(caption)[0]


def _read_all(paths) -> list[dict]:
    return [rec for p in paths for rec in read_shard(p)]


def test_world_pool_is_disjoint_from_the_long_tailed_train_split(dataset, lt_spec):
    """The world pool and the LT train subset partition the training set; the world KB uses no train uid."""
    pool = fashion_mnist_world_pool(lt_spec)
    train_idx = dataset.train.source_index
    assert len(np.intersect1d(pool, train_idx)) == 0
    assert len(pool) + len(train_idx) == 2000
    uids, *_ = world_samples(WORLD, dataset)
    assert len(uids) == 300 and not set(uids) & set(dataset.train.uids)


def test_world_captions_noise_fraction_labels_and_uniform_wrong_classes(dataset):
    """round(0.2 N) captions name a wrong class, label = named class, wrong classes use every offset."""
    uids, captions, named, true, rows, info = world_samples(_src({**WORLD_SPEC, "size": None}), dataset)
    n = len(uids)
    assert info["wrong_caption_fraction"]["measured"] == pytest.approx(0.2, abs=1 / n)
    assert [_named_class(c) for c in captions] == named.tolist()
    _, labels = fm.load_arrays(dataset.spec.root, "train")
    np.testing.assert_array_equal(true, labels[rows])
    offsets = ((named - true) % 10)[named != true]
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * len(offsets) / 9  # every wrong class is used
    assert len({_parse(c)[1] for c in captions}) == len(TEMPLATES) >= 5  # every template in use


def test_world_shards_read_back_identically(dataset, tmp_path):
    """Shards hold the same uids, captions, named labels, true labels, source and pixels as the plan."""
    uids, captions, named, true, rows, _ = world_samples(WORLD, dataset)
    record = build_kb_shards(WORLD, dataset, tmp_path, shard_size=128)
    assert record["counts"] == {"world": 300, "total": 300} and record["synthetic_captions"] is True
    assert record["wrong_caption_fraction"]["measured"] == pytest.approx(0.2, abs=1 / 300)
    assert [Path(p).name for p in record["shards"]] == [
        "world-00000.tar",
        "world-00001.tar",
        "world-00002.tar",
    ]
    recs = _read_all(record["shards"])
    assert [r["uid"] for r in recs] == uids
    assert [r["caption"] for r in recs] == captions
    assert [r["label"] for r in recs] == named.tolist()
    assert [r["meta"]["true_label"] for r in recs] == true.tolist()
    assert {r["source"] for r in recs} == {"world"} and {r["image_ext"] for r in recs} == {"png"}
    images, _ = fm.load_arrays(dataset.spec.root, "train")
    img = Image.open(io.BytesIO(recs[5]["image_bytes"]))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), images[rows[5]])


def test_rerun_is_idempotent_and_a_changed_spec_rewrites(dataset, tmp_path):
    """A matching rerun rewrites nothing (same mtimes); a new spec rewrites, dropping extra old shards."""
    first = build_kb_shards(WORLD, dataset, tmp_path, shard_size=100)
    mtimes = {p: os.stat(p).st_mtime_ns for p in first["shards"]}
    manifest_mtime = manifest_path(tmp_path, "world").stat().st_mtime_ns
    first_uids = [r["uid"] for r in _read_all(first["shards"])]
    again = build_kb_shards(WORLD, dataset, tmp_path, shard_size=100)
    assert again["shards"] == first["shards"]
    assert {p: os.stat(p).st_mtime_ns for p in again["shards"]} == mtimes
    assert manifest_path(tmp_path, "world").stat().st_mtime_ns == manifest_mtime
    smaller = build_kb_shards(_src({**WORLD_SPEC, "size": 150, "seed": 1}), dataset, tmp_path, shard_size=100)
    assert len(smaller["shards"]) == 2 and not (tmp_path / "world-00002.tar").exists()
    assert [r["uid"] for r in _read_all(smaller["shards"])] != first_uids[:150]


def test_leftover_tmp_and_unfinished_set_are_not_trusted(dataset, tmp_path):
    """A dead writer's `.tmp-<pid>` and a shard without manifest are never listed; a rerun replaces them."""
    leftover = tmp_path / "world-00000.tar.tmp-999999999"
    leftover.write_bytes(b"half a tar")
    (tmp_path / "world-00000.tar").write_bytes(b"truncated")  # killed after the rename, before the manifest
    assert list_shards(tmp_path) == []
    record = build_kb_shards(WORLD, dataset, tmp_path, shard_size=300)
    assert not leftover.exists()
    assert list_shards(tmp_path) == [Path(p) for p in record["shards"]]
    assert len(_read_all(record["shards"])) == 300


def test_downstream_kb_uses_the_train_uids(dataset, tmp_path):
    """The downstream KB's uids and labels are the train uids and labels; captions name the true class."""
    record = build_kb_shards(_src({"kind": "downstream", "seed": 0}), dataset, tmp_path, shard_size=500)
    recs = _read_all(record["shards"])
    assert [r["uid"] for r in recs] == dataset.train.uids
    assert [r["label"] for r in recs] == dataset.train.labels.tolist()
    assert [_named_class(r["caption"]) for r in recs] == dataset.train.labels.tolist()
    assert {r["source"] for r in recs} == {"downstream"}


def test_all_kb_is_the_union_of_the_parts(dataset, tmp_path):
    """source=all writes the world and downstream sets side by side, same uids as each part, no uid shared."""
    record = build_kb_shards(_src({**WORLD_SPEC, "kind": "all"}), dataset, tmp_path, shard_size=1000)
    recs = _read_all(record["shards"])
    world = [r["uid"] for r in recs if r["source"] == "world"]
    down = [r["uid"] for r in recs if r["source"] == "downstream"]
    assert world == world_samples(WORLD, dataset)[0] and down == dataset.train.uids
    assert record["counts"] == {
        "world": 300,
        "downstream": len(dataset.train),
        "total": 300 + len(dataset.train),
    }
    assert len({r["uid"] for r in recs}) == len(recs)


def test_dataset_shards_have_every_split_without_captions(dataset, tmp_path):
    """write_dataset_shards writes `<split>-%05d.tar` per split with its uids and labels and no caption."""
    out = write_dataset_shards(dataset, tmp_path, shard_size=400)
    assert set(out) == {"train", "test"} and out["test"][0].name == "test-00000.tar"
    for name, paths in out.items():
        recs = _read_all(paths)
        split = dataset.splits[name]
        assert [r["uid"] for r in recs] == split.uids and [r["label"] for r in recs] == split.labels.tolist()
        assert all(r["caption"] is None for r in recs)


def test_bad_kb_specs_are_user_errors(dataset, tmp_path, fake_root):
    """Unknown source, oversized world, bad template, world of a balanced dataset -> UserError."""
    with pytest.raises(UserError, match="world, downstream, all, fashion_mnist_world"):
        build_kb_shards(_src({"kind": "datacomp"}), dataset, tmp_path, 10)
    assert (
        build_kb_shards(_src({**WORLD_SPEC, "kind": "world", "size": 5}), dataset, tmp_path, 10)["counts"][
            "world"
        ]
        == 5
    )
    with pytest.raises(UserError, match="pool size"):
        build_kb_shards(_src({**WORLD_SPEC, "size": 10**6}), dataset, tmp_path, 10)
    balanced = load_dataset({"kind": "fashion_mnist", "root": str(fake_root)})
    with pytest.raises(UserError, match="empty"):
        build_kb_shards(WORLD, balanced, tmp_path, 10)
    with pytest.raises(UserError, match="template"):
        build_kb_shards(_src({**WORLD_SPEC, "templates": ["no placeholder"]}), dataset, tmp_path, 10)


def test_shard_writer_rejects_unsafe_uids_and_reads_corrupt_shard_as_user_error(tmp_path):
    """Unsafe uids are refused; a corrupt tar is a UserError naming it; empty input writes no shard."""
    img = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="uid"):
        write_shards([Sample("a/b.c", img, None, 0, "t")], tmp_path, "bad", 10)
    bad = tmp_path / "junk-00000.tar"
    bad.write_bytes(b"\x00not a tar" * 10)
    with pytest.raises(UserError, match="junk-00000.tar"):
        list(read_shard(bad))
    assert write_shards([], tmp_path, "none", 10) == []
    assert json.loads(manifest_path(tmp_path, "none").read_text())["num_samples"] == 0


@pytest.mark.skipif(
    not (REAL_ROOT / "train-images-idx3-ubyte.gz").is_file(), reason=f"no Fashion-MNIST at {REAL_ROOT}"
)
def test_world_kb_on_debian_fashion_mnist(tmp_path):
    """Real data: the world pool is the 58,764 images the LT split leaves out; a 300-sample KB is disjoint."""
    ds = load_dataset({"kind": "fashion_mnist_lt", "n_max": 500, "imbalance_ratio": 100, "seed": 0})
    pool = fashion_mnist_world_pool(ds.spec)
    assert len(pool) == 60000 - 1236
    record = build_kb_shards(WORLD, ds, tmp_path, shard_size=1000)
    uids = [r["uid"] for r in _read_all(record["shards"])]
    assert len(uids) == 300 and not set(uids) & set(ds.train.uids)
