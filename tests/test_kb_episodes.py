"""KB episodes (trainer/kb_episodes.py, the experiment's `kb_episodes`): the KB's labelled items as
training queries with leave-one-out neighbours, and RetFormer's fallback being mlp_only's own rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from retformer.pipelines.experiment_context import ExperimentContext
from retformer.trainer.checkpoint import load_model
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.kb_episodes import (
    caption_labels,
    class_counts,
    knn_agreeing_labels,
    leave_one_out_neighbors,
    sample_kb_items,
    with_kb_episodes,
)
from tests.test_selection import EXPERIMENT, GRID, SPLITS, C, K, run, synthetic_kb, write_workspace

torch.set_num_threads(1)


def test_sampling_takes_every_labelled_item_that_fits_else_even_shares() -> None:
    """Proves the sample: unlabelled (-1) and out-of-range labels never join; all labelled items when they
    fit; over the cap, equal shares where a class has enough and a small class's remainder to the others;
    rows unique and ascending; the same seed gives the same rows."""
    labels = np.array([0] * 5 + [1] * 50 + [-1] * 9 + [2] * 40 + [3] * 4)  # 3 is outside 3 classes
    everything = sample_kb_items(labels, 3, 1000, seed=0)
    assert len(everything) == 95 and set(labels[everything]) == {0, 1, 2}
    rows = sample_kb_items(labels, 3, 31, seed=0)
    assert len(rows) == 31 and (np.diff(rows) > 0).all()
    counts = np.bincount(labels[rows], minlength=3)
    assert counts[0] == 5 and sorted(counts[1:]) == [13, 13]
    assert np.array_equal(rows, sample_kb_items(labels, 3, 31, seed=0))
    assert not np.array_equal(rows, sample_kb_items(labels, 3, 31, seed=1))


def test_leave_one_out_neighbours_are_the_exact_search_without_the_item_itself() -> None:
    """Proves the neighbour lists: each item's k neighbours are the k highest cosines among the other
    store rows (brute force in numpy), best first, never the item itself, also where a duplicate of the
    item ties with it."""
    rng = np.random.default_rng(0)
    store = rng.standard_normal((60, 12)).astype(np.float32)
    store[7] = store[3]  # a duplicate: row 3's best other neighbour is row 7 at cosine 1
    rows = np.array([0, 3, 7, 59])
    nn_rows, nn_score = leave_one_out_neighbors(torch.from_numpy(store), rows, k=5)
    unit = store / np.linalg.norm(store, axis=1, keepdims=True)
    for i, row in enumerate(rows):
        sims = unit @ unit[row]
        sims[row] = -np.inf
        expected = np.argsort(-sims, kind="stable")[:5]
        assert row not in nn_rows[i]
        assert set(nn_rows[i]) == set(expected)
        np.testing.assert_allclose(nn_score[i], sims[expected], atol=1e-5)
        assert (np.diff(nn_score[i]) <= 1e-6).all()
    assert nn_rows[1][0] == 7 and nn_rows[2][0] == 3


def test_episodes_join_the_training_features_and_leave_them_unchanged(tmp_path: Path) -> None:
    """Proves `with_kb_episodes`: the training queries come first and unchanged, then one query per
    labelled KB item (its store vector, its KB label, uid kb:<row>) whose gathered neighbours never include
    itself; the store is shared; the class counts add the KB's."""
    ws = write_workspace(tmp_path)
    train = load_retrieval_features(ws, "syn", "kbsyn", K, "train")
    union, added = with_kb_episodes(train, 4, 10_000)
    n = len(train)
    assert added == 80 and len(union) == n + 80
    assert torch.equal(union.query_img[:n], train.query_img.float()) and union.uids[:n] == train.uids
    assert union.store_img is train.store_img
    rows = torch.tensor([int(u[3:]) for u in union.uids[n:]])
    assert torch.equal(union.labels[n:], train.store_label[rows])
    assert torch.equal(union.query_img[n:], train.store_img[rows].float())
    assert not (union.nn_rows[n:] == rows[:, None]).any()
    assert union.batch(torch.arange(n, n + 4))["nn_img"].shape == (4, K, train.img_dim)
    assert class_counts(union.labels, 4) == [c + 20 for c in SPLITS["train"]]


def test_the_knn_filter_drops_labels_that_sit_among_another_class() -> None:
    """Proves `knn_agreeing_labels`: three well-separated clusters of 30 store items; three items carry a
    wrong label (one per cluster) and are dropped (-1), as is the unlabelled item (it stays -1); every right
    label is kept, also when only some rows are judged (the rest come back -1). A store item whose class
    has a single other store item still joins when training images of its class are near (the training
    split counts as neighbours), and is dropped without them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    store = torch.tensor(np.repeat(centres, 30, axis=0) + rng.normal(size=(90, 16)), dtype=torch.float32)
    true = np.repeat(np.arange(3), 30)
    noisy = true.copy()
    noisy[[0, 31, 62]] = [1, 2, 0]  # each a wrong label inside another class's cluster
    noisy[5] = -1
    no_train = (torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    kept = knn_agreeing_labels(store, noisy, *no_train)
    assert np.flatnonzero(kept < 0).tolist() == [0, 5, 31, 62]
    assert (kept[kept >= 0] == true[kept >= 0]).all()
    # Judging only some rows (the items that may join) leaves the others out, the verdicts unchanged.
    first = knn_agreeing_labels(store, noisy, *no_train, rows=np.arange(30))
    assert np.flatnonzero(first >= 0).tolist() == [r for r in range(30) if r not in (0, 5)]
    assert (first[:30] == kept[:30]).all()

    # A fourth class: two store items near centre 4, one labelled; alone it has one agreeing neighbour
    # at most (the other is unlabelled), with five training images of class 3 there it has enough.
    far = rng.normal(size=16) * 3
    store4 = torch.cat([store, torch.tensor(far + 0.1 * rng.normal(size=(2, 16)), dtype=torch.float32)])
    labels4 = np.concatenate([true, [3, -1]])
    assert knn_agreeing_labels(store4, labels4, *no_train)[90] == -1
    train_img = torch.tensor(far + 0.1 * rng.normal(size=(5, 16)), dtype=torch.float32)
    assert knn_agreeing_labels(store4, labels4, train_img, torch.full((5,), 3))[90] == 3


def _exp(**extra) -> dict:
    return {**EXPERIMENT, "methods": ["retformer", "mlp_only", "knn_vote"], **extra}


@pytest.fixture(scope="module")
def with_episodes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("episodes")
    select = {**GRID, "rule_fit": "stack"}
    return {"root": root, "report": run(root, _exp(kb_episodes=1000, select=select))}


def test_an_experiment_with_kb_episodes_trains_on_them_at_the_same_steps(with_episodes) -> None:
    """Proves the experiment's wiring: eval.json says 80 KB items joined; the fits' epochs are scaled by
    train / (train + KB items) (6 -> 2 for mlp_only, 4 -> 2 for RetFormer's cells, at least 2), so no
    selected epoch is beyond that; the saved heads learned the union's prior (their log prior is that of
    the counts plus the KB's 20 per class). `kb_episode_labels` is left at its default, auto: the KB's
    labels are the dataset's classes, so they label the episodes."""
    rep = with_episodes["report"]
    assert rep["kb_episodes"] == 80 and rep["train_size"] == sum(SPLITS["train"])
    assert rep["kb_episode_labels"] == "label" and rep["kb_episode_check"] is None
    m = rep["methods"]
    assert m["mlp_only"]["selected"]["epoch"] <= 2
    assert m["retformer"]["selected"]["epoch"] <= 2
    counts = torch.tensor([c + 20 for c in SPLITS["train"]], dtype=torch.float64)
    model = load_model(with_episodes["root"] / "runs" / "r" / "mlp_only.pt")
    expected = torch.log(counts / counts.sum()).float()
    torch.testing.assert_close(model.log_prior.float().cpu(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kb_filter", ["knn", "none"])
def test_wrong_kb_labels_stay_out_of_the_episodes_with_the_knn_filter(tmp_path: Path, kb_filter: str) -> None:
    """Proves the experiment's `kb_episode_filter` when one is forced: with 8 of the 80 KB labels wrong
    (each item labelled with the next class, its image among its true class), `knn` lets the 72 right
    ones join and eval.json records 80 labelled, 72 kept; `none` lets all 80 join. Neither fits anything
    to choose (no val scores recorded)."""
    exp = _exp(methods=["mlp_only"], kb_episodes=1000, kb_episode_filter=kb_filter)
    rep = run(tmp_path, exp, kb_wrong_every=10)
    kept = 72 if kb_filter == "knn" else 80
    assert rep["kb_episode_filter"] == {
        "filter": kb_filter,
        "labelled": 80,
        "kept": kept,
        "chosen": kb_filter,
    }
    assert rep["kb_episodes"] == kept


# On this synthetic workspace val prefers the filter with every 10th KB label wrong (0.65 vs 0.60) and
# the unfiltered items with every 4th wrong (0.575 vs 0.55: the filter keeps 70, and its 10 dropped
# items include right labels), so both of auto's outcomes are exercised.
@pytest.mark.parametrize(("wrong_every", "chosen", "kept"), [(10, "knn", 72), (4, "none", 70)])
def test_auto_filter_trains_on_the_items_val_prefers(
    tmp_path: Path, wrong_every: int, chosen: str, kept: int
) -> None:
    """Proves `kb_episode_filter: auto` (the default): the mlp_only selection is fitted with the
    filtered and with the unfiltered KB items, eval.json records both val scores and the choice (the
    unfiltered items only where they score higher), the run trains on the chosen items (its mlp_only
    selects the same val score the check recorded for them), and the items that joined are the chosen
    option's."""
    rep = run(tmp_path, _exp(methods=["mlp_only"], kb_episodes=1000), kb_wrong_every=wrong_every)
    rec = rep["kb_episode_filter"]
    assert rec["filter"] == "auto" and rec["labelled"] == 80 and rec["kept"] == kept
    assert rec["chosen"] == ("none" if rec["val_none"] > rec["val_knn"] else "knn") == chosen
    assert rep["kb_episodes"] == (80 if chosen == "none" else kept)
    assert rep["methods"]["mlp_only"]["selected"]["val_score"] == pytest.approx(rec[f"val_{chosen}"])


def test_the_run_takes_the_check_fit_and_it_equals_a_fresh_fit(tmp_path: Path, caplog) -> None:
    """Proves the run's mlp_only may take the fit `auto` made to choose (every 4th KB label wrong: val
    keeps all 80 items): a run that forces those same items (`kb_episode_filter: none`, no check fitted)
    fits mlp_only afresh, and the two runs' mlp_only have the same selection, the same test predictions
    image for image, and the same metrics file (each epoch's figures, wall times aside)."""
    runs, took = {}, {}
    for filter_ in ("auto", "none"):
        exp = _exp(methods=["mlp_only"], kb_episodes=1000, kb_episode_filter=filter_)
        caplog.clear()
        with caplog.at_level("INFO", logger="retformer.pipelines.experiment_methods"):
            runs[filter_] = run(tmp_path / filter_, exp, kb_wrong_every=4)
        took[filter_] = "the KB-episode check fitted" in caplog.text
    assert took == {"auto": True, "none": False}
    assert (
        runs["auto"]["kb_episode_filter"]["chosen"] == runs["none"]["kb_episode_filter"]["chosen"] == "none"
    )
    a, b = runs["auto"]["methods"]["mlp_only"], runs["none"]["methods"]["mlp_only"]
    assert a["selected"] == b["selected"] and a["top1"] == b["top1"]
    preds = [
        pq.read_table(tmp_path / f / "runs" / "r" / m["predictions"]) for f, m in (("auto", a), ("none", b))
    ]
    assert preds[0].column("pred").to_pylist() == preds[1].column("pred").to_pylist()

    def epochs(filter_: str) -> list[dict]:
        lines = (tmp_path / filter_ / "runs" / "r" / "mlp_only.metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]

    assert epochs("auto") and epochs("auto") == epochs("none")


def test_auto_filter_fits_nothing_extra_where_the_filter_keeps_every_item(with_episodes) -> None:
    """Proves auto's shortcut: where every KB label is right the filter keeps all 80 items, the two
    options are the same episodes, and nothing is fitted to choose between them (no val scores)."""
    rec = with_episodes["report"]["kb_episode_filter"]
    assert rec == {"filter": "auto", "labelled": 80, "kept": 80, "chosen": "knn"}


def test_a_kb_without_the_datasets_labels_adds_no_episode(tmp_path: Path) -> None:
    """Proves the guard: a KB labelled with another dataset's classes (no class names to match) adds no
    episode, its captions not asked by the default `kb_episode_labels: auto` either (another label
    space), and the run is the run without `kb_episodes` (the same selections and figures)."""
    kb = synthetic_kb("other_dataset")
    exp = _exp(methods=["mlp_only"])
    with_key = run(tmp_path / "a", {**exp, "kb_episodes": 1000}, kb=kb)
    without = run(tmp_path / "b", exp, kb=kb)
    assert with_key["kb_episodes"] == 0
    assert with_key["kb_episode_labels"] == "label" and with_key["kb_episode_check"] is None
    assert with_key["methods"]["mlp_only"]["selected"] == without["methods"]["mlp_only"]["selected"]
    assert with_key["methods"]["mlp_only"]["top1"] == without["methods"]["mlp_only"]["top1"]


def test_retformer_without_retrieval_predicts_exactly_as_mlp_only(tmp_path: Path) -> None:
    """Proves the fallback is mlp_only's own rule: when no rule with retrieval may win (min_gain 100
    points), the fitted RetFormer takes L_I alone at the prior adjustment mlp_only chose, so its test
    predictions are mlp_only's, image for image."""
    select = {**GRID, "rule_fit": "stack", "min_gain": 100.0}
    rep = run(tmp_path, _exp(methods=["retformer", "mlp_only"], select=select))
    ret, mlp = rep["methods"]["retformer"], rep["methods"]["mlp_only"]
    assert ret["selected"]["source"] == "l_i"
    assert ret["selected"]["prior_tau"] == mlp["selected"]["prior_tau"]
    assert ret["selected"]["alpha"] == ret["selected"]["beta"] == 0
    run_dir = tmp_path / "runs" / "r"
    a = pq.read_table(run_dir / ret["predictions"]).column("pred").to_pylist()
    b = pq.read_table(run_dir / mlp["predictions"]).column("pred").to_pylist()
    assert a == b and ret["top1"] == mlp["top1"]


def test_caption_labels_name_a_class_only_with_most_of_the_captions_mass() -> None:
    """Proves the caption reading: a caption at a class prompt labels its item with that class; no caption,
    a caption nearer the "names no class" slot than any class, and one split evenly between two classes
    (neither gets half the mass) leave the item unlabelled (-1); chunking changes nothing."""
    class_text = torch.eye(3, 5)
    txt = torch.stack(
        [
            class_text[1],
            torch.zeros(5),
            torch.tensor([0, 0, 0, 1.0, 0]),  # orthogonal to every class: cosine 0 = the null slot's
            torch.nn.functional.normalize(class_text[0] + class_text[2], dim=0),
            class_text[2],
        ]
    )
    labels = caption_labels(txt, class_text)
    assert labels.tolist() == [1, -1, -1, -1, 2]
    assert caption_labels(txt, class_text, chunk=2).tolist() == labels.tolist()


def test_item_labels_choose_the_episodes_and_leave_the_kbs_labels_alone(tmp_path: Path) -> None:
    """Proves `item_labels`: only the items it labels join, with its labels, not the KB's; the store (and
    so every vote's KB labels) is unchanged."""
    ws = write_workspace(tmp_path)
    train = load_retrieval_features(ws, "syn", "kbsyn", K, "train")
    inferred = np.full(len(train.store_label), -1)
    inferred[:10] = 3  # ten items, read as class 3 whatever the KB says
    union, added = with_kb_episodes(train, C, 10_000, item_labels=inferred)
    assert added == 10 and union.labels[len(train) :].tolist() == [3] * 10
    assert union.store_label is train.store_label


def _class_words(root: Path) -> torch.Tensor:
    """The synthetic KB's class prompts: each class's mean caption vector (its captions name it)."""
    from retformer.artifacts.workspace import Workspace

    store = load_retrieval_features(Workspace(root), "syn", "kbsyn", K, "train")
    rows = [store.store_txt[store.store_label == c].float().mean(0) for c in range(C)]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


@pytest.mark.parametrize(
    ("labels", "names_the_class"), [("caption", True), ("caption", False), ("auto", True)]
)
def test_caption_labelled_episodes_join_only_where_val_admits_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labels: str, names_the_class: bool
) -> None:
    """Proves `kb_episode_labels: caption` on a KB without the dataset's labels (labelled with another
    dataset's classes): the captions label the items when they name the dataset's classes, the
    mlp_only check on val admits them and all 80 join; when the class prompts are rotated (every
    caption read as the next class: a KB whose captions mislead), val drops, nothing joins, and eval.json
    records the two val scores. `auto` (the default) reads the captions of a KB without any label (the
    same KB, its labels -1: web pairs)."""
    write_workspace(tmp_path / "probe")
    words = _class_words(tmp_path / "probe")
    prompts = words if names_the_class else words.roll(1, dims=0)
    monkeypatch.setattr(ExperimentContext, "class_text", lambda self, features: prompts)
    # The kNN filter left out: the admission alone is under test (rotated prompts label every item wrong,
    # all alike, which a neighbour vote cannot see and val does).
    exp = _exp(methods=["mlp_only"], kb_episodes=1000, kb_episode_labels=labels, kb_episode_filter="none")
    unlabelled = labels == "auto"
    rep = run(tmp_path / "run", exp, kb=synthetic_kb("other_dataset"), kb_labels=not unlabelled)
    check = rep["kb_episode_check"]
    assert rep["kb_episode_labels"] == "caption" and check["items"] == 80
    assert check["admitted"] is names_the_class
    assert (check["val_with"] >= check["val_without"]) is names_the_class
    assert rep["kb_episodes"] == (80 if names_the_class else 0)
