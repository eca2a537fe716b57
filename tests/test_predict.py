"""Reloading a run's models and `retformer predict` on the small end-to-end run (tests/conftest.py's
`e2e_workspace`: Fashion-MNIST-LT slice, KB = world pool + training split, run `tiny`, k = 4 of the
neighbor tables' 8, feature-mode methods trained for two epochs).

The reference for "what the run predicted" is the evaluation's own path: the reloaded model through
`trainer.train.predict` on the stored test neighbor tables; the first test proves that path reproduces
eval.json's figures exactly, so the later comparisons are against the run's evaluation itself.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.shards import read_shard
from retformer.artifacts.workspace import Workspace
from retformer.trainer.checkpoint import load_model, load_saved_model
from retformer.trainer.evaluate import evaluate
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.train import predict
from tests.conftest import needs_fmnist
from tests.helpers import run_cli

pytestmark = needs_fmnist
torch.set_num_threads(1)

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8


def eval_predictions(ws: Path, method: str, split: str = "test") -> dict[str, int]:
    """uid -> class the run's evaluation gave (the reloaded model on the stored neighbor tables)."""
    f = load_retrieval_features(Workspace(ws), DATASET, KB, TABLE_K, split).subset_k(K)
    classes = predict(load_model(ws / "runs" / RUN / f"{method}.pt"), f).argmax(dim=1)
    return dict(zip(f.uids, classes.tolist(), strict=True))


def test_model_files_reload_to_the_evaluated_models(e2e_workspace: Path):
    """Every trained method's `<method>.pt` reopens with `load_model` alone (no manifest) and reproduces
    the method's eval.json top-1 / top-5 / per-class figures exactly; the file records what prediction
    needs: encoders, KB and index (with its tuned search parameters), class names, k and table depth."""
    report = json.loads((e2e_workspace / "runs" / RUN / "eval.json").read_text())
    trained = ["retformer", "retformer_no_text", "retformer_no_image", "mlp_only", "linear_probe"]
    ws = Workspace(e2e_workspace)
    test = load_retrieval_features(ws, DATASET, KB, TABLE_K, "test").subset_k(K)
    index = json.loads((e2e_workspace / "kb" / KB / "index" / "index.json").read_text())
    for method in trained:
        saved = load_saved_model(e2e_workspace / "runs" / RUN / f"{method}.pt")
        got = evaluate(predict(saved.model, test), test.labels, report["shot_split"])
        for key in ("top1", "top5", "per_class", "many", "medium", "few"):
            assert got[key] == report["methods"][method][key], (method, key)
        info = saved.info
        assert info["method"] == method and info["k"] == K and info["search_k"] == TABLE_K
        assert info["encoders"]["image"]["name"] == "efficientnet_lite0"
        assert info["kb"]["name"] == KB and info["dataset"]["name"] == DATASET
        assert info["index"]["key"] == index["key"] and info["index"]["params"] == index["params"]
        assert "index.json" in info["index"]["params_source"]
        assert len(info["class_names"]) == info["num_classes"] == 10


def test_bare_state_dict_of_an_older_run_is_a_clear_error(e2e_workspace: Path, tmp_path: Path):
    """A `<method>.pt` written before model files were self-describing (a bare state dict) is named as
    such by `load_model`, and `retformer predict` on its run ends with one `error:` line, exit 1."""
    from retformer.artifacts.errors import UserError

    model = load_model(e2e_workspace / "runs" / RUN / "retformer.pt")
    old_run = tmp_path / "runs" / "old"
    old_run.mkdir(parents=True)
    torch.save(model.state_dict(), old_run / "retformer.pt")
    with pytest.raises(UserError, match="bare weights"):
        load_model(old_run / "retformer.pt")
    proc = run_cli("predict", "old", "x.png", "--workdir", str(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bare weights" in lines[0]


def test_predict_five_pngs_equals_the_evaluation(e2e_workspace: Path, tmp_path: Path):
    """`retformer predict RUN` on five PNG files (taken out of the test shard), a corrupt file, a path
    that does not exist and `/dev/zero` (an input that never ends): exit 0, exactly five JSON lines on
    stdout, each with path, class, score, top-5 and the neighbors (uid, caption, similarity); the class
    of each is the one the run's evaluation gave that test image; stderr names each bad input once."""
    shard = sorted((e2e_workspace / "datasets" / DATASET / "shards").glob("test-*.tar"))[0]
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for rec in itertools.islice(read_shard(shard), 5):
        (pngs / f"{rec['uid']}.{rec['image_ext']}").write_bytes(rec["image_bytes"])
    (pngs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "nowhere.png"
    proc = run_cli("predict", RUN, str(pngs), str(missing), "/dev/zero", "--workdir", str(e2e_workspace))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5, proc.stdout
    expected = eval_predictions(e2e_workspace, "retformer")
    for line in lines:
        rec = json.loads(line)
        uid = Path(rec["path"]).stem
        assert rec["class_index"] == expected[uid], uid
        assert (
            rec["class"]
            == json.loads((e2e_workspace / "datasets" / DATASET / "dataset.json").read_text())["class_names"][
                rec["class_index"]
            ]
        )
        assert 0 < rec["score"] <= 1 and rec["top5"][0] == {
            "class": rec["class"],
            "index": rec["class_index"],
            "score": rec["score"],
        }
        assert len(rec["top5"]) == 5 and len(rec["neighbors"]) == K  # --neighbors 5, capped at k
        assert {"uid", "caption", "similarity", "kb_id"} <= set(rec["neighbors"][0])
        sims = [n["similarity"] for n in rec["neighbors"]]
        assert sims == sorted(sims, reverse=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3
    assert "corrupt.png: skipped" in warnings[0] and "nowhere.png: skipped" in warnings[1]
    assert "/dev/zero: skipped (larger than 256 MiB" in warnings[2]  # issue 17 (10): read until MemoryError


@pytest.mark.slow
def test_predict_on_the_test_shards_equals_the_evaluation_sample_by_sample(e2e_workspace: Path, tmp_path):
    """`retformer predict RUN <test shards> --out FILE`: one line per test image; every image gets the
    class the evaluation gave it and exactly its neighbors in the stored test neighbor table (first k,
    same order): the same embedding, the same search, the same model."""
    shards = sorted((e2e_workspace / "datasets" / DATASET / "shards").glob("test-*.tar"))
    out = tmp_path / "preds.jsonl"
    run_dir = e2e_workspace / "runs" / RUN
    proc = run_cli("predict", str(run_dir), *map(str, shards), "--out", str(out), "--neighbors", str(K))
    assert proc.stdout == "" and "predicted 200 image(s)" in proc.stderr
    records = {r["uid"]: r for r in map(json.loads, out.read_text().splitlines())}
    expected = eval_predictions(e2e_workspace, "retformer")
    assert set(records) == set(expected) and len(records) == 200
    assert all(records[u]["class_index"] == c for u, c in expected.items())
    saved = run_dir / "predictions" / "retformer.parquet"  # the evaluation's per-sample file, where written
    if saved.is_file():
        rows = pq.read_table(saved, columns=["uid", "pred"]).to_pylist()
        assert len(rows) == 200 and all(records[r["uid"]]["class_index"] == r["pred"] for r in rows)
    table = pq.read_table(
        e2e_workspace / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}" / "test.parquet"
    ).to_pylist()
    for row in table:
        assert [n["kb_id"] for n in records[row["uid"]]["neighbors"]] == row["nn_id"][:K], row["uid"]


@pytest.mark.slow
def test_predict_picks_a_method_and_refuses_bad_runs(e2e_workspace: Path, tmp_path: Path):
    """--method chooses the model (a retrieval-free one still lists its image's KB neighbors) and a run
    name may be a pattern (run names end in a config hash); a method without a model file, a run that
    does not exist and a folder without model files each end with one `error:` line naming the problem,
    exit 1."""
    shard = sorted((e2e_workspace / "datasets" / DATASET / "shards").glob("test-*.tar"))[0]
    png = tmp_path / "one.png"
    rec = next(iter(read_shard(shard)))
    png.write_bytes(rec["image_bytes"])
    ws = ["--workdir", str(e2e_workspace)]
    proc = run_cli("predict", "tin?", str(png), "--method", "mlp_only", "--neighbors", "2", *ws)
    line = json.loads(proc.stdout)
    assert line["class_index"] == eval_predictions(e2e_workspace, "mlp_only")[rec["uid"]]
    assert len(line["neighbors"]) == 2
    (tmp_path / "empty_run").mkdir()
    for args, message in (
        ([RUN, str(png), "--method", "knn_vote", *ws], "has no model for method 'knn_vote'"),
        (["no_such_run", str(png), *ws], "run not found: no_such_run"),
        ([str(tmp_path / "empty_run"), str(png)], "holds no model files"),
    ):
        proc = run_cli("predict", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0]


@pytest.mark.slow
def test_fine_tuned_model_predicts_what_its_evaluation_gave(e2e_workspace: Path, small_manifests, tmp_path):
    """A fine-tune method's model file (its own trained encoder + head) predicts from the images: on the
    test shards every image gets the class of the run's evaluation (finetune_predict on the shard
    images), while retrieval embeds them with the KB's frozen encoder, as the neighbor tables did."""
    exp = tmp_path / "ft.yaml"
    exp.write_text(
        json.dumps(
            {
                "name": "ft",
                "k": K,
                "eval_split": "test",
                "methods": ["retformer_ft"],
                "model": {"width": 32, "depth": 1, "heads": 2},
                "train": {"epochs": 1, "batch_size": 32, "seed": 0},
                "finetune": {"num_workers": 0},
            }
        )
    )
    m, ws = small_manifests, ["--workdir", str(e2e_workspace)]
    run_cli(
        "train",
        "--dataset",
        str(m["dataset"]),
        "--kb",
        str(m["kb"]),
        "--experiment",
        str(exp),
        "--run",
        "ft",
        *ws,
    )
    saved = load_saved_model(e2e_workspace / "runs" / "ft" / "retformer_ft.pt")
    assert saved.model.config["kind"] == "finetune"
    shards = sorted((e2e_workspace / "datasets" / DATASET / "shards").glob("test-*.tar"))
    out = tmp_path / "ft.jsonl"
    run_cli("predict", "ft", *map(str, shards), "--out", str(out), *ws)
    got = {r["uid"]: r["class_index"] for r in map(json.loads, out.read_text().splitlines())}
    report = json.loads((e2e_workspace / "runs" / "ft" / "eval.json").read_text())["methods"]["retformer_ft"]
    f = load_retrieval_features(Workspace(e2e_workspace), DATASET, KB, TABLE_K, "test")
    top1 = sum(got[u] == int(y) for u, y in zip(f.uids, f.labels, strict=True)) / len(f.uids)
    assert len(got) == 200 and top1 == pytest.approx(report["top1"], abs=1e-6)
    saved_preds = e2e_workspace / "runs" / "ft" / "predictions" / "retformer_ft.parquet"
    if saved_preds.is_file():
        assert all(
            got[r["uid"]] == r["pred"]
            for r in pq.read_table(saved_preds, columns=["uid", "pred"]).to_pylist()
        )
