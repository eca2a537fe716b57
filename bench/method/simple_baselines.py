"""Simple baselines the demo does not print, on the demo's own embeddings, as a reader would run them with
scikit-learn: a logistic regression (C and class weighting on val), an RBF SVM (C on val, balanced class
weights; skipped above 5,000 training rows) and a kNN vote over the training images and the labelled KB
items (k on val, exp(cos / 0.07) weights). Training data = train + the neighbour store's items labelled
with the dataset's classes, what `kb_episodes` gives the trained methods; with `--train-only`, train alone.
Every choice by val balanced accuracy; test top-1 and few printed once, one JSON line per baseline.

`--with-val` is what a reader would run on the whole training folder when val is a hold-out of it: val
joins the training data (the trained methods never see it), nothing is chosen, each baseline at a setting
fixed beforehand (scikit-learn's default C = 1, with and without balanced class weights; kNN k = 10).

    python bench/method/simple_baselines.py WORKDIR DATASET KB [--train-only] [--with-val]
    python bench/method/simple_baselines.py /tmp/demo_time digits_lt digits_world
"""

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from retformer.artifacts.workspace import Workspace
from retformer.trainer.features import load_retrieval_features

root, dataset, kb = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
train_only = "--train-only" in sys.argv[4:]
with_val = "--with-val" in sys.argv[4:]
ws = Workspace(root)
info = json.loads(ws.dataset_info(dataset).read_text())
few = np.array(info["shot_split"]["few"])
splits = {s: load_retrieval_features(ws, dataset, kb, 32, s) for s in ("train", "val", "test")}


def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    f = splits[split]
    z = f.query_img.numpy().astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True), f.labels.numpy()


x_train, y_train = arrays("train")
(x_val, y_val), (x_test, y_test) = arrays("val"), arrays("test")
store = splits["train"]
labelled = (store.store_label >= 0) & (store.store_label < info["num_classes"])
if not train_only and bool(labelled.any()):
    kb_z = store.store_img[labelled].numpy().astype(np.float32)
    x_train = np.concatenate([x_train, kb_z / np.linalg.norm(kb_z, axis=1, keepdims=True)])
    y_train = np.concatenate([y_train, store.store_label[labelled].numpy()])
if with_val:
    x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
classes = int(info["num_classes"])


def balanced(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


def report(name: str, predict, grid: list) -> None:
    """The grid value with the best val balanced accuracy (ties: the earlier), then test once; with
    --with-val the grid is one setting fixed beforehand, and val (trained on) scores nothing."""
    scores = [None] if with_val else [balanced(predict(g, x_val), y_val) for g in grid]
    choice = grid[0] if with_val else grid[int(np.argmax(scores))]
    pred = predict(choice, x_test)
    in_few = np.isin(y_test, few)
    row = {
        "workdir": str(root),
        "dataset": dataset,
        "kb": kb,
        "train": ("train" if train_only else "train+kb") + ("+val" if with_val else ""),
        "train_rows": len(y_train),
        "baseline": name,
        "choice": choice,
        "val_balanced": None if with_val else round(max(scores) * 100, 2),
        "test_top1": round(float(np.mean(pred == y_test)) * 100, 2),
        "test_few": round(float(np.mean(pred[in_few] == y_test[in_few])) * 100, 2) if in_few.any() else None,
    }
    print(json.dumps(row), flush=True)


fitted: dict = {}


def logreg(g, x):
    if ("lr", g) not in fitted:
        fitted["lr", g] = LogisticRegression(C=g[0], class_weight=g[1], max_iter=3000).fit(x_train, y_train)
    return fitted["lr", g].predict(x)


def svm(c, x):
    if ("svm", c) not in fitted:
        fitted["svm", c] = SVC(C=c, kernel="rbf", class_weight="balanced").fit(x_train, y_train)
    return fitted["svm", c].predict(x)


def knn(k, x):
    sims = x @ x_train.T
    top = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(x), classes))
    rows = np.repeat(np.arange(len(x)), k)
    np.add.at(votes, (rows, y_train[top].ravel()), np.exp(np.take_along_axis(sims, top, 1).ravel() / 0.07))
    return votes.argmax(1)


if with_val:  # fixed settings: scikit-learn's defaults, both class weightings reported
    report("sklearn_logreg", logreg, [(1.0, None)])
    report("sklearn_logreg_balanced", logreg, [(1.0, "balanced")])
    report("knn_train_kb", knn, [10])
    if len(y_train) <= 5000:
        report("svm_rbf", svm, [1.0])
else:
    report("sklearn_logreg", logreg, [(c, w) for c in (0.1, 1.0, 10.0, 100.0) for w in (None, "balanced")])
    report("knn_train_kb", knn, [1, 3, 5, 10, 20, 50])
    if len(y_train) <= 5000:
        report("svm_rbf", svm, [1.0, 10.0, 100.0])
