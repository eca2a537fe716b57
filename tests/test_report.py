"""The run report (issue 11 items 4 and 7): eval.json's macro-F1, worst class and per-sample predictions,
report.html with its figures, run names with a config hash and the refusal to overwrite another
configuration. Real code paths (`stage_train` on tests/test_selection.py's synthetic workspace)."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.errors import UserError
from retformer.kb_builder.kb_schema import validate_kb
from retformer.pipelines import stages
from retformer.pipelines.experiment_schema import ExperimentManifest, validate_experiment
from retformer.pipelines.runs import (
    check_overwrite,
    checkout_version,
    code_version,
    config_hash,
    default_run_name,
)
from retformer.trainer.evaluate import evaluate, prediction_table
from tests.helpers import dataset_manifest
from tests.test_selection import EXPERIMENT, write_workspace

torch.set_num_threads(1)

DS_GIVEN = {"name": "syn", "kind": "imagefolder", "_manifest_path": "/somewhere/syn.yaml"}
DS = dataset_manifest(DS_GIVEN)
KB = validate_kb(
    {
        "name": "kbsyn",
        "source": {"kind": "world", "dataset": "syn"},
        "encoders": {"image": {"name": "efficientnet_lite0"}},
        "_manifest_path": "/x/kbsyn.yaml",
    },
    "/x/kbsyn.yaml",
)
# The selection experiment at its smallest grid, swept over k = 4 and 8 (k-sweep names: retformer@k4).
SWEEP = {
    **copy.deepcopy(EXPERIMENT),
    "name": "syn_sweep",
    "k_values": [4, 8],
    "methods": ["retformer", "mlp_only", "knn_vote"],
    "select": {**EXPERIMENT["select"], "lr_grid": [1e-2], "retformer_grid": [[3e-3, 0.0]]},
}
SWEEP.pop("k")


def _exp(spec: dict) -> ExperimentManifest:
    return validate_experiment(spec, "test experiment")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One finished `stage_train` run of SWEEP under its default name."""
    root = tmp_path_factory.mktemp("report")
    ws = write_workspace(root)
    report = stages.stage_train(ws, DS, KB, _exp(SWEEP))
    return {"ws": ws, "report": report, "dir": ws.run_dir(report["run"])}


def test_macro_f1_and_worst_class_hand_example() -> None:
    """Labels 0 0 1 1 2, predictions 0 1 1 1 0 (class 3: neither a label nor a prediction): per-class F1
    0.5, 0.8, 0 -> macro-F1 0.4333 (class 3 left out); worst class accuracy 0 at class 2; with no
    sample of a class, it is not the worst."""
    scores = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 4).float()
    m = evaluate(scores, [0, 0, 1, 1, 2])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert (m["worst_class"], m["worst_class_index"]) == (0.0, 2)
    m = evaluate(torch.eye(3)[[0, 0, 1]], [0, 0, 1])
    assert (m["worst_class"], m["worst_class_index"], m["macro_f1"]) == (1.0, 0, 1.0)


def test_macro_f1_equals_scikit_learns_on_random_labels() -> None:
    """The counted macro-F1 is scikit-learn's `f1_score(average="macro", zero_division=0)` on random
    labels and predictions, with classes missing from either side."""
    from sklearn.metrics import f1_score

    from retformer.trainer.evaluate import _macro_f1

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, c = 1 + trial * 7, 2 + trial % 9
        y = torch.randint(0, c, (n,), generator=gen)
        pred = torch.randint(0, c + 2, (n,), generator=gen)  # predictions may name classes no label has
        want = f1_score(y.numpy(), pred.numpy(), average="macro", zero_division=0)
        assert _macro_f1(y, pred) == pytest.approx(want, abs=1e-12)


def test_prediction_table_rows() -> None:
    """One row per sample in input order: argmax prediction (ties to the lower class), its raw score and
    softmax probability, correct, and the true label's shot group; lengths must agree."""
    scores = torch.tensor([[2.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0]])
    t = prediction_table(scores, [1, 2, 2], ["a", "b", "c"], {"many": [0], "medium": [1], "few": [2]})
    assert t.column_names == ["index", "uid", "label", "pred", "score", "prob", "correct", "shot_group"]
    rows = t.to_pylist()
    assert [r["pred"] for r in rows] == [0, 2, 0]
    assert [r["correct"] for r in rows] == [False, True, False]
    assert [r["shot_group"] for r in rows] == ["medium", "few", "few"]
    assert rows[1]["score"] == 3.0
    assert rows[1]["prob"] == pytest.approx(float(torch.softmax(scores[1], 0)[2]))
    with pytest.raises(ValueError, match="do not match"):
        prediction_table(scores, [1, 2], ["a", "b", "c"])


def test_eval_json_predictions_agree_with_the_metrics(run) -> None:
    """Every result (the k sweep's, the shuffled controls, kNN) has macro_f1, worst_class and a Parquet
    file whose rows give back its top-1 and its many / medium / few accuracies, with the test uids."""
    report, run_dir = run["report"], run["dir"]
    assert set(report["methods"]) >= {"retformer@k4", "retformer@k8", "retformer@k4:shuffled", "mlp_only"}
    test_uids = [f"test{i}" for i in range(report["eval_size"])]
    for name, m in report["methods"].items():
        assert 0 <= m["macro_f1"] <= 1 and m["worst_class"] <= m["top1"], name
        table = pq.read_table(run_dir / m["predictions"]).to_pandas()
        assert table["uid"].tolist() == test_uids
        assert table["correct"].mean() == pytest.approx(m["top1"])
        assert (table["pred"] == table["label"]).tolist() == table["correct"].tolist()
        for group in ("many", "medium", "few"):
            assert table[table.shot_group == group]["correct"].mean() == pytest.approx(m[group]), (
                name,
                group,
            )


def test_results_summary_carries_the_new_metrics(run) -> None:
    """results.json's form of a run (the demo writes it) has macro_f1 and worst_class per method."""
    from retformer.pipelines.results import results_summary

    summary = results_summary(run["report"])["methods"]
    for name, m in run["report"]["methods"].items():
        assert summary[name]["macro_f1"] == m["macro_f1"] and summary[name]["worst_class"] == m["worst_class"]


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r"alt='([^']*)' src='data:image/png;base64,([^']*)'", page)
    return {title: base64.b64decode(data) for title, data in found}


def test_report_html_is_self_contained_with_its_figures(run) -> None:
    """report.html holds the results table and, as inline PNGs, the long-tail figure, the per-epoch
    curves (one line per fit of the selection grid, from the metrics files), the k sweep and the
    confusion matrix; it loads nothing from elsewhere."""
    page = (run["dir"] / "report.html").read_text()
    images = _images(page)
    assert list(images) == [
        "The long tail",
        "Retrieval quality",
        "Training",
        "Effect of k",
        "Confusion matrix",
    ]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000 for png in images.values())
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "only inline images"
    for name in run["report"]["methods"]:
        assert f"<td>{name}</td>" in page
    metrics = [json.loads(line) for line in (run["dir"] / "retformer-k4.metrics.jsonl").open()]
    assert {e["fit"] for e in metrics} == {1} and len(metrics) == SWEEP["select"]["retformer_epochs"]
    assert all("val_top1_0.0" in e and e["fit_config"]["lr"] == 3e-3 for e in metrics)
    mlp = [json.loads(line) for line in (run["dir"] / "mlp_only.metrics.jsonl").open()]
    assert len(mlp) == SWEEP["select"]["baseline_epochs"], "mlp_only trained once, logged once"


def test_report_compares_knowledge_bases_when_runs_exist(run, tmp_path) -> None:
    """A finished run of the same dataset and experiment with another KB in the runs folder adds the
    KB comparison figure; a run of another experiment does not."""
    from retformer.pipelines.report import build_html, sibling_runs

    runs = tmp_path / "runs"
    here = runs / "a"
    here.mkdir(parents=True)
    report = copy.deepcopy(run["report"])
    for name, kb, experiment in (("b", "kb_other", report["experiment"]), ("c", "kb_third", "other_exp")):
        other = {**copy.deepcopy(report), "kb": kb, "experiment": experiment}
        (runs / name).mkdir()
        (runs / name / "eval.json").write_text(json.dumps(other))
    assert list(sibling_runs(here, report)) == ["kb_other", "kbsyn"]
    assert "Choice of knowledge base" in _images(build_html(here, report))


def test_run_name_hashes_the_resolved_manifests() -> None:
    """The default run name ends with 8 hex digits of the manifests after overrides: where a manifest
    was read from does not count, a changed value does."""
    name = default_run_name(DS, KB, _exp(SWEEP))
    assert re.fullmatch(r"syn-kbsyn-syn_sweep-[0-9a-f]{8}", name)
    moved = dataset_manifest({**DS_GIVEN, "_manifest_path": "/elsewhere/syn.yaml"})
    assert config_hash(moved, KB, _exp(SWEEP)) == config_hash(DS, KB, _exp(SWEEP))
    changed = copy.deepcopy(SWEEP)
    changed["train"]["batch_size"] = 8
    assert config_hash(DS, KB, _exp(changed)) != config_hash(DS, KB, _exp(SWEEP))


def test_finished_run_of_another_config_is_refused_unless_forced(run, tmp_path) -> None:
    """Under an explicit run name, a finished run of another configuration is refused with one line
    and left as it was; the same configuration reruns; `force` replaces it. The latest run is what
    `retformer evaluate` shows."""
    ws = write_workspace(tmp_path)
    small = {**copy.deepcopy(SWEEP), "k_values": [4], "methods": ["knn_vote"]}
    first = stages.stage_train(ws, DS, KB, _exp(small), run="mine")
    before = (ws.run_dir("mine") / "eval.json").read_bytes()
    other = {**small, "select": {**small["select"], "knn_k": [1]}}
    with pytest.raises(UserError) as err:
        stages.stage_train(ws, DS, KB, _exp(other), run="mine")
    assert "already holds a finished run of another configuration" in str(err.value)
    assert "--force" in str(err.value) and "\n" not in str(err.value)
    assert (ws.run_dir("mine") / "eval.json").read_bytes() == before
    assert stages.stage_train(ws, DS, KB, _exp(small), run="mine")["config_hash"] == first["config_hash"]
    forced = stages.stage_train(ws, DS, KB, _exp(other), run="mine", force=True)
    assert forced["config_hash"] == config_hash(DS, KB, _exp(other)) != first["config_hash"]
    name, shown = stages.stage_evaluate(ws)
    assert name == "mine" and shown["config_hash"] == forced["config_hash"]


def test_a_run_reused_from_other_code_says_so(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The config hash leaves the code out, so a finished run is reused after an upgrade; eval.json
    records the code that trained it (`code_version`), and a rerun under other code warns with both
    versions (and reuses the run unchanged); under the same code it says nothing more."""
    ws = write_workspace(tmp_path)
    small = {**copy.deepcopy(SWEEP), "k_values": [4], "methods": ["knn_vote"]}
    first = stages.stage_train(ws, DS, KB, _exp(small), run="mine")
    assert first["code_version"] == code_version()
    caplog.set_level("INFO", logger="retformer")
    stages.stage_train(ws, DS, KB, _exp(small), run="mine")
    assert "complete with this configuration" in caplog.text and "was trained by" not in caplog.text
    path = ws.run_dir("mine") / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "code_version": "0.0.1+gdeadbeef0000"}))
    before = path.read_bytes()
    caplog.clear()
    again = stages.stage_train(ws, DS, KB, _exp(small), run="mine")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "0.0.1+gdeadbeef0000" in warned[0] and code_version() in warned[0]
    assert again["code_version"] == "0.0.1+gdeadbeef0000" and path.read_bytes() == before


def test_checkout_version_names_a_commit_only_for_code_git_tracks(tmp_path: Path) -> None:
    """A tracked file gets the commit (and `.dirty` once a tracked file changes); a file in an ignored
    folder of the same work tree (a wheel in a project's .venv) gets the bare version."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    venv = tmp_path / ".venv" / "site"
    venv.mkdir(parents=True)
    (venv / "runs.py").write_text("y = 1\n")
    git("add", ".gitignore", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    assert checkout_version(tmp_path / "code.py", "1.0") == f"1.0+g{commit}"
    assert checkout_version(venv / "runs.py", "1.0") == "1.0"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert checkout_version(tmp_path / "code.py", "1.0") == f"1.0+g{commit}.dirty"


def test_check_overwrite_leaves_unfinished_and_unhashed_runs_alone(tmp_path: Path) -> None:
    """A run folder without eval.json (killed: it resumes) passes; a finished run from before the
    hashes is refused, since its configuration cannot be compared."""
    check_overwrite(tmp_path / "new", "abcd1234")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(UserError, match="config not recorded"):
        check_overwrite(tmp_path / "old", "abcd1234")
    check_overwrite(tmp_path / "old", "abcd1234", force=True)
