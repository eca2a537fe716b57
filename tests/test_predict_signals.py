"""What `retformer predict` records say about retrieval (pipelines/relevance.py) and labelled inputs:
`mean_similarity` (s), `retrieval_used`, `ood` against the run's val threshold, and the true label with
the accuracy summary. Runs: the small end-to-end run `tiny` (tests/conftest.py's `e2e_workspace`, recipe
paper) and a synthetic stacked run with a gate (tests/test_python_api.py's workspace)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retformer import load_run, read_embeddings
from retformer.artifacts.shards import read_shard
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.kb_schema import IndexSection, validate_kb
from retformer.pipelines.relevance import OOD_PERCENTILE
from retformer.pipelines.use.predictor import Predictor
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.model import relevance
from tests.conftest import needs_fmnist
from tests.helpers import dataset_manifest, run_cli

SYN = dataset_manifest({"name": "syn", "kind": "imagefolder"})  # the synthetic workspace's dataset

torch.set_num_threads(1)

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8


def split_s(ws: Workspace, dataset: str, kb: str, table_k: int, k: int, split: str) -> dict[str, float]:
    """uid -> s of a split, from its stored neighbour table, by the model's own `relevance` at once."""
    f = load_retrieval_features(ws, dataset, kb, table_k, split).subset_k(k)
    s = relevance(f.query_img.float(), f.store_img[f.nn_rows].float())
    return dict(zip(f.uids, s.tolist(), strict=True))


@needs_fmnist
def test_records_carry_s_retrieval_used_and_ood_against_the_run_threshold(e2e_workspace: Path):
    """On the run's test embeddings: each record's mean_similarity is s of its stored neighbours (the
    value the model's gate reads), ood is exactly s < percentile 1 of s over the reference split
    (computed as the stacked rule's gate quantiles are, torch.quantile; this dataset has no val split,
    so it is train, self-matches excluded as in training), retrieval_used is true for every image under
    the paper recipe and false for mlp_only; the embeddings' labels become label / correct."""
    ws = Workspace(e2e_workspace)
    assert not (e2e_workspace / "datasets" / DATASET / "embeddings" / "val").exists()
    val_s = torch.tensor(list(split_s(ws, DATASET, KB, TABLE_K, K, "train").values()))
    threshold = float(torch.quantile(val_s, OOD_PERCENTILE / 100))
    test = read_embeddings(ws.dataset_embeddings(DATASET, "test"))
    expected_s = split_s(ws, DATASET, KB, TABLE_K, K, "test")
    for method, used in (("retformer", True), ("mlp_only", False)):
        run = load_run(RUN, method, e2e_workspace, device="cpu")
        assert run._predictor.ood_threshold().split == "train"
        assert run.ood_threshold is not None and abs(run.ood_threshold - threshold) < 1e-6
        preds = run.predict(embeddings=test, neighbors=0)
        for row in preds.itertuples():
            assert abs(row.mean_similarity - expected_s[row.uid]) < 1e-5, row.uid
            assert row.ood == (expected_s[row.uid] < run.ood_threshold), row.uid
            assert row.retrieval_used is used
        assert preds.label.tolist() == test.label.tolist()
        assert preds.correct.tolist() == (preds.class_index == preds.label).tolist()
    assert 0 < (val_s < threshold).sum() <= 0.02 * len(val_s) + 1  # ~1% of the split by construction


def test_stacked_gate_retrieval_used_is_what_the_rule_applied(tmp_path: Path):
    """A stacked run whose val-selected rule gates retrieval (alpha 1, t = val's 10% quantile of s):
    retrieval_used is s > gate_t image by image, and where it is false the class is L_I's alone, where
    true L_I + L_R's, so the flag tells what the model did; with alpha = beta = 0 it is false for all."""
    from retformer.kb_builder.index import run_index
    from retformer.kb_builder.neighbors import run_neighbors
    from retformer.pipelines.experiment import run_experiment
    from retformer.pipelines.experiment_schema import validate_experiment
    from tests.test_python_api import _synthetic_workspace

    ws = _synthetic_workspace(tmp_path)
    run_index(ws.kb_embeddings("kbsyn"), ws.kb_index("kbsyn"), IndexSection(kind="flat", k=8))
    queries = {s: ws.dataset_embeddings("syn", s) for s in ("train", "val", "test")}
    run_neighbors(
        ws.kb_index("kbsyn"), ws.kb_embeddings("kbsyn"), queries, ws.neighbors_dir("syn", "kbsyn", 8), 8
    )
    select = {
        "lr_grid": [1e-2],
        "baseline_epochs": 5,
        "retformer_grid": [[1e-2, 0.0]],
        "retformer_epochs": 15,
        "alphas": [0.0, 1.0],
        "gate_quantiles": [0.1],
        "tolerance": 100.0,  # the gated rule is kept whatever the shuffled control says
        "betas": [0.0],
        "prior_taus": [0.0],
        "select_metric": "top1",
    }
    exp = {
        "name": "syn_gate",
        "k": 8,
        "eval_split": "test",
        "select_split": "val",
        "recipe": "stacked",
        "methods": ["retformer", "mlp_only"],
        "select": select,
        "model": {"width": 16, "depth": 1, "heads": 2, "ffn": False, "mlp_hidden": 32},
        "train": {"batch_size": 16, "seed": 0},
        "checkpoint": False,
    }
    kb = validate_kb(
        {
            "name": "kbsyn",
            "source": {"kind": "webdataset", "path": "-"},
            "encoders": {"image": {"name": "efficientnet_lite0"}},
        },
        "kbsyn",
    )
    exp_m = validate_experiment(exp, "test experiment")
    run_experiment(ws, SYN, kb, exp_m, tmp_path / "runs" / "r", progress=False)
    predictor = Predictor.open(tmp_path / "runs" / "r", device="cpu")
    gate_t = predictor.model.config["gate_t"]
    assert gate_t is not None and predictor.model.config["alpha"] == 1.0
    test = read_embeddings(ws.dataset_embeddings("syn", "test"))
    z = np.stack(test.image_emb)
    records = predictor.predict_embeddings(z, test.uid.tolist())
    s = split_s(ws, "syn", "kbsyn", 8, 8, "test")
    used = [r["retrieval_used"] for r in records]
    assert used == [s[u] > gate_t for u in test.uid] and 0 < sum(used) < len(used)
    features, _, _ = predictor.retrieve(z.astype(np.float16), test.uid.tolist())
    b = features.batch(torch.arange(len(features)))
    with torch.inference_mode():
        l_i, l_r = predictor.model.branches(b["z"], b["nn_img"], b["nn_txt"])
    for rec, li, lr in zip(records, l_i, l_r, strict=True):
        assert rec["class_index"] == int((li + lr).argmax() if rec["retrieval_used"] else li.argmax())
    # the rule without a retrieval term: never used, whatever s
    predictor.model.set_rule(replace(predictor.model.rule, alpha=0.0, beta=0.0))
    assert not any(r["retrieval_used"] for r in predictor.predict_embeddings(z, test.uid.tolist()))
    # the threshold is the val split's (the run's select_split), percentile 1
    val_s = torch.tensor(list(split_s(ws, "syn", "kbsyn", 8, 8, "val").values()))
    assert predictor.ood_threshold().split == "val"
    assert abs(predictor.ood_threshold().value - float(torch.quantile(val_s, 0.01))) < 1e-6


@needs_fmnist
@pytest.mark.slow
def test_predict_labelled_shards_prints_the_accuracy_of_the_evaluation(e2e_workspace: Path, tmp_path: Path):
    """`retformer predict RUN <test shards> --json`: every record carries its shard label and whether the
    class is correct; stderr ends with `accuracy X% (c of 200 labelled images)` and the output's last
    line is the summary, whose accuracy is eval.json's top-1 (the same images, the same classes). A
    PNG (no label) gets label null and no accuracy line."""
    shards = sorted((e2e_workspace / "datasets" / DATASET / "shards").glob("test-*.tar"))
    ws = ["--workdir", str(e2e_workspace)]
    proc = run_cli("predict", RUN, *map(str, shards), "--json", "--neighbors", "0", *ws)
    *lines, last = proc.stdout.strip().splitlines()
    records = [json.loads(line) for line in lines]
    truth = {rec["uid"]: rec["label"] for s in shards for rec in read_shard(s)}
    assert len(records) == len(truth) == 200
    for rec in records:
        assert rec["label"] == truth[rec["uid"]] and rec["label_class"] is not None
        assert rec["correct"] == (rec["class_index"] == rec["label"])
    summary = json.loads(last)["summary"]
    top1 = json.loads((e2e_workspace / "runs" / RUN / "eval.json").read_text())["methods"]["retformer"][
        "top1"
    ]
    correct = sum(r["correct"] for r in records)
    assert summary["labelled"] == 200 and summary["correct"] == correct and summary["run"] == RUN
    assert abs(summary["accuracy"] - top1) < 1e-6
    assert summary["ood"] == sum(r["ood"] for r in records) and summary["retrieval_used"] == 200
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"accuracy {100 * top1:.2f}% ({correct} of 200 labelled images)"
    )
    png = tmp_path / "one.png"
    png.write_bytes(next(iter(read_shard(shards[0])))["image_bytes"])
    proc = run_cli("predict", RUN, str(png), *ws)
    rec = json.loads(proc.stdout)
    assert rec["label"] is None and rec["correct"] is None and isinstance(rec["ood"], bool)
    assert "accuracy" not in proc.stderr and "summary" not in proc.stdout
