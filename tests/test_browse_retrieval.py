"""The browser's retrieval columns (issue 20 item 7: pipelines/browse_effect.py through `BrowseRun`)
against a direct computation with trainer.model's own calls, on the small end-to-end run (paper recipe:
L_R on every image) and on a gated copy of its RetFormer (the stacked rule L_I - tau log prior +
1[s > t] alpha L_R, its prior the run's training counts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retformer.artifacts.workspace import Workspace
from retformer.trainer.checkpoint import load_saved_model, save_model
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.model import relevance
from retformer.trainer.model_factory import model_from_config
from retformer.trainer.stored_model import parse_stored_model
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist
torch.set_num_threads(1)

DATASET, KB, RUN, K, TABLE_K = "tiny_lt", "tiny_all", "tiny", 4, 8


@torch.inference_mode()
def direct(ws: Path, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Per test image, from the stored neighbour table's first k and the model's own calls: s =
    relevance(z, nn_img), L_I = branches()[0] (minus prior_tau log prior under the stacked recipe), the
    model's prediction, the labels and whether the rule adds retrieval (paper: always; stacked: s > t)."""
    f = load_retrieval_features(Workspace(ws), DATASET, KB, TABLE_K, "test").subset_k(K)
    b = f.batch(list(range(len(f))))
    model.eval()
    s = relevance(b["z"], b["nn_img"])
    logits_i = model.branches(b["z"], b["nn_img"], b["nn_txt"], b["nn_label"])[0]
    cfg = model.config
    if cfg["recipe"] == "stacked":
        logits_i = logits_i - float(cfg["prior_tau"]) * model.log_prior
    used = s > float(cfg["gate_t"]) if cfg["recipe"] == "stacked" else torch.ones(len(f), dtype=torch.bool)
    pred = model(b["z"], b["nn_img"], b["nn_txt"], nn_label=b["nn_label"]).argmax(dim=1)
    return {
        "s": s.numpy(),
        "used": used.numpy(),
        "image_pred": logits_i.argmax(dim=1).numpy(),
        "pred": pred.numpy(),
        "label": f.labels.numpy(),
    }


def effects_of(ref: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """The images on which retrieval helped (model right, L_I wrong), hurt (the reverse) or changed
    nothing, from the direct computation."""
    right, image_right = ref["pred"] == ref["label"], ref["image_pred"] == ref["label"]
    return {
        "helped": np.flatnonzero(right & ~image_right).tolist(),
        "hurt": np.flatnonzero(~right & image_right).tolist(),
        "same": np.flatnonzero(right == image_right).tolist(),
    }


def check_browser(browser, ref: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Every row's retrieval fields equal the reference, and the effect filter returns exactly the
    reference's images; returns those."""
    rows = browser.queries(limit=1000)["items"]
    assert [r["pred"] for r in rows] == ref["pred"].tolist()
    assert [r["s"] for r in rows] == pytest.approx(ref["s"].tolist(), abs=1e-5)
    assert [r["retrieval_used"] for r in rows] == ref["used"].tolist()
    assert [r["image_pred"] for r in rows] == ref["image_pred"].tolist()
    assert [r["image_correct"] for r in rows] == (ref["image_pred"] == ref["label"]).tolist()
    want = effects_of(ref)
    for effect, images in want.items():
        assert [r["i"] for r in browser.queries(effect=effect, limit=1000)["items"]] == images, effect
        assert [r["i"] for r in rows if r["effect"] == effect] == images
    assert browser.summary()["effects"] == {e: len(v) for e, v in want.items()}
    assert browser.summary()["retrieval_used"] == int(ref["used"].sum())
    return want


def test_retrieval_fields_of_the_small_run_equal_a_direct_computation(e2e_workspace: Path) -> None:
    """On the run itself (paper recipe): s per image equals relevance() over its k stored neighbours,
    retrieval is used on every image and the reason says why, the image-only prediction is the argmax
    of branches()'s L_I, and effect=helped / hurt / same returns exactly the images where the model's
    and L_I's correctness differ that way (every image in one of the three)."""
    from retformer.pipelines.browse import BrowseRun

    browser = BrowseRun.open(RUN, None, e2e_workspace)
    ref = direct(e2e_workspace, load_saved_model(e2e_workspace / "runs" / RUN / "retformer.pt").model)
    want = check_browser(browser, ref)
    assert sorted(sum(want.values(), [])) == list(range(len(ref["label"])))
    assert want["hurt"] or want["helped"], "the 2-epoch run's L_R changes some predictions"
    row = browser.query(want["hurt"][0] if want["hurt"] else want["helped"][0])
    assert row["retrieval_reason"].startswith("always: the paper's recipe")
    assert browser.summary()["rule"]["recipe"] == "paper"


def test_gated_rule_uses_retrieval_only_above_t(e2e_workspace: Path, tmp_path: Path) -> None:
    """A copy of the run's RetFormer under the stacked rule (prior_tau 1 with the run's training
    counts, alpha 1, gate t between two images' s near the median): retrieval_used is exactly s > t
    (about half the images) and the reason names s and t, the image-only prediction is argmax(L_I -
    log prior), the predictions are the gated model's own (no predictions file in the copy) and the
    helped / hurt / same filter returns exactly the images the direct computation gives."""
    from retformer.pipelines.browse import BrowseRun

    run_dir = e2e_workspace / "runs" / RUN
    saved = load_saved_model(run_dir / "retformer.pt")
    report = json.loads((run_dir / "eval.json").read_text())
    s = np.sort(direct(e2e_workspace, saved.model)["s"])
    t = float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)  # between two images: no tie with any s
    rule = {"recipe": "stacked", "alpha": 1.0, "beta": 0.0, "gate_t": t, "prior_tau": 1.0}
    model = model_from_config(parse_stored_model({**saved.model.config, **rule}))
    model.load_state_dict(saved.model.state_dict())
    model.set_prior(report["train_class_counts"])
    copy = tmp_path / "runs" / "gated"
    copy.mkdir(parents=True)
    save_model(copy / "retformer.pt", model, saved.info, **saved.extra)

    browser = BrowseRun.open(copy, None, tmp_path)
    ref = direct(e2e_workspace, load_saved_model(copy / "retformer.pt").model)
    assert 0 < ref["used"].sum() < len(ref["used"])
    check_browser(browser, ref)
    assert browser.summary()["rule"] == {
        "recipe": "stacked",
        "alpha": 1.0,
        "beta": 0.0,
        "gate_t": t,
        "image_weight": 1.0,
        "prior_tau": 1.0,
    }
    off, on = int(np.flatnonzero(~ref["used"])[0]), int(np.flatnonzero(ref["used"])[0])
    assert browser.query(off)["retrieval_reason"] == f"s = {ref['s'][off]:.3f} <= t = {t:.3f}: L_I alone"
    assert browser.query(on)["retrieval_reason"] == f"s = {ref['s'][on]:.3f} > t = {t:.3f}"
    # where the gate is closed the prediction is L_I's: retrieval changed nothing there
    assert all(browser.row(i)["effect"] == "same" for i in np.flatnonzero(~ref["used"]).tolist())
