"""The memory-mapped neighbor store (trainer/features.py `open_store`): the same features and the same
training as the in-RAM store, the copy kept current with its store file, and the mode chosen by size."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retformer.artifacts.embeddings_io import EmbeddingTable, table_to_arrow, write_embeddings_part
from retformer.artifacts.workspace import Workspace
from retformer.trainer import features as feat
from retformer.trainer.config import FusionOptions
from retformer.trainer.evaluate import evaluate
from retformer.trainer.features import STORE_MMAP, load_retrieval_features, open_store
from retformer.trainer.model_factory import build_model
from retformer.trainer.train import TrainConfig, fit, predict

torch.set_num_threads(1)

DATASET, KB, TABLE_K, K = "tiny_lt", "tiny_all", 8, 4  # the e2e workspace's names (tests/conftest.py)


def _write_store_dataset(root: Path, seed: int = 0, n: int = 40, k: int = 5, m: int = 90) -> Path:
    """embeddings/train + neighbors/kbx/k<k>/{train,store}.parquet with what a real store holds: rows
    without text (null text_emb), rows without a label (null), kb_ids not in file order, and several
    row groups. Returns the neighbor folder."""
    rng = np.random.default_rng(seed)
    di, dt = 16, 8
    q = EmbeddingTable(
        uid=np.array([f"q{i}" for i in range(n)], dtype=object),
        image_emb=rng.standard_normal((n, di)).astype(np.float16),
        text_emb=np.zeros((n, dt), np.float16),
        has_text=np.zeros(n, bool),
        caption=[None] * n,
        label=(np.arange(n) % 3).astype(np.int32),
        source=["train"] * n,
    )
    write_embeddings_part(root / "embeddings" / "train" / "part-00000.parquet", q)
    kb_ids = rng.permutation(np.arange(1000, 1000 + m))  # not ascending: the loader must sort them
    has_text = rng.random(m) > 0.3
    text = rng.standard_normal((m, dt)).astype(np.float16)
    text[~has_text] = 0
    label = rng.integers(-1, 3, m).astype(np.int32)
    store = EmbeddingTable(
        uid=np.array([f"kb{i}" for i in kb_ids], dtype=object),
        image_emb=rng.standard_normal((m, di)).astype(np.float16),
        text_emb=text,
        has_text=has_text,
        caption=[f"c{i}" if t else None for i, t in zip(kb_ids, has_text, strict=True)],
        label=label,
        source=["kb"] * m,
    )
    arrow = table_to_arrow(store)
    arrow = arrow.append_column("kb_id", pa.array(kb_ids, pa.int64())).replace_schema_metadata(
        arrow.schema.metadata
    )
    nn_dir = root / "neighbors" / "kbx" / f"k{k}"
    nn_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow, nn_dir / "store.parquet", compression="zstd", row_group_size=25)
    nn_id = rng.choice(kb_ids, size=(n, k))
    table = pa.table(
        {
            "uid": pa.array([f"q{i}" for i in range(n)]),
            "nn_id": pa.FixedSizeListArray.from_arrays(pa.array(nn_id.ravel(), pa.int64()), k),
            "nn_score": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * k, np.float32)), k),
        }
    )
    pq.write_table(table, nn_dir / "train.parquet")
    return nn_dir


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file a tensor's memory is mapped from (/proc/self/maps), or None for anonymous memory."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5].strip() if len(parts) == 6 and parts[5].startswith("/") else None
    return None


def _assert_same_features(a: feat.RetrievalFeatures, b: feat.RetrievalFeatures) -> None:
    for f in ("query_img", "labels", "nn_rows", "nn_score", "store_img", "store_txt", "store_has_text"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert torch.equal(a.store_label, b.store_label) and a.uids == b.uids


def test_mmap_store_gives_the_in_ram_features(tmp_path: Path, monkeypatch) -> None:
    """With a copy batch smaller than the file's row groups, the memory-mapped store yields exactly the
    in-RAM features (null text -> zeros, null label -> -1, unsorted kb_ids), its vectors are pages of
    store.mmap/*.npy (not process memory), and every gathered batch is bit for bit the same."""
    monkeypatch.setattr(feat, "STORE_COPY_ROWS", 7)
    nn_dir = _write_store_dataset(Workspace(tmp_path).dataset_dir("d"))
    ws = Workspace(tmp_path)
    ram = load_retrieval_features(ws, "d", "kbx", 5, "train", mmap=False)
    assert not (nn_dir / STORE_MMAP).exists()
    mapped = load_retrieval_features(ws, "d", "kbx", 5, "train", mmap=True)
    _assert_same_features(ram, mapped)
    assert (ram.store_label == -1).any() and not ram.store_has_text.all()
    assert _mapped_file(mapped.store_img) == str(nn_dir / STORE_MMAP / "image.npy")
    assert _mapped_file(mapped.store_txt) == str(nn_dir / STORE_MMAP / "text.npy")
    assert _mapped_file(ram.store_img) is None
    idx = torch.tensor([3, 0, 17, 39])
    for name, x in ram.batch(idx).items():
        y = mapped.batch(idx)[name]
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_mmap_copy_is_reused_and_rebuilt_when_the_store_changes(tmp_path: Path) -> None:
    """A current copy is opened as it is (same files); a rewritten store.parquet makes the next open
    copy it again, so the mapped values always follow the store file."""
    root = Workspace(tmp_path).dataset_dir("d")
    nn_dir = _write_store_dataset(root, seed=0)
    store = nn_dir / "store.parquet"
    first = open_store(store, mmap=True)
    image_file = nn_dir / STORE_MMAP / "image.npy"
    inode = image_file.stat().st_ino
    again = open_store(store, mmap=True)
    assert image_file.stat().st_ino == inode and np.array_equal(first.image, again.image)

    shutil.rmtree(root)
    nn_dir = _write_store_dataset(root, seed=1)  # same shapes, other values
    changed = open_store(store, mmap=True)
    fresh = open_store(store, mmap=False)
    assert image_file.stat().st_ino != inode
    assert not np.array_equal(changed.image, first.image)
    for name in ("kb_id", "image", "text", "has_text", "label"):
        assert np.array_equal(getattr(changed, name), getattr(fresh, name)), name


def test_auto_mode_maps_only_large_stores(tmp_path: Path, monkeypatch) -> None:
    """mmap=None maps a store whose vectors reach STORE_MMAP_AUTO_BYTES and reads a smaller one into
    RAM without writing anything beside it."""
    nn_dir = _write_store_dataset(Workspace(tmp_path).dataset_dir("d"))
    vector_bytes = 90 * (16 + 8) * 2
    monkeypatch.setattr(feat, "STORE_MMAP_AUTO_BYTES", vector_bytes + 1)
    assert not open_store(nn_dir / "store.parquet").mapped
    assert not (nn_dir / STORE_MMAP).exists()
    monkeypatch.setattr(feat, "STORE_MMAP_AUTO_BYTES", vector_bytes)
    assert open_store(nn_dir / "store.parquet").mapped
    assert (nn_dir / STORE_MMAP / "meta.json").is_file()


def test_training_on_the_mapped_store_is_bitwise_the_in_ram_training(e2e_workspace: Path, tmp_path: Path):
    """On the small end-to-end run's features (a copy, so the shared workspace stays untouched),
    2 epochs of RetFormer from the same seed end with bit-identical weights, history and test logits
    whether the store is in RAM or memory-mapped."""
    src = Workspace(e2e_workspace).dataset_dir(DATASET)
    ws = Workspace(tmp_path / "work")
    for part in ("embeddings", "neighbors"):
        shutil.copytree(src / part, ws.dataset_dir(DATASET) / part)

    def run(mmap: bool) -> tuple[dict, list, torch.Tensor, dict]:
        train = load_retrieval_features(ws, DATASET, KB, TABLE_K, "train", mmap=mmap).subset_k(K)
        test = load_retrieval_features(ws, DATASET, KB, TABLE_K, "test", mmap=mmap).subset_k(K)
        assert (_mapped_file(train.store_img) is not None) == mmap
        torch.manual_seed(0)
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        dims = (train.img_dim, train.txt_dim, K)
        model = build_model("retformer", num_classes, *dims, FusionOptions(width=32, depth=1, heads=2))
        config = TrainConfig(epochs=2, batch_size=32, seed=0, device="cpu")
        history = fit(model, train, config)
        logits = predict(model, test, device="cpu")
        return model.state_dict(), history, logits, evaluate(logits, test.labels)

    w_ram, h_ram, l_ram, m_ram = run(False)
    w_map, h_map, l_map, m_map = run(True)
    assert w_ram.keys() == w_map.keys()
    for name in w_ram:
        assert torch.equal(w_ram[name], w_map[name]), name

    def no_time(history: list) -> list:
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]

    assert no_time(h_ram) == no_time(h_map) and len(h_ram) == 2
    assert torch.equal(l_ram, l_map)
    assert m_ram == m_map
