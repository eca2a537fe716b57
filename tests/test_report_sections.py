"""report.html's header block and retrieval-quality section (issue 20 item 6), read from the report the
small end-to-end run wrote (tests/conftest.py's `e2e_workspace`, `stage_train`'s own write_report) and
checked against numbers computed here from the run's files: the neighbour tables (precision@k straight
from the Parquet files; s by trainer.model.relevance), index.json, the KB's embed record and git. Also:
a run without neighbour tables, an old eval.json without `diagnostics`, and a KB whose labels are
another dataset's classes still give a report that says why a figure is missing."""

from __future__ import annotations

import copy
import html
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.workspace import Workspace
from retformer.pipelines.report import build_html
from retformer.pipelines.report_header import browse_command, code_commit
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.model import relevance
from retformer.trainer.selection import shuffled
from tests.conftest import needs_fmnist
from tests.helpers import REPO

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8


def cells(page: str, table_class: str) -> list[list[str]]:
    """The text of each row's cells (td and th) of the page's table of that class."""
    table = re.search(rf"<table class='{table_class}'>(.*?)</table>", page, re.S)
    assert table, f"no table {table_class}"
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    return [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S)] for r in rows]


@pytest.fixture(scope="module")
def tiny(e2e_workspace: Path) -> dict:
    """The small run's report.html (as `retformer train` wrote it) and eval.json."""
    run_dir = e2e_workspace / "runs" / RUN
    return {
        "ws": e2e_workspace,
        "page": (run_dir / "report.html").read_text(),
        "report": json.loads((run_dir / "eval.json").read_text()),
    }


@needs_fmnist
def test_precision_at_k_per_class_equals_the_neighbour_tables(tiny) -> None:
    """Per class, the share of a test image's k = 4 neighbours (the stored table's first 4) whose KB
    label is the image's label, computed here from the Parquet files alone (test.parquet's nn_id,
    store.parquet's kb_id -> label, the test embeddings' labels), is the report's number to the
    printed 2 decimals, and so are its means over images and over classes."""
    ws = tiny["ws"]
    nn_dir = ws / "datasets" / DATASET / "neighbors" / KB / f"k{TABLE_K}"
    store = pq.read_table(nn_dir / "store.parquet", columns=["kb_id", "label"]).to_pydict()
    kb_label = dict(zip(store["kb_id"], store["label"], strict=True))
    table = pq.read_table(nn_dir / "test.parquet", columns=["uid", "nn_id"]).to_pydict()
    neighbours = dict(zip(table["uid"], table["nn_id"], strict=True))
    parts = sorted((ws / "datasets" / DATASET / "embeddings" / "test").glob("*.parquet"))
    labels = {}
    for part in parts:
        columns = pq.read_table(part, columns=["uid", "label"]).to_pydict()
        labels.update(zip(columns["uid"], columns["label"], strict=True))
    hits: dict[int, list[float]] = {}
    for uid, y in labels.items():
        hits.setdefault(y, []).append(np.mean([kb_label[i] == y for i in neighbours[uid][:K]]))
    names = tiny["report"]["class_names"]
    rows = cells(tiny["page"], "precision")
    assert rows[0] == ["class", "test images", f"precision@{K} (%)"]
    assert rows[1:] == [
        [names[c], str(len(hits[c])), f"{100 * np.mean(hits[c]):.2f}"] for c in range(len(names))
    ]
    over_images = 100 * np.mean([h for c in hits for h in hits[c]])
    over_classes = 100 * np.mean([np.mean(hits[c]) for c in hits])
    assert f"<b>{over_images:.2f}%</b> over images, {over_classes:.2f}% over classes" in tiny["page"]


@needs_fmnist
def test_similarity_table_is_s_of_train_test_and_shuffled_test(tiny) -> None:
    """The s table: train, test and test with neighbours shuffled (the run's shuffle seed), each with
    its image count and the median and mean of relevance(z, nn_img) over the k = 4 neighbours, as
    computed here; the shuffled lists score far lower (the histogram shows the same values). With a
    gate t (here an eval.json from before `diagnostics`, its RetFormer's selected gate_t) a column
    gives each split's share of images with s > t."""
    ws = Workspace(tiny["ws"])
    want, values = {}, {}
    for split in ("train", "test"):
        f = load_retrieval_features(ws, DATASET, KB, TABLE_K, split).subset_k(K)
        for label, g in ((split, f), ("test, neighbours shuffled", shuffled(f, 123))):
            if split == "train" and g is not f:
                continue
            b = g.batch(list(range(len(g))))
            s = values[label] = relevance(b["z"], b["nn_img"]).numpy()
            want[label] = [label, str(len(s)), f"{np.median(s):.4f}", f"{s.mean():.4f}"]
    rows = cells(tiny["page"], "similarity")
    assert rows[0] == ["split", "images", "median s", "mean s"]  # the paper recipe has no gate t
    assert rows[1:] == [want["train"], want["test"], want["test, neighbours shuffled"]]
    assert float(rows[3][2]) < float(rows[2][2]) - 0.2
    assert "alt='Retrieval quality'" in tiny["page"]

    old = copy.deepcopy(tiny["report"])
    del old["diagnostics"]
    t = float(np.median(values["test"]))
    old["methods"]["retformer"]["selected"] = {"gate_t": t}
    rows = cells(build_html(tiny["ws"] / "runs" / RUN, old), "similarity")
    assert rows[0][-1] == f"s > t = {t:.3f} (%)"
    assert [r[-1] for r in rows[1:]] == [f"{100 * (values[r[0]] > t).mean():.2f}" for r in rows[1:]]


@needs_fmnist
def test_header_names_encoders_kb_size_recall_commit_and_browse_command(tiny) -> None:
    """The header: the encoders of the KB's embed record, the KB's rows and recall from its index.json,
    the commit `git rev-parse --short HEAD` gives for this checkout, and a browse command whose run
    name and --workdir open this very run."""
    from retformer.pipelines.use.model_file import find_model_file

    ws = tiny["ws"]
    index = json.loads((ws / "kb" / KB / "index" / "index.json").read_text())
    facts = dict(cells(tiny["page"], "header"))
    assert facts["image encoder"] == f"efficientnet_lite0 (image_size=32) (KB {KB}'s embed record)"
    assert facts["text encoder"] == f"minilm (KB {KB}'s embed record)"
    assert facts["KB size"] == f"{index['n']:,} rows in its index ({index['factory']})"
    check = index["recall_check"]
    want = (
        f"{check['recall']:.3f} at k={check['k']} over {check['queries']} queries (target {check['target']})"
    )
    assert facts["index recall"] == want
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert facts["code commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    command = re.fullmatch(r"<code>retformer browse '([^']+)' --workdir '([^']+)'</code>", facts["browse"])
    assert command and command.group(1) == RUN and Path(command.group(2)) == ws.resolve()
    assert find_model_file(command.group(1), None, command.group(2)).parent == (ws / "runs" / RUN).resolve()


def test_code_commit_is_unknown_outside_a_git_checkout(tmp_path: Path, monkeypatch) -> None:
    """Outside a git checkout, and where git cannot be run at all, the commit is "unknown" (no crash);
    in this checkout it is git's own short hash."""
    assert code_commit(tmp_path) == "unknown"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if git.returncode == 0:
        assert code_commit(REPO) == git.stdout.strip()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert code_commit(REPO) == "unknown"


def test_browse_command_for_the_default_workspace_another_and_none(tmp_path: Path) -> None:
    """`work/` under the folder the report is written from: the run name alone (the CLI's default
    --workdir); another workspace: with its absolute --workdir; a folder outside any workspace: its
    path."""
    run = tmp_path / "work" / "runs" / "r1"
    assert browse_command(run, Workspace(tmp_path / "work"), cwd=tmp_path) == "retformer browse 'r1'"
    other = browse_command(run, Workspace(tmp_path / "work"), cwd=tmp_path / "elsewhere")
    assert other == f"retformer browse 'r1' --workdir '{(tmp_path / 'work').resolve()}'"
    assert browse_command(tmp_path / "loose", None) == f"retformer browse '{(tmp_path / 'loose').resolve()}'"


@needs_fmnist
def test_report_builds_for_old_and_neighbourless_runs(tiny, tmp_path: Path) -> None:
    """An eval.json from before `diagnostics` in a folder outside any workspace, and a zero-shot-only
    run in a workspace without neighbour tables, both build a page: the retrieval section says why it
    has no figure, the header says what it cannot know, the results table and long tail are there."""
    old = copy.deepcopy(tiny["report"])
    del old["diagnostics"]
    page = build_html(tmp_path / "loose", old)
    assert "No retrieval figures: the run folder is not inside a workspace" in page
    assert "encoders</th><td>unknown (the run is outside a workspace)" in page
    assert "alt='The long tail'" in page and "<td>retformer</td>" in page
    assert "Retrieval and agreement" not in page  # a diagnostics figure: absent without diagnostics

    zs = {k: v for k, v in old.items() if k != "methods"}
    zs["methods"] = {"clip_zeroshot": {k: old["methods"]["mlp_only"][k] for k in ("top1", "per_class")}}
    run_dir = tmp_path / "ws" / "runs" / "zs"
    run_dir.mkdir(parents=True)
    page = build_html(run_dir, zs)
    assert f"No retrieval figures: no test neighbour table for {DATASET} x {KB} at k={TABLE_K}" in page
    assert f"unknown (no index record for KB {KB})" in page and "<td>clip_zeroshot</td>" in page


def test_precision_says_so_where_the_kb_is_labelled_with_another_datasets_classes(tmp_path: Path) -> None:
    """A KB whose labels are another dataset's classes (as Fashion-MNIST's world KB is for digits):
    precision@k is not measured and the section says why; s is still shown for every split."""
    from tests.test_selection import write_workspace

    ws = write_workspace(tmp_path)
    record = {"stage": "shards", "result": {"dataset": "other"}}
    ws.kb_stage_record("kbsyn", "shards").parent.mkdir(parents=True, exist_ok=True)
    ws.kb_stage_record("kbsyn", "shards").write_text(json.dumps(record))
    ws.dataset_info("other").parent.mkdir(parents=True, exist_ok=True)
    ws.dataset_info("other").write_text(json.dumps({"class_names": ["w", "x", "y", "z"]}))
    report = {
        "dataset": "syn",
        "kb": "kbsyn",
        "experiment": "e",
        "eval_split": "test",
        "k": 8,
        "class_names": [f"c{i}" for i in range(4)],
        "methods": {"knn_vote": {"top1": 0.5}},
    }
    (tmp_path / "runs" / "r").mkdir(parents=True)
    torch.set_num_threads(1)
    page = html.unescape(build_html(tmp_path / "runs" / "r", report))
    assert (
        "Neighbour label precision@8: not measured, the KB's labels are classes of other (w, x, y, ...)"
        in page
    )
    assert "the KB has no labels for the dataset's classes" in page and "class='precision'" not in page
    assert [r[0] for r in cells(page, "similarity")[1:]] == ["train", "test", "test, neighbours shuffled"]
