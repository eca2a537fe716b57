"""How well the KB episodes' kNN filter (`trainer.kb_episodes.knn_agreeing_labels`) finds a world KB's wrong
labels: the world source writes each item's `true_label` into its json beside the (noisy) `label`, so the
filter's verdicts can be scored on KB data alone (no val or test image is read). Prints, for the filter
as shipped (2 of the 10 nearest share the label) and for the plurality rule tried first, how many items
it drops, how many of the wrong labels it finds, how many right ones it loses, and how many wrong ones
stay.

    python bench/method/kb_label_filter.py WORKDIR DATASET KB [K]
    python bench/method/kb_label_filter.py /tmp/demo33 digits_lt digits_world
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch

from retformer.artifacts.workspace import Workspace
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.kb_episodes import KNN_FILTER_K, knn_agreeing_labels


def true_labels(shard_dir: Path) -> dict[str, int]:
    """uid -> true_label from every json of the KB's webdataset shards."""
    out: dict[str, int] = {}
    for tar in sorted(shard_dir.rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tf.extractfile(member))
                    out[meta["uid"]] = int(meta["true_label"])
    return out


def plurality_kept(
    store_img: torch.Tensor, labels: np.ndarray, train_img, train_labels, k: int
) -> np.ndarray:
    """The rule tried first: keep an item where its label is the commonest among its k nearest images."""
    pool = torch.cat([store_img.float(), train_img.float()]).numpy().copy()
    pool_labels = np.concatenate([labels, train_labels.numpy()])
    faiss.normalize_L2(pool)
    _, ids = faiss.knn(pool[: len(labels)], pool, k + 1)
    kept = labels.copy()
    for row, nn in enumerate(ids):
        votes = pool_labels[nn[nn != row][:k]]
        votes = votes[votes >= 0]
        if not len(votes) or np.bincount(votes).argmax() != labels[row]:
            kept[row] = -1
    return kept


def main() -> None:
    root, dataset, kb = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    k = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    ws = Workspace(root)
    train = load_retrieval_features(ws, dataset, kb, k, "train")
    uids = pq.read_table(ws.neighbors_dir(dataset, kb, k) / "store.parquet", columns=["uid"])[
        "uid"
    ].to_pylist()
    truth = true_labels(root / "kb" / kb / "shards")
    labels = train.store_label.numpy().astype(np.int64)
    true = np.array([truth[u] for u in uids], np.int64)
    wrong = (labels >= 0) & (labels != true)
    print(f"{dataset} x {kb}: {len(labels)} store items, {int(wrong.sum())} with a wrong label")
    rules = {
        "2 of 10 (shipped)": knn_agreeing_labels(train.store_img, labels, train.query_img, train.labels),
        f"plurality of {KNN_FILTER_K}": plurality_kept(
            train.store_img, labels, train.query_img, train.labels, KNN_FILTER_K
        ),
    }
    for name, kept in rules.items():
        dropped = (kept < 0) & (labels >= 0)
        found = int((dropped & wrong).sum())
        right_dropped = int((dropped & ~wrong).sum())
        print(
            f"  {name:20s} dropped {int(dropped.sum()):6d}; wrong found {found} "
            f"(recall {found / max(int(wrong.sum()), 1):.2f}); right dropped {right_dropped}; "
            f"wrong kept {int(((kept >= 0) & wrong).sum())} of {int((kept >= 0).sum())}"
        )


if __name__ == "__main__":
    main()
