"""Model selection on val (issue 9): real code paths (run_experiment, trainer/selection.py) on a small
synthetic workspace whose KB neighbours carry class information."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.embeddings_io import EmbeddingTable, table_to_arrow, write_embeddings_part
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.kb_schema import KBManifest, validate_kb
from retformer.pipelines.experiment import run_experiment
from retformer.pipelines.experiment_schema import validate_experiment
from retformer.trainer.baselines import kb_label_problem
from retformer.trainer.checkpoint import load_model
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.model import relevance
from retformer.trainer.selection import SelectOptions, branch_logits, shuffled
from retformer.trainer.train import predict
from tests.helpers import dataset_manifest

SYN = dataset_manifest({"name": "syn", "kind": "imagefolder"})  # the synthetic workspace's dataset

torch.set_num_threads(1)

C, DI, DT, K = 4, 16, 8, 8
SPLITS = {"train": [30, 15, 8, 4], "val": [10] * C, "test": [10] * C}
GRID = {
    "lr_grid": [3e-3, 1e-2],
    "baseline_epochs": 6,
    "retformer_grid": [[3e-3, 0.0], [3e-3, 1.0]],
    "retformer_epochs": 4,
    "knn_k": [1, 4, 8],
}
EXPERIMENT = {
    "name": "syn_select",
    "k": K,
    "eval_split": "test",
    "select_split": "val",
    "recipe": "stacked",
    "select": GRID,
    "methods": ["retformer", "retformer_no_text", "mlp_only", "linear_probe", "knn_vote"],
    "model": {"width": 16, "depth": 1, "heads": 2, "ffn": False, "mlp_hidden": 32},
    "train": {"batch_size": 16, "weight_decay": 0.1, "warmup_epochs": 1, "seed": 0},
    "checkpoint": False,
}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_workspace(
    root: Path, test_labels: np.ndarray | None = None, kb_labels: bool = True, kb_wrong_every: int = 0
) -> Workspace:
    """Dataset `syn` (long-tailed train, balanced val / test; noisy class clusters) and KB `kbsyn` whose
    rows sit near the class centres with class-coded texts; neighbour tables by exact cosine search.
    test_labels replaces the test split's labels (the poisoning test); kb_labels=False writes the KB
    without labels (-1: web pairs, captions only); kb_wrong_every=n labels every n-th KB row with the
    next class (a wrong label, its image and caption those of its true class)."""
    ws = Workspace(root)
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((C, DI)))
    words = _unit(rng.standard_normal((C, DT)))
    kb_lab = np.repeat(np.arange(C), 20)
    kb_img = _unit(centres[kb_lab] + 0.6 * rng.standard_normal((len(kb_lab), DI)) / np.sqrt(DI))
    kb_txt = _unit(words[kb_lab] + 0.3 * rng.standard_normal((len(kb_lab), DT)))
    kb_ids = np.arange(1000, 1000 + len(kb_lab))
    store = EmbeddingTable(
        uid=np.array([f"kb{i}" for i in kb_ids], dtype=object),
        image_emb=kb_img.astype(np.float16),
        text_emb=kb_txt.astype(np.float16),
        has_text=np.ones(len(kb_lab), bool),
        caption=["c"] * len(kb_lab),
        label=(_kb_labels(kb_lab, kb_wrong_every) if kb_labels else np.full_like(kb_lab, -1)).astype(
            np.int32
        ),
        source=["kb"] * len(kb_lab),
    )
    nn_dir = ws.neighbors_dir("syn", "kbsyn", K)
    nn_dir.mkdir(parents=True)
    arrow = table_to_arrow(store)
    arrow = arrow.add_column(0, "kb_id", pa.array(kb_ids, pa.int64())).replace_schema_metadata(
        arrow.schema.metadata
    )
    pq.write_table(arrow, nn_dir / "store.parquet")
    sizes = {}
    for split, counts in SPLITS.items():
        y = np.repeat(np.arange(C), counts)
        # the query image is noisier than the KB's: its neighbours know more than it does
        img = _unit(centres[y] + 1.6 * rng.standard_normal((len(y), DI)) / np.sqrt(DI))
        if split == "test" and test_labels is not None:
            y = test_labels
        uids = np.array([f"{split}{i}" for i in range(len(y))], dtype=object)
        q = EmbeddingTable(
            uid=uids,
            image_emb=img.astype(np.float16),
            text_emb=np.zeros((len(y), DT), np.float16),
            has_text=np.zeros(len(y), bool),
            caption=[None] * len(y),
            label=y.astype(np.int32),
            source=[split] * len(y),
        )
        write_embeddings_part(ws.dataset_embeddings("syn", split) / "part-00000.parquet", q)
        sim = img.astype(np.float16).astype(np.float32) @ kb_img.astype(np.float16).astype(np.float32).T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :K]
        table = pa.table(
            {
                "uid": pa.array(list(uids)),
                "nn_id": pa.FixedSizeListArray.from_arrays(pa.array(kb_ids[top].ravel(), pa.int64()), K),
                "nn_score": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.take_along_axis(sim, top, 1).ravel().astype(np.float32)), K
                ),
            }
        )
        pq.write_table(table, nn_dir / f"{split}.parquet")
        sizes[split] = len(y)
    info = {
        "name": "syn",
        "class_names": [f"c{i}" for i in range(C)],
        "num_classes": C,
        "splits": sizes,
        "train_class_counts": SPLITS["train"],
        "shot_split": {"many": [0], "medium": [1], "few": [2, 3]},
    }
    ws.dataset_info("syn").write_text(json.dumps(info))
    return ws


def _kb_labels(true: np.ndarray, wrong_every: int) -> np.ndarray:
    """The KB's label column: `true`, every `wrong_every`-th row moved to the next class (0: none)."""
    labels = true.copy()
    if wrong_every:
        labels[::wrong_every] = (labels[::wrong_every] + 1) % C
    return labels


def synthetic_kb(source_dataset: str = "syn") -> KBManifest:
    """The synthetic workspace's KB manifest, validated (its encoders are never run here)."""
    encoders = {"image": {"name": "efficientnet_lite0"}}
    kb = {"name": "kbsyn", "source": {"kind": "world", "dataset": source_dataset}, "encoders": encoders}
    return validate_kb(kb, "kbsyn")


def run(root: Path, exp: dict | None = None, kb: KBManifest | None = None, **kw) -> dict:
    ws = write_workspace(root, **kw)
    kb = kb or synthetic_kb()
    exp_m = validate_experiment(exp or EXPERIMENT, "test experiment")
    return run_experiment(ws, SYN, kb, exp_m, root / "runs" / "r", progress=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clean")
    return {"root": root, "report": run(root)}


def test_poisoned_test_labels_change_no_choice_and_no_checkpoint(clean, tmp_path: Path) -> None:
    """Proves no choice reads the test split: with every test label replaced, every selected
    hyper-parameter (lr, epoch, la_tau, alpha, gate, k), every val figure and every saved selected
    checkpoint are the same, bit for bit; only the test figures move."""
    n_test = sum(SPLITS["test"])
    poisoned = run(tmp_path, test_labels=np.random.default_rng(9).integers(0, C, n_test))
    a, b = clean["report"]["methods"], poisoned["methods"]
    assert set(a) == set(b)
    for name in a:
        assert a[name].get("selected") == b[name].get("selected"), name
        assert a[name].get("val") == b[name].get("val"), name
    assert any(a[n]["top1"] != b[n]["top1"] for n in a if "top1" in a[n])  # the poison did land
    for method in ("retformer", "retformer_no_text", "mlp_only", "linear_probe"):
        sa = torch.load(clean["root"] / "runs" / "r" / f"{method}.pt", weights_only=True)["model_state"]
        sb = torch.load(tmp_path / "runs" / "r" / f"{method}.pt", weights_only=True)["model_state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[key], sb[key]) for key in sa), method


def test_results_record_selection_val_test_and_the_shuffled_control(clean) -> None:
    """Proves the report's shape: each method has its selected hyper-parameters, a val figure and a test
    figure; RetFormer variants have a `:shuffled` control row; kNN vote's k comes from its grid."""
    m = clean["report"]["methods"]
    for name in ("retformer", "retformer_no_text", "mlp_only", "linear_probe", "knn_vote"):
        assert "selected" in m[name] and "top1" in m[name]["val"] and "top1" in m[name], name
    assert {"lr", "la_tau", "epoch", "alpha", "gate_t"} <= set(m["retformer"]["selected"])
    assert m["mlp_only"]["selected"]["lr"] in GRID["lr_grid"]
    assert m["knn_vote"]["selected"]["k"] in GRID["knn_k"]
    assert "retformer:shuffled" in m and "retformer_no_text:shuffled" in m
    assert clean["report"]["select_split"] == "val" and clean["report"]["recipe"] == "stacked"


def test_frozen_l_i_is_the_selected_mlp_only_bit_for_bit(clean) -> None:
    """Proves the stacked recipe never trains L_I: the saved RetFormer's mlp.* weights equal the
    selected mlp_only's, and the reloaded model keeps the selected alpha and gate."""
    run_dir = clean["root"] / "runs" / "r"
    mlp = torch.load(run_dir / "mlp_only.pt", weights_only=True)["model_state"]
    for method in ("retformer", "retformer_no_text"):
        rf = torch.load(run_dir / f"{method}.pt", weights_only=True)["model_state"]
        for key, value in mlp.items():
            assert torch.equal(rf[key], value), (method, key)
    model = load_model(run_dir / "retformer.pt")
    sel = clean["report"]["methods"]["retformer"]["selected"]
    assert model.config["alpha"] == sel["alpha"] and model.config["gate_t"] == sel["gate_t"]


def test_reloaded_model_predicts_the_reported_figures(clean) -> None:
    """Proves alpha and the gate live in the checkpoint: the reloaded RetFormer reproduces the reported
    val and test top-1."""
    ws = Workspace(clean["root"])
    model = load_model(clean["root"] / "runs" / "r" / "retformer.pt")
    rep = clean["report"]["methods"]["retformer"]
    for split, expected in (("val", rep["val"]["top1"]), ("test", rep["top1"])):
        f = load_retrieval_features(ws, "syn", "kbsyn", K, split)
        got = float((predict(model, f).argmax(1) == f.labels).float().mean())
        assert got == pytest.approx(expected, abs=1e-9), split


def test_alpha_zero_is_exactly_l_i_and_shuffling_lowers_s(clean) -> None:
    """Proves alpha = 0 predicts exactly L_I (the selected mlp_only's logits, bitwise), and that the
    relevance s is computed from the vectors given: shuffled neighbours score lower."""
    ws = Workspace(clean["root"])
    val = load_retrieval_features(ws, "syn", "kbsyn", K, "val")
    model = load_model(clean["root"] / "runs" / "r" / "retformer.pt")
    mlp = load_model(clean["root"] / "runs" / "r" / "mlp_only.pt")
    # The rule without retrieval (no L_R, no evidence, no prior adjustment on either model): L_I exactly.
    model.set_rule(replace(model.rule, alpha=0.0, beta=0.0, prior_tau=0.0, gate_t=0.5))
    mlp.set_prior_tau(0.0)
    assert torch.equal(predict(model, val), predict(mlp, val))
    li, _, s = branch_logits(model, val)
    assert torch.equal(li, predict(mlp, val))
    b, bs = val.batch(torch.arange(len(val))), shuffled(val, 123).batch(torch.arange(len(val)))
    assert torch.equal(s, relevance(b["z"], b["nn_img"]))
    assert float(relevance(bs["z"], bs["nn_img"]).mean()) < float(s.mean()) - 0.1


def test_knn_vote_skips_a_foreign_label_space(tmp_path: Path) -> None:
    """Proves kNN vote does not vote foreign ids: a KB labelled with another dataset's classes (other
    class names, as Fashion-MNIST's world KB for digits) is skipped with its reason; the same KB
    declared as the dataset's own votes."""
    ws = write_workspace(tmp_path)
    other = {"name": "fm", "class_names": ["t-shirt", "trouser", "pullover", "dress"]}
    (ws.dataset_dir("fm")).mkdir(parents=True)
    ws.dataset_info("fm").write_text(json.dumps(other))
    exp = validate_experiment({**EXPERIMENT, "methods": ["knn_vote"]}, "test experiment")
    kb = synthetic_kb("fm")
    rep = run_experiment(ws, SYN, kb, exp, tmp_path / "runs" / "x", progress=False)
    assert "not of syn" in rep["methods"]["knn_vote"]["skipped"]
    labels = torch.tensor([0, 1, 2, 3])
    names = [f"c{i}" for i in range(C)]
    assert kb_label_problem(labels, C, "syn", names, "syn", None) is None
    assert kb_label_problem(labels, 3, "syn", names, "syn", None) is not None  # out of range
    assert kb_label_problem(labels, C, "syn", names, "other", names) is None  # same class names


def test_bad_selection_manifests_fail_with_one_line() -> None:
    """Proves malformed selection options are user errors, not tracebacks."""
    with pytest.raises(UserError, match="unknown option"):
        SelectOptions.from_manifest({"lr_grd": [1e-3]})
    with pytest.raises(UserError, match="alphas must contain 0"):
        SelectOptions.from_manifest({"alphas": [0.5, 1.0]})


def test_retformer_epochs_per_dataset() -> None:
    """Proves the per-dataset epochs of the demo manifest resolve by dataset name, else `default`, and
    that a mapping without either is refused."""
    opts = SelectOptions.from_manifest({"retformer_epochs": {"default": 30, "digits_lt": 60}})
    assert opts.for_dataset("digits_lt").retformer_epochs == 60
    assert opts.for_dataset("fmnist_lt").retformer_epochs == 30
    with pytest.raises(UserError, match="no entry for dataset x"):
        SelectOptions.from_manifest({"retformer_epochs": {"y": 3}}).for_dataset("x")
    with pytest.raises(UserError, match="retformer_epochs must be"):
        SelectOptions.from_manifest({"retformer_epochs": 0})
