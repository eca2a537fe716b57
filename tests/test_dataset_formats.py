"""The paper's downstream datasets on files in their real formats: CIFAR-100-LT (LDAM-DRW picks),
ImageNet-LT list files, mini-WebVision (DivideMix conventions), label noise, and the manifests."""

from __future__ import annotations

import importlib.util
import io
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retformer.artifacts import manifest
from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets import longtail_counts, shot_split
from retformer.kb_builder.datasets.cifar import cifar_lt_indices, read_cifar_pickle
from retformer.kb_builder.datasets.label_noise import NoisyLabelSplit, apply_label_noise, asymmetric_targets
from tests.helpers import fashion_mnist_world_pool, load_dataset

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not installed at {FMNIST}"
)
_FOOLBOX = importlib.util.find_spec("foolbox")
FOOLBOX_DATA = Path(_FOOLBOX.submodule_search_locations[0]) / "data" if _FOOLBOX else Path("/nonexistent")
needs_foolbox = pytest.mark.skipif(
    not FOOLBOX_DATA.is_dir(), reason="foolbox's data/ folder (real CIFAR-100 images) not installed"
)


# ------------------------------------------------------------------------------------------ helpers
def ldam_reference(
    targets: np.ndarray, imb_factor: float, cls_num: int = 100, rand_number: int = 0
) -> np.ndarray:
    """LDAM-DRW imbalance_cifar.py (exp profile), re-implemented independently with the global RNG."""
    img_max = int(len(targets) / cls_num * 1.0)
    img_num_per_cls = [int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]
    saved = np.random.get_state()
    try:
        np.random.seed(rand_number)
        picked = []
        for the_class, the_img_num in zip(np.unique(targets), img_num_per_cls, strict=False):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)
            picked.append(idx[:the_img_num])
    finally:
        np.random.set_state(saved)
    return np.concatenate(picked)


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the real CIFAR files: str as BINSTRING, numpy.core names."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def foolbox_cifar100() -> list[tuple[np.ndarray, int]]:
    """foolbox's 20 real CIFAR-100 test images as (32x32x3 uint8, fine label from the file name)."""
    out = []
    for path in sorted(FOOLBOX_DATA.glob("cifar100_*.png")):
        label = int(re.fullmatch(r"cifar100_\d+_(\d+)\.png", path.name).group(1))
        out.append((np.asarray(Image.open(path).convert("RGB")), label))
    return out


def write_cifar100(
    root: Path,
    train_per_class: int = 12,
    test_per_class: int = 3,
    *,
    bytes_keys: bool = True,
    py2: bool = False,
    seed: int = 0,
) -> dict:
    """A `root/cifar-100-python/{train,test,meta}` tree in the real pickle format (protocol 2, N x 3072
    channel-first rows, fine/coarse labels, shuffled class order). The 20 real foolbox images come first
    in the unshuffled train set; random images fill every class to `train_per_class`. Returns what was
    written (labels, coarse map, and where each real image ended up). `py2`: str keys and values written
    as Python 2 did (BINSTRING, numpy.core names), i.e. the bytes of the files from the CIFAR site."""
    rng = np.random.default_rng(seed)
    real = foolbox_cifar100()
    coarse_of = rng.permutation(100) // 5  # 20 superclasses of 5, not contiguous in fine ids (as real)
    labels = [lab for _, lab in real]
    images = [img for img, _ in real]
    for c in range(100):
        for _ in range(train_per_class - labels.count(c)):
            labels.append(c)
            images.append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    order = rng.permutation(len(labels))  # like the real file: classes interleaved
    train_labels = np.asarray(labels)[order]
    train_hwc = np.stack(images)[order]
    real_pos = {int(np.flatnonzero(order == i)[0]): i for i in range(len(real))}
    test_labels = rng.permutation(np.repeat(np.arange(100), test_per_class))
    test_hwc = rng.integers(0, 256, (len(test_labels), 32, 32, 3), dtype=np.uint8)

    def k(name: str):
        return name.encode() if bytes_keys and not py2 else name

    def dump(obj) -> bytes:
        return py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2)

    def rows(hwc: np.ndarray) -> np.ndarray:
        return hwc.transpose(0, 3, 1, 2).reshape(len(hwc), 3072)  # R plane, G plane, B plane

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, hwc, lab in (("train", train_hwc, train_labels), ("test", test_hwc, test_labels)):
        d = {
            k("data"): rows(hwc),
            k("fine_labels"): lab.tolist(),
            k("coarse_labels"): coarse_of[lab].tolist(),
            k("filenames"): [k(f"img_{i}.png") for i in range(len(lab))],
        }
        (folder / name).write_bytes(dump(d))
    meta = {
        k("fine_label_names"): [
            f"fine_{c:02d}".encode() if bytes_keys else f"fine_{c:02d}" for c in range(100)
        ],
        k("coarse_label_names"): [f"coarse_{c:02d}" for c in range(20)],
    }
    (folder / "meta").write_bytes(dump(meta))
    return {
        "train_labels": train_labels,
        "train_hwc": train_hwc,
        "test_labels": test_labels,
        "coarse_of": coarse_of,
        "real_pos": real_pos,
        "real": real,
    }


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, dict]:
    """One fake CIFAR-100 tree (12 train / 3 test images per class) shared by the CIFAR tests."""
    if not FOOLBOX_DATA.is_dir():
        pytest.skip("foolbox's data/ folder not installed")
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root)


def tiny_jpeg(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(path, "JPEG")
    return path


def assert_one_line_user_error(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------ CIFAR-100-LT
def test_cifar_lt_counts_give_published_sizes_with_ldam_floats():
    """n_i = int(500 * (1/r)^(i/99)) sums to 10,847 / 12,608 / 19,573 for r = 100 / 50 / 10, and 1/r is the
    very float LDAM gets from `--imb_factor 0.01 / 0.02 / 0.1`, so every count equals LDAM's."""
    for r, literal, total in ((100, 0.01, 10847), (50, 0.02, 12608), (10, 0.1, 19573)):
        assert 1 / r == literal
        counts = longtail_counts(100, 500, r)
        assert sum(counts) == total
        assert counts == [int(500 * (literal ** (i / (100 - 1.0)))) for i in range(100)]
    assert longtail_counts(100, 500, 100)[-1] == 5 and longtail_counts(100, 500, 10)[-1] == 50


def test_cifar_lt_picks_equal_ldam_reference_at_full_scale():
    """On a 50,000-label CIFAR-100-shaped train set (500 per class, interleaved), cifar_lt_indices picks
    exactly the images of LDAM-DRW's loop (np.random.seed(0); per class in label order shuffle, take
    idx[:n_i]) for r = 100 / 50 / 10 -- 10,847 / 12,608 / 19,573 of them -- leaving the global RNG alone."""
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(100), 500))
    np.random.seed(123)
    before = np.random.get_state()
    for r, literal, total in ((100, 0.01, 10847), (50, 0.02, 12608), (10, 0.1, 19573)):
        ours = cifar_lt_indices(labels, r)
        ref = ldam_reference(labels, literal)
        assert len(ours) == len(ref) == total
        np.testing.assert_array_equal(ours, np.sort(ref))
    after = np.random.get_state()
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    # The seed matters: another rand_number gives another subset of the same size.
    assert not np.array_equal(cifar_lt_indices(labels, 100, seed=1), cifar_lt_indices(labels, 100))


@needs_foolbox
def test_cifar100_lt_loader_reads_real_pickle_format(cifar):
    """The loader decodes the real pickle layout: pixels of the foolbox CIFAR-100 images round-trip exactly
    (channel-first rows -> HWC), labels and class names come from the pickles, uids keep the original index,
    and the LT training split at img_max = 12 (LDAM's int(len/100)) is LDAM's reference picks;
    test_limit keeps a class-balanced test subsample."""
    root, info = cifar
    full = load_dataset({"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": 1})
    assert len(full.train) == 1200 and len(full.splits["test"]) == 300
    assert full.class_names[:2] == ["fine_00", "fine_01"] and full.num_classes == 100
    for pos, i in info["real_pos"].items():
        img, label = info["real"][i]
        assert full.train.uids[pos] == f"cifar100-train-{pos:06d}"
        assert int(full.train.labels[pos]) == label
        np.testing.assert_array_equal(np.asarray(full.train.image(pos)), img)
    np.testing.assert_array_equal(full.splits["test"].labels, info["test_labels"])
    for r, literal in ((100, 0.01), (50, 0.02), (10, 0.1)):
        ds = load_dataset({"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": r})
        ref = np.sort(ldam_reference(info["train_labels"], literal))
        np.testing.assert_array_equal(ds.train.source_index, ref)
        assert ds.train_class_counts() == longtail_counts(100, 12, r)
        assert ds.train.uids == [f"cifar100-train-{i:06d}" for i in ref]
        np.testing.assert_array_equal(ds.train.pixels, info["train_hwc"][ref])
        assert len(ds.splits["test"]) == 300  # the test split stays balanced and whole
    quick = load_dataset({"kind": "cifar100_lt", "root": str(root), "test_limit": 200})
    assert quick.splits["test"].class_counts(100) == [2] * 100  # test_limit: seeded, class-balanced


@needs_foolbox
def test_cifar100_lt_val_is_an_opt_in_hold_out_of_the_lt_train_split(cifar):
    """CIFAR-100-LT has no val split of its own: `val_fraction` holds one out of the long-tailed
    training split (seeded, disjoint, every class keeps an image, said in the notes); without it the
    training split is LDAM's, whole."""
    root, _ = cifar
    spec = {"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": 1}
    whole = load_dataset(spec)
    ds = load_dataset({**spec, "val_fraction": 0.25})
    assert "val" not in whole.splits and len(ds.splits["val"]) == 300
    assert ds.train_class_counts() == [9] * 100 and ds.splits["val"].class_counts(100) == [3] * 100
    assert not set(ds.train.uids) & set(ds.splits["val"].uids)
    assert set(ds.train.uids) | set(ds.splits["val"].uids) == set(whole.train.uids)
    assert "hold-out of 25% of each class" in ds.notes["val"]
    with pytest.raises(UserError, match="val_fraction: input should be less than 1"):
        load_dataset({**spec, "val_fraction": 2})


@needs_foolbox
def test_cifar_shot_split_comes_from_r100_counts(cifar):
    """Many/medium/few follow the r = 100 counts for every ratio (LIFT): at img_max = 500 the groups are
    35/35/30 whatever `imbalance_ratio` is; `shot_reference_ratio: null` uses the split's own counts."""
    root, _ = cifar
    r100 = shot_split(longtail_counts(100, 500, 100))
    assert [len(r100[g]) for g in ("many", "medium", "few")] == [35, 35, 30]
    for r in (10, 50, 100):
        ds = load_dataset({"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": r, "n_max": 500})
        assert ds.shot_split() == r100
        d = ds.describe()
        assert d["shot_split"] == r100 and d["shot_counts"] == longtail_counts(100, 500, 100)
        assert d["shot_reference_ratio"] == 100
    shot = {"many": 6, "few": 2}
    ds = load_dataset(
        {"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": 10, "shot_thresholds": shot}
    )
    assert ds.shot_split() == shot_split(longtail_counts(100, 12, 100), **shot)
    own = load_dataset(
        {
            "kind": "cifar100_lt",
            "root": str(root),
            "imbalance_ratio": 10,
            "shot_thresholds": shot,
            "shot_reference_ratio": None,
        }
    )
    assert own.shot_split() == shot_split(longtail_counts(100, 12, 10), **shot) != ds.shot_split()


@needs_foolbox
def test_cifar_str_keys_and_root_being_the_pickle_folder(tmp_path):
    """Pickles with str keys and bytes class names load the same way, `root` may point at
    cifar-100-python/ itself, and Python-2 pickles (BINSTRING data, numpy.core names: the bytes of the real
    files) decode to the same pixels and labels."""
    info = write_cifar100(tmp_path, train_per_class=2, test_per_class=1, bytes_keys=False)
    ds = load_dataset(
        {"kind": "cifar100_lt", "root": str(tmp_path / "cifar-100-python"), "imbalance_ratio": 1}
    )
    assert ds.class_names[5] == "fine_05"
    np.testing.assert_array_equal(ds.train.labels, info["train_labels"])
    assert ds.superclass == info["coarse_of"].tolist()
    assert set(read_cifar_pickle(tmp_path / "cifar-100-python" / "meta")) == {
        "fine_label_names",
        "coarse_label_names",
    }
    py2 = tmp_path / "py2"
    info = write_cifar100(py2, train_per_class=2, test_per_class=1, py2=True, seed=1)
    assert b"numpy.core.multiarray" in (py2 / "cifar-100-python" / "train").read_bytes()
    ds = load_dataset({"kind": "cifar100_lt", "root": str(py2), "imbalance_ratio": 1})
    assert ds.class_names[7] == "fine_07"
    np.testing.assert_array_equal(ds.train.labels, info["train_labels"])
    np.testing.assert_array_equal(ds.train.pixels, info["train_hwc"])


def test_cifar_missing_or_hostile_files_are_one_line_user_errors(tmp_path):
    """A missing root, a root without cifar-100-python/, a missing pickle, a non-pickle and a pickle that
    would run code each give a one-line UserError naming the path (and the expected layout)."""
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "cifar100_lt", "root": str(tmp_path / "nowhere")})
    assert_one_line_user_error(e, str(tmp_path / "nowhere"), "cifar-100-python", "train, test and meta")
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "cifar100_lt", "root": str(tmp_path)})
    assert_one_line_user_error(e, str(tmp_path / "cifar-100-python"), "expected")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": ["a", "b"]}, protocol=2))
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "cifar100_lt", "root": str(tmp_path)})
    assert_one_line_user_error(e, str(folder / "train"), "not found")
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "cifar100_lt", "root": str(tmp_path)})
    assert_one_line_user_error(e, str(folder / "train"), "corrupt")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "train").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(UserError) as e:
        read_cifar_pickle(folder / "train")
    assert_one_line_user_error(e, "refusing to load", "print")


# ------------------------------------------------------------------------------------------ ImageNet-LT
def write_imagenet_lt(tmp_path: Path, with_val: bool = True) -> tuple[Path, Path, dict]:
    """An ImageNet folder with tiny JPEGs and OLTR-style lists `train/<wnid>/<wnid>_<j>.JPEG label`."""
    root, lists = tmp_path / "imagenet", tmp_path / "ImageNet_LT"
    lists.mkdir(parents=True)
    wnids = {0: "n01440764", 1: "n01443537", 999: "n15075141"}
    entries = {
        "train": [
            (f"train/{wnids[c]}/{wnids[c]}_{j}.JPEG", c)
            for c, n in ((0, 4), (1, 2), (999, 1))
            for j in range(n)
        ],
        "val": [(f"train/{wnids[c]}/{wnids[c]}_{100 + c}.JPEG", c) for c in (0, 1, 999)],
        "test": [(f"val/{wnids[c]}/ILSVRC2012_val_{c + 1:08d}.JPEG", c) for c in (0, 1, 999)],
    }
    for split, rows in entries.items():
        if split == "val" and not with_val:
            continue
        for j, (rel, _) in enumerate(rows):
            tiny_jpeg(root / rel, 20 * j)
        text = "".join(f"{rel} {c}\n" for rel, c in rows)
        (lists / f"ImageNet_LT_{split}.txt").write_text(text + "\n")  # trailing blank line is ignored
    return root, lists, entries


def test_imagenet_lt_lists_load(tmp_path):
    """The three OLTR list files load as train/val/test with the listed labels, paths under root, uids
    `imagenet-<stem>`, JPEG bytes passed through unchanged, and class names `class_<i>` (1000 classes)."""
    root, lists, entries = write_imagenet_lt(tmp_path)
    ds = load_dataset({"kind": "imagenet_lt", "root": str(root), "lists": str(lists)})
    assert set(ds.splits) == {"train", "val", "test"} and ds.num_classes == 1000
    for split, rows in entries.items():
        s = ds.splits[split]
        assert s.paths == [root / rel for rel, _ in rows]
        assert s.labels.tolist() == [c for _, c in rows]
        assert s.uids == [f"imagenet-{Path(rel).stem}" for rel, _ in rows]
    assert ds.splits["test"].uids[0] == "imagenet-ILSVRC2012_val_00000001"
    assert ds.train_class_counts()[:2] == [4, 2] and ds.train_class_counts()[999] == 1
    assert ds.class_names[999] == "class_999"
    assert ds.train.image(0).size == (8, 8)
    assert ds.train.image_source(0) == (root / entries["train"][0][0]).read_bytes()


def test_imagenet_lt_classnames_and_optional_val(tmp_path):
    """classnames.txt in the lists folder names the classes; without ImageNet_LT_val.txt there is no val
    split; a classnames.txt with the wrong number of lines is a one-line UserError."""
    root, lists, _ = write_imagenet_lt(tmp_path, with_val=False)
    (lists / "classnames.txt").write_text("".join(f"name {i}\n" for i in range(1000)))
    ds = load_dataset({"kind": "imagenet_lt", "root": str(root), "lists": str(lists)})
    assert set(ds.splits) == {"train", "test"} and ds.class_names[1] == "name 1"
    (lists / "classnames.txt").write_text("only\ntwo\n")
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "imagenet_lt", "root": str(root), "lists": str(lists)})
    assert_one_line_user_error(e, "classnames.txt", "2 class names for 1000 classes")


def test_imagenet_lt_bad_input_is_one_line_user_error(tmp_path):
    """Missing lists folder / test list, a label >= 1000, a line without a label, a duplicated line and a
    wrong image root each give a one-line UserError naming the file (and line) at fault."""
    root, lists, _ = write_imagenet_lt(tmp_path)
    spec = {"kind": "imagenet_lt", "root": str(root), "lists": str(lists)}
    with pytest.raises(UserError) as e:
        load_dataset({**spec, "lists": str(tmp_path / "nolists")})
    assert_one_line_user_error(e, str(tmp_path / "nolists"), "ImageNet_LT_")
    train = lists / "ImageNet_LT_train.txt"
    good = train.read_text()
    train.write_text(good + "train/x/y.JPEG 1000\n")
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, f"{train}:9", "label 1000 outside 0..999")
    train.write_text("train/x/y.JPEG\n")
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, f"{train}:1", "relative/path label")
    first = good.splitlines()[0]
    train.write_text(good + first + "\n")
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, str(train), "same uid")
    train.write_text(good)
    with pytest.raises(UserError) as e:
        load_dataset({**spec, "root": str(tmp_path)})
    assert_one_line_user_error(e, "not found under root", str(tmp_path))
    (lists / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, str(lists / "ImageNet_LT_test.txt"), "not found")


# ------------------------------------------------------------------------------------------ mini-WebVision
WV_LABELS = [0, 1, 49, 50, 999, 0]  # 50 and 999 are outside mini-WebVision's 50 classes


def write_webvision(tmp_path: Path) -> Path:
    """A WebVision 1.0 root: info/ lists (some labels >= 50), google/ train images, val_images_256/."""
    root = tmp_path / "webvision"
    train_lines, val_lines = [], []
    for j, c in enumerate(WV_LABELS):
        rel = f"google/q{c + 1:04d}/{j:08d}.jpg"  # stems repeat across query folders in WebVision
        tiny_jpeg(root / rel, j * 10)
        train_lines.append(f"{rel} {c}")
        name = f"val{j + 1:06d}.jpg"
        tiny_jpeg(root / "val_images_256" / name, j * 10)
        val_lines.append(f"{name} {c}")
    (root / "info").mkdir(parents=True, exist_ok=True)
    (root / "info" / "train_filelist_google.txt").write_text("\n".join(train_lines) + "\n")
    (root / "info" / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    return root


def test_mini_webvision_keeps_first_50_classes_of_both_lists(tmp_path):
    """As DivideMix: train = lines of train_filelist_google.txt with label < 50 (paths under root),
    webvision_val = lines of val_filelist.txt with label < 50 (images under val_images_256/); source_index
    points back to the list line; class names are class_<i> without synsets.txt."""
    root = write_webvision(tmp_path)
    ds = load_dataset({"kind": "mini_webvision", "root": str(root)})
    keep = [j for j, c in enumerate(WV_LABELS) if c < 50]
    assert set(ds.splits) == {"train", "webvision_val"} and ds.num_classes == 50
    assert ds.train.labels.tolist() == [WV_LABELS[j] for j in keep]
    assert ds.train.source_index.tolist() == keep
    assert ds.train.paths[0] == root / "google/q0001/00000000.jpg"
    assert ds.train.uids[0] == "webvision-google_q0001_00000000"
    val = ds.splits["webvision_val"]
    assert val.paths == [root / "val_images_256" / f"val{j + 1:06d}.jpg" for j in keep]
    assert val.uids[0] == "webvision-val_images_256_val000001"
    assert ds.class_names[49] == "class_49"
    assert val.image(0).size == (8, 8)


def test_mini_webvision_imagenet_val_layouts(tmp_path):
    """imagenet_val (classes < 50 of ILSVRC12 val) loads from DivideMix's `<c>/` folders, from the ILSVRC12
    `<wnid>/` tree in info/synsets.txt order (which also names the classes), and from a `path label` list;
    each image gets the same `imagenet-<stem>` uid as in ImageNet-LT."""
    root = write_webvision(tmp_path)
    wnids = [f"n{9000000 + 7 * c:08d}" for c in range(60)]
    order = wnids[::-1]  # synsets.txt order differs from sorted order: proves the file is used
    (root / "info" / "synsets.txt").write_text("".join(f"{w} name{c}, alias\n" for c, w in enumerate(order)))
    divide, tree, flat = tmp_path / "dm_val", tmp_path / "ilsvrc_val", tmp_path / "flat_val"
    list_lines = []
    for c in range(60):
        stem = f"ILSVRC2012_val_{c + 1:08d}"
        tiny_jpeg(divide / str(c) / f"{stem}.JPEG")
        tiny_jpeg(tree / order[c] / f"{stem}.JPEG")
        tiny_jpeg(flat / f"{stem}.JPEG")
        list_lines.append(f"{stem}.JPEG {c}")
    (tmp_path / "val.txt").write_text("\n".join(list_lines) + "\n")
    base = {"kind": "mini_webvision", "root": str(root)}
    expected_uids = [f"imagenet-ILSVRC2012_val_{c + 1:08d}" for c in range(50)]
    for extra in (
        {"imagenet_val_root": str(divide)},
        {"imagenet_val_root": str(tree)},
        {"imagenet_val_root": str(flat), "imagenet_val_list": str(tmp_path / "val.txt")},
    ):
        ds = load_dataset({**base, **extra})
        iv = ds.splits["imagenet_val"]
        assert iv.labels.tolist() == list(range(50)), extra
        assert iv.uids == expected_uids, extra
        assert ds.class_names[0] == "name0" and ds.class_names[49] == "name49"
    assert ds.splits["imagenet_val"].paths[3] == flat / "ILSVRC2012_val_00000004.JPEG"
    # The same ILSVRC12 val image has the same uid in ImageNet-LT's test split.
    lt_root, lt_lists, _ = write_imagenet_lt(tmp_path / "lt")
    lt = load_dataset({"kind": "imagenet_lt", "root": str(lt_root), "lists": str(lt_lists)})
    assert lt.splits["test"].uids[0] == ds.splits["imagenet_val"].uids[0]


def test_mini_webvision_missing_parts_are_one_line_user_errors(tmp_path):
    """A missing root, train list, val image folder, imagenet_val_root or DivideMix class folder each give a
    one-line UserError naming the missing path and the expected layout."""
    with pytest.raises(UserError) as e:
        load_dataset({"kind": "mini_webvision", "root": str(tmp_path / "nowhere")})
    assert_one_line_user_error(e, str(tmp_path / "nowhere"), "train_filelist_google.txt")
    root = write_webvision(tmp_path)
    spec = {"kind": "mini_webvision", "root": str(root)}
    with pytest.raises(UserError) as e:
        load_dataset({**spec, "imagenet_val_root": str(tmp_path / "noval")})
    assert_one_line_user_error(e, str(tmp_path / "noval"), "<wnid>")
    tiny_jpeg(tmp_path / "dm" / "0" / "a.JPEG")
    with pytest.raises(UserError) as e:
        load_dataset({**spec, "imagenet_val_root": str(tmp_path / "dm")})
    assert_one_line_user_error(e, str(tmp_path / "dm" / "1"), "class 1")
    for p in sorted((root / "val_images_256").iterdir()):
        p.unlink()
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, str(root / "val_images_256" / "val000001.jpg"), "val_filelist.txt")
    (root / "info" / "train_filelist_google.txt").unlink()
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, str(root / "info" / "train_filelist_google.txt"), "not found")


# ------------------------------------------------------------------------------------------ label noise
LT_COUNTS = [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


def lt_labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), LT_COUNTS))


def test_symmetric_noise_rate_other_class_and_determinism():
    """Symmetric noise at 0.4 changes exactly round(0.4 n_c) labels in every class (overall rate within
    0.005 of 0.4), always to a different class, spread over all other classes; same seed -> same labels,
    other seed -> others; the global RNG is untouched."""
    labels = lt_labels()
    np.random.seed(9)
    before = np.random.get_state()
    noisy, mask = apply_label_noise(labels, 10, "symmetric", 0.4, seed=3)
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert np.array_equal(mask, noisy != labels)
    assert abs(mask.mean() - 0.4) < 0.005
    for c, n in enumerate(LT_COUNTS):
        assert int(mask[labels == c].sum()) == int(np.floor(0.4 * n + 0.5))
    wrong = np.bincount(noisy[mask & (labels == 0)], minlength=10)
    assert wrong[0] == 0 and (wrong[1:] > 8).all()  # 200 flips over 9 classes: ~22 each
    again, _ = apply_label_noise(labels, 10, "symmetric", 0.4, seed=3)
    other, _ = apply_label_noise(labels, 10, "symmetric", 0.4, seed=4)
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, other)
    big = np.random.default_rng(1).integers(0, 100, 20000)
    _, m = apply_label_noise(big, 100, "symmetric", 0.2, seed=0)
    assert abs(m.mean() - 0.2) < 0.005


def test_asymmetric_noise_follows_the_fixed_map():
    """Asymmetric noise sends a chosen item of class c to T(c): the next class of its superclass (ascending
    ids, cyclic; singletons never flip), (c + 1) mod C without a superclass map, or an explicit mapping."""
    superclass = [0, 1, 0, 1, 0, 2]
    assert asymmetric_targets(6, superclass).tolist() == [2, 3, 4, 1, 0, 5]
    assert asymmetric_targets(4).tolist() == [1, 2, 3, 0]
    labels = np.repeat(np.arange(6), 50)
    noisy, mask = apply_label_noise(labels, 6, "asymmetric", 0.3, seed=0, superclass=superclass)
    targets = asymmetric_targets(6, superclass)
    assert (noisy[mask] == targets[labels[mask]]).all()
    assert np.bincount(labels[mask], minlength=6).tolist() == [15, 15, 15, 15, 15, 0]
    plain, pmask = apply_label_noise(labels, 6, "asymmetric", 0.3, seed=0)
    assert (plain[pmask] == (labels[pmask] + 1) % 6).all() and pmask.sum() == 90
    mapped, mmask = apply_label_noise(labels, 6, "asymmetric", 0.3, seed=0, mapping=[1, 0, 3, 2, 5, 4])
    assert (mapped[mmask] == np.array([1, 0, 3, 2, 5, 4])[labels[mmask]]).all()


def test_rate_zero_is_identity_and_bad_arguments_raise():
    """rate 0 returns the labels unchanged (empty mask) for both kinds; rates outside [0, 1] and unknown
    kinds are refused."""
    labels = lt_labels()
    for kind in ("symmetric", "asymmetric"):
        noisy, mask = apply_label_noise(labels, 10, kind, 0.0, seed=0)
        np.testing.assert_array_equal(noisy, labels)
        assert not mask.any()
    with pytest.raises(ValueError):
        apply_label_noise(labels, 10, "symmetric", 1.5)
    with pytest.raises(ValueError):
        apply_label_noise(labels, 10, "pairflip", 0.2)


@needs_foolbox
def test_label_noise_manifest_wiring(cifar):
    """`label_noise` in a dataset spec replaces only the train labels; the split keeps `clean_labels` (also
    through subset), describe() records the realised rate and the clean counts, asymmetric noise on
    CIFAR-100 flips within the pickle's superclasses, and a bad config is a one-line UserError."""
    root, info = cifar
    spec = {"kind": "cifar100_lt", "root": str(root), "imbalance_ratio": 1}
    clean = load_dataset(spec)
    ds = load_dataset({**spec, "label_noise": {"kind": "symmetric", "rate": 0.5, "seed": 0}})
    assert isinstance(ds.train, NoisyLabelSplit)
    np.testing.assert_array_equal(ds.train.clean_labels, clean.train.labels)
    np.testing.assert_array_equal(ds.splits["test"].labels, clean.splits["test"].labels)
    assert ds.train.uids == clean.train.uids and ds.train.noise_mask.mean() == 0.5
    sub = ds.train.subset([3, 1])
    assert (
        isinstance(sub, NoisyLabelSplit) and sub.clean_labels.tolist() == clean.train.labels[[3, 1]].tolist()
    )
    d = ds.describe()
    assert d["label_noise"]["realised_rate"] == 0.5 and d["label_noise"]["noisy_labels"] == 600
    assert d["clean_train_class_counts"] == [12] * 100 and d["spec"]["label_noise"]["rate"] == 0.5
    asym = load_dataset({**spec, "label_noise": {"kind": "asymmetric", "rate": 0.25, "seed": 1}})
    m = asym.train.noise_mask
    coarse = info["coarse_of"]
    assert m.sum() == 300
    assert (coarse[asym.train.labels[m]] == coarse[asym.train.clean_labels[m]]).all()
    np.testing.assert_array_equal(
        asym.train.labels[m], asymmetric_targets(100, coarse.tolist())[asym.train.clean_labels[m]]
    )
    for bad, needle in (
        ({"kind": "symmetric", "rate": 1.5}, "rate"),
        ({"kind": "pairflip", "rate": 0.2}, "kind"),
        ({"kind": "symmetric", "rate": 0.2, "sead": 0}, "sead"),
        ("0.4", "mapping"),
    ):
        with pytest.raises(UserError) as e:
            load_dataset({**spec, "label_noise": bad})
        assert_one_line_user_error(e, needle)


@needs_fmnist
def test_fmnist_lt_noisy_manifest_on_debian_files():
    """manifests/datasets/fmnist_lt_noisy.yaml loads on this machine: Fashion-MNIST-LT (1,236 images,
    counts 500..5) with 40% symmetric noise (round(0.4 n_c) per class), clean val and test labels, the shot
    split of the clean counts, and the demo's world pool still defined (outside train and val)."""
    spec = manifest.load("datasets", str(REPO / "manifests/datasets/fmnist_lt_noisy.yaml"))
    ds = load_dataset(spec)
    t = ds.train
    assert len(t) == 1236 and np.bincount(t.clean_labels, minlength=10).tolist() == LT_COUNTS
    assert t.noise_mask.sum() == sum(int(np.floor(0.4 * n + 0.5)) for n in LT_COUNTS)
    assert abs(ds.describe()["label_noise"]["realised_rate"] - 0.4) < 0.005
    assert ds.shot_split() == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    val = ds.splits["val"]
    assert np.bincount(val.labels, minlength=10).tolist() == [100] * 10 and not hasattr(val, "noise_mask")
    assert len(fashion_mnist_world_pool(spec)) == len(ds.pool) == 60000 - 1236 - 1000


# ------------------------------------------------------------------------------------------ manifests
DATA_MANIFESTS = ("cifar100lt", "cifar100lt_r50", "cifar100lt_r10", "imagenet_lt", "mini_webvision")


@pytest.mark.parametrize("name", DATA_MANIFESTS)
def test_data_manifests_without_data_give_one_line_user_error(name):
    """Each /data manifest, with its data folder absent, fails with a one-line UserError naming the missing
    folder and the layout expected there."""
    spec = manifest.load("datasets", str(REPO / f"manifests/datasets/{name}.yaml"))
    if Path(spec["root"]).exists():
        pytest.skip(f"{spec['root']} exists on this machine")
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert_one_line_user_error(e, spec["root"], "expected")


@needs_foolbox
def test_data_manifests_load_when_pointed_at_data(cifar, tmp_path):
    """The /data manifests are valid specs: with root (and lists) overridden to small trees in the real
    formats they load, with the ratio, splits and keys the manifest sets."""
    root, _ = cifar
    for name, r in (("cifar100lt", 100), ("cifar100lt_r50", 50), ("cifar100lt_r10", 10)):
        spec = manifest.load("datasets", str(REPO / f"manifests/datasets/{name}.yaml"), [f"root={root}"])
        ds = load_dataset(spec)
        assert ds.train_class_counts() == longtail_counts(100, 12, r) and ds.name == name
    lt_root, lt_lists, _ = write_imagenet_lt(tmp_path / "lt")
    spec = manifest.load(
        "datasets",
        str(REPO / "manifests/datasets/imagenet_lt.yaml"),
        [f"root={lt_root}", f"lists={lt_lists}"],
    )
    assert set(load_dataset(spec).splits) == {"train", "val", "test"}
    wv = write_webvision(tmp_path / "wv")
    for c in range(50):
        tiny_jpeg(tmp_path / "val" / str(c) / f"ILSVRC2012_val_{c:08d}.JPEG")
    spec = manifest.load(
        "datasets",
        str(REPO / "manifests/datasets/mini_webvision.yaml"),
        [f"root={wv}", f"imagenet_val_root={tmp_path / 'val'}"],
    )
    assert set(load_dataset(spec).splits) == {"train", "webvision_val", "imagenet_val"}
