"""The notebook API (`retformer/`): README's "## Python API" example run as written against the small
end-to-end run, and the readers checked against the trainer's own loaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from retformer import load_run, read_embeddings, read_neighbors
from retformer.artifacts.embeddings_io import EmbeddingTable, write_embeddings_part
from retformer.artifacts.embeddings_io import read_embeddings as read_table
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder.kb_schema import IndexSection, validate_kb
from retformer.trainer.checkpoint import load_model
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.train import predict
from tests.conftest import REPO
from tests.helpers import dataset_manifest

SYN = dataset_manifest({"name": "syn", "kind": "imagefolder"})  # the synthetic workspace's dataset

torch.set_num_threads(1)  # tests that need Fashion-MNIST take `e2e_workspace`, which skips without it

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8
CONFIG_LINE = re.compile(r"^WORK, DATASET, KB, RUN = .*$", re.MULTILINE)


def readme_example() -> str:
    """The one python code block of README.md's "## Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the section holds exactly one python example"
    return blocks[0]


def test_readme_python_api_example_runs(e2e_workspace: Path, tmp_path: Path, monkeypatch, capsys):
    """README's example, with only its first line (workspace, dataset, KB, run) pointed at the small run,
    runs to the end: five PNG predictions with neighbors, float32 vectors from the fp16 Parquet, the
    run's test top-1 recomputed from predictions equal to eval.json's, and a neighbor table."""
    code = readme_example()
    assert len(CONFIG_LINE.findall(code)) == 1
    line = f'WORK, DATASET, KB, RUN = Path({str(e2e_workspace)!r}), "{DATASET}", "{KB}", "{RUN}"'
    monkeypatch.chdir(tmp_path)
    exec(compile(CONFIG_LINE.sub(line, code), "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 5
    assert out.count("pngs/") == 5, out
    assert "float32 (200, 1280)" in out
    got, reported = re.search(r"top-1 (\S+), eval\.json (\S+)", out).groups()
    assert got == reported, out
    assert "nn_caption" in out


def test_read_embeddings_decodes_the_fp16_bytes(e2e_workspace: Path):
    """pandas alone shows the vectors as bytes; read_embeddings gives float32 vectors equal to the stored
    fp16 values, None for missing text, and in a KB folder the row number is the kb_id (checked against
    the neighbor store's kb_id column)."""
    kb_dir = e2e_workspace / "kb" / KB / "embeddings"
    raw = pq.read_table(sorted(kb_dir.glob("part-*.parquet"))[0]).to_pandas()
    assert isinstance(raw.image_emb[0], bytes)
    frame, table = read_embeddings(kb_dir), read_table(kb_dir)
    assert frame.image_emb[0].dtype == np.float32 and frame.image_emb[0].shape == (table.image_dim,)
    np.testing.assert_array_equal(np.stack(frame.image_emb), table.image_emb.astype(np.float32))
    np.testing.assert_array_equal(np.stack(frame.text_emb), table.text_emb.astype(np.float32))
    assert frame.uid.tolist() == table.uid.tolist() and frame.label.tolist() == table.label.tolist()
    store = read_embeddings(
        e2e_workspace / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}" / "store.parquet"
    )
    rows = frame.iloc[store.kb_id.to_numpy()]
    assert rows.uid.tolist() == store.uid.tolist()
    np.testing.assert_array_equal(np.stack(rows.image_emb), np.stack(store.image_emb))
    test = read_embeddings(e2e_workspace / "datasets" / DATASET / "embeddings" / "test")
    assert test.text_emb.isna().all(), "test images have no caption: None, not a zero vector"


def test_read_neighbors_matches_the_trainers_features(e2e_workspace: Path):
    """read_neighbors cut to k = 4 from the k = 8 table gives, per query, the neighbors (uids, scores) and
    the label the trainer's load_retrieval_features gathers; an unavailable k is a UserError."""
    ws = Workspace(e2e_workspace)
    frame = read_neighbors(e2e_workspace, DATASET, KB, k=K, split="test")
    f = load_retrieval_features(ws, DATASET, KB, TABLE_K, "test").subset_k(K)
    store = read_table(
        e2e_workspace / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}" / "store.parquet"
    )
    by_uid = frame.set_index("uid")
    for i, uid in enumerate(f.uids):
        row = by_uid.loc[uid]
        assert row["nn_uid"] == store.uid[f.nn_rows[i].numpy()].tolist()
        np.testing.assert_array_equal(row["nn_score"], f.nn_score[i].numpy())
        assert row["label"] == int(f.labels[i]) and len(row["nn_kb_id"]) == K
    with pytest.raises(UserError, match="no neighbor table with k >= 64"):
        read_neighbors(e2e_workspace, DATASET, KB, k=64, split="test")


def test_run_predict_on_embeddings_keeps_the_querys_own_kb_row_out(e2e_workspace: Path):
    """The training split is inside the KB. Run.predict on its embeddings frame (with uids) retrieves
    exactly the stored train neighbor table (own row excluded) and gives the classes the evaluation path
    gives; the bare vectors (no uids) instead find the image itself first (similarity 1)."""
    run = load_run(RUN, workdir=e2e_workspace)
    train = read_embeddings(e2e_workspace / "datasets" / DATASET / "embeddings" / "train")
    preds = run.predict(embeddings=train, neighbors=K)
    f = load_retrieval_features(Workspace(e2e_workspace), DATASET, KB, TABLE_K, "train").subset_k(K)
    expected = predict(load_model(e2e_workspace / "runs" / RUN / "retformer.pt"), f).argmax(dim=1)
    assert preds.uid.tolist() == f.uids
    assert preds.class_index.tolist() == expected.tolist()
    table = pq.read_table(
        e2e_workspace / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}" / "train.parquet"
    )
    stored = dict(zip(table.column("uid").to_pylist(), table.column("nn_id").to_pylist(), strict=True))
    for uid, nn in zip(preds.uid, preds.neighbors, strict=True):
        assert [n["kb_id"] for n in nn] == stored[uid][:K]
    bare = run.predict(embeddings=np.stack(train.image_emb[:3]), neighbors=1)
    assert [n[0]["uid"] for n in bare.neighbors] == train.uid[:3].tolist()
    assert all(n[0]["similarity"] > 0.999 for n in bare.neighbors)


def _synthetic_workspace(root: Path, c: int = 4, di: int = 16, dt: int = 8) -> Workspace:
    """Dataset `syn` (train long-tailed, val and test balanced) and KB `kbsyn` (rows near the class
    centres, class-coded texts) as embeddings parts, so that the real index and neighbors stages run."""
    ws, rng = Workspace(root), np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    centres, words = unit(rng.standard_normal((c, di))), unit(rng.standard_normal((c, dt)))

    def part(path: Path, y: np.ndarray, img: np.ndarray, txt: np.ndarray | None, prefix: str) -> None:
        write_embeddings_part(
            path,
            EmbeddingTable(
                uid=np.array([f"{prefix}{i}" for i in range(len(y))], dtype=object),
                image_emb=img.astype(np.float16),
                text_emb=(txt if txt is not None else np.zeros((len(y), dt))).astype(np.float16),
                has_text=np.full(len(y), txt is not None),
                caption=[f"a {v}" if txt is not None else None for v in y],
                label=y.astype(np.int32),
                source=[prefix] * len(y),
            ),
        )

    kb_y = np.repeat(np.arange(c), 30)
    kb_img = unit(centres[kb_y] + 0.6 * rng.standard_normal((len(kb_y), di)) / np.sqrt(di))
    kb_txt = unit(words[kb_y] + 0.3 * rng.standard_normal((len(kb_y), dt)))
    part(ws.kb_embeddings("kbsyn") / "part-00000.parquet", kb_y, kb_img, kb_txt, "kb")
    sizes = {"train": [40, 20, 8, 4], "val": [12] * c, "test": [12] * c}
    for split, counts in sizes.items():
        y = np.repeat(np.arange(c), counts)
        img = unit(centres[y] + 1.6 * rng.standard_normal((len(y), di)) / np.sqrt(di))
        part(ws.dataset_embeddings("syn", split) / "part-00000.parquet", y, img, None, split)
    info = {
        "name": "syn",
        "class_names": [f"c{i}" for i in range(c)],
        "num_classes": c,
        "splits": {s: sum(n) for s, n in sizes.items()},
        "train_class_counts": sizes["train"],
        "shot_split": {"many": [0], "medium": [1], "few": [2, 3]},
    }
    ws.dataset_info("syn").parent.mkdir(parents=True, exist_ok=True)
    ws.dataset_info("syn").write_text(json.dumps(info))
    return ws


def test_stacked_run_predicts_what_its_evaluation_reported(tmp_path: Path):
    """The demo's recipe (stacked: frozen selected mlp_only as L_I, alpha and gate chosen on val) through
    the real index (HNSW, search parameters tuned by the index stage), neighbors and experiment code:
    the saved model file alone (load_run, then predict on the test embeddings) gives the test top-1
    eval.json reports and the evaluation path's class for every sample, with the selected alpha / gate."""
    from retformer.kb_builder.index import run_index
    from retformer.kb_builder.neighbors import run_neighbors
    from retformer.pipelines.experiment import run_experiment
    from retformer.pipelines.experiment_schema import validate_experiment

    ws = _synthetic_workspace(tmp_path)
    index_cfg = IndexSection(kind="hnsw", recall_target=0.9, k=8, num_queries=100)
    record = run_index(ws.kb_embeddings("kbsyn"), ws.kb_index("kbsyn"), index_cfg)
    assert record["params"], "the index stage tuned a search parameter (efSearch)"
    queries = {s: ws.dataset_embeddings("syn", s) for s in ("train", "val", "test")}
    run_neighbors(
        ws.kb_index("kbsyn"), ws.kb_embeddings("kbsyn"), queries, ws.neighbors_dir("syn", "kbsyn", 8), 8
    )
    kb = validate_kb(
        {
            "name": "kbsyn",
            "source": {"kind": "webdataset", "path": "-"},
            "encoders": {"image": {"name": "efficientnet_lite0"}},
        },
        "kbsyn",
    )
    exp = {
        "name": "syn_stacked",
        "k": 8,
        "eval_split": "test",
        "select_split": "val",
        "recipe": "stacked",
        "methods": ["retformer", "mlp_only"],
        "select": {
            "lr_grid": [1e-2],
            "baseline_epochs": 5,
            "retformer_grid": [[1e-2, 0.0]],
            "retformer_epochs": 15,
            # a retrieval rule with a gate (alpha 1, t = val's 10% quantile of s) that may lose any amount
            # under shuffled neighbours: the rule predict must reproduce is then the gated one, not L_I
            "alphas": [0.0, 1.0],
            "gate_quantiles": [0.1],
            "tolerance": 100.0,
            # the rule of this test is alpha L_R alone (no evidence term, no prior adjustment), chosen
            # by top-1 as when it was written; tests/test_evidence.py covers the rule with them
            "betas": [0.0],
            "prior_taus": [0.0],
            "select_metric": "top1",
        },
        "model": {"width": 16, "depth": 1, "heads": 2, "ffn": False, "mlp_hidden": 32},
        "train": {"batch_size": 16, "seed": 0},
        "checkpoint": False,
    }
    exp_m = validate_experiment(exp, "test experiment")
    report = run_experiment(ws, SYN, kb, exp_m, tmp_path / "runs" / "r", progress=False)
    run = load_run(tmp_path / "runs" / "r")
    selected = report["methods"]["retformer"]["selected"]
    assert selected["alpha"] == 1.0 and selected["gate_t"] is not None, selected
    assert run.model.config["alpha"] == selected["alpha"] and run.model.config["gate_t"] == selected["gate_t"]
    assert run.info["index"]["params"] == record["params"]
    test = read_embeddings(ws.dataset_embeddings("syn", "test"))
    preds = run.predict(embeddings=test)
    top1 = float(torch.tensor(preds.class_index.to_numpy() == test.label.to_numpy()).float().mean())
    assert top1 == report["methods"]["retformer"]["top1"]
    f = load_retrieval_features(ws, "syn", "kbsyn", 8, "test")
    assert preds.class_index.tolist() == predict(run.model, f).argmax(dim=1).tolist()
