"""Neighbour evidence (trainer/evidence.py), the balanced val criterion, the weighted votes and the
RetFormer rule that adds them (issue 18): hand examples, then the real selection on the synthetic
workspace of tests/test_selection.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retformer.trainer.checkpoint import load_model
from retformer.trainer.config import FusionOptions, SelectOptions
from retformer.trainer.evidence import (
    ClassText,
    balanced_accuracy,
    caption_centre,
    caption_class_probs,
    label_probs,
    log_evidence,
    neighbour_weights,
    weighted_vote,
)
from retformer.trainer.features import load_retrieval_features
from retformer.trainer.model_factory import build_model
from retformer.trainer.select_votes import select_vote, vote_scores
from retformer.trainer.train import predict

torch.set_num_threads(1)


def test_balanced_accuracy_is_the_mean_of_per_class_accuracies() -> None:
    """Nine head images right and one tail image wrong: top-1 0.9, balanced (1.0 + 0.0) / 2 = 0.5; a class
    absent from the labels does not count."""
    labels = torch.tensor([0] * 9 + [1])
    logits = F.one_hot(torch.zeros(10, dtype=torch.long), 3).float()
    assert balanced_accuracy(logits, labels) == 0.5
    assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(0.9)


def test_caption_probs_name_the_class_and_an_empty_caption_votes_nothing() -> None:
    """A caption vector equal to class 2's prompt puts most mass on class 2; an all-zero vector (no
    caption) votes for nothing; a caption nearer to the null slot than to any class votes mostly nothing."""
    class_text = torch.eye(4, 6)
    txt = torch.stack(
        [class_text[2], torch.zeros(6), F.normalize(torch.tensor([0, 0, 0, 0, 1.0, 1.0]), dim=0)]
    )
    probs = caption_class_probs(txt, class_text, temperature=0.05, null_sim=0.5)
    assert int(probs[0].argmax()) == 2 and float(probs[0, 2]) > 0.99
    assert torch.equal(probs[1], torch.zeros(4))
    assert float(probs[2].sum()) < 0.01


def test_centred_reading_ignores_the_direction_every_caption_shares() -> None:
    """Captions that all lean on one template direction u, and a class ("nine") whose prompt leans on u
    more than the others': uncentred, the class-2 caption is read as that class; centred on the captions'
    mean (and the prompts on theirs) it is read as 2, and every caption names its own class."""
    dim, classes = 8, 4
    u, e = torch.eye(dim)[-1], torch.eye(dim)[:classes]
    prompts = F.normalize(torch.stack([u + e[0], u + e[1], u + e[2], 3 * u + e[3]]), dim=-1)
    captions = F.normalize(3 * u + e, dim=-1)  # one caption per class, each mostly template
    raw = caption_class_probs(captions, prompts, temperature=0.05, null_sim=0.0)
    assert int(raw[2].argmax()) == 3  # the misreading centring removes
    reader = ClassText(prompts, caption_centre(captions))
    assert reader.centred and not ClassText.of(prompts).centred
    centred = caption_class_probs(captions, reader, temperature=0.05, null_sim=0.1)
    assert centred.argmax(dim=1).tolist() == [0, 1, 2, 3]
    assert bool((centred.max(dim=1).values > 0.9).all())


def test_caption_centre_is_the_mean_unit_caption_of_the_rows_with_text() -> None:
    """Rows without a caption (all zeros) do not pull the centre; the chunked mean equals the direct one;
    a store without any caption has a zero centre (captions then read uncentred)."""
    txt = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    assert caption_centre(txt).tolist() == [0.5, 0.5]
    assert caption_centre(txt, chunk=1).tolist() == [0.5, 0.5]
    assert caption_centre(torch.zeros(3, 2)).tolist() == [0.0, 0.0]


def test_minilm_reads_number_word_captions_only_when_centred() -> None:
    """The real text tower (MiniLM, offline): captions of the ten digit names in two templates the prompts
    never use. Uncentred (as before), some are read as another digit or as none ("one" and "two" as
    "nine"); centred on the captions' own mean, every one names its digit."""
    from retformer.kb_builder.encoders import build_text_encoder
    from retformer.kb_builder.kb_schema import text_encoder
    from retformer.trainer.evidence import class_text_embeddings
    from retformer.trainer.kb_episodes import caption_labels

    encoder = build_text_encoder(text_encoder({"name": "minilm"}))
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = ["a scanned handwritten {name}.", "the digit {name}, written by hand."]
    txt = encoder.encode([t.format(name=n) for n in names for t in templates]).float()
    truth = torch.arange(10).repeat_interleave(len(templates)).tolist()
    prompts = class_text_embeddings(encoder, names)
    assert caption_labels(txt, prompts, null=0.0).tolist() != truth
    assert caption_labels(txt, ClassText(prompts, caption_centre(txt))).tolist() == truth


def test_retformer_keeps_its_caption_centre_and_loads_a_file_saved_without_one() -> None:
    """set_class_text stores the prompts and the centre as buffers (saved with the weights); a state dict
    from before centring (no `caption_centre`) loads with a zero centre, so that model keeps reading its
    captions uncentred, as when it was selected."""
    opts = FusionOptions(width=16, depth=1, heads=2, mlp_hidden=8)
    model = build_model("retformer", 3, 6, 5, 4, opts)
    reader = ClassText(F.normalize(torch.randn(3, 5), dim=-1), torch.full((5,), 0.2))
    model.set_class_text(reader)
    again = build_model("retformer", 3, 6, 5, 4, opts)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.class_reader().centre, reader.centre)
    assert torch.equal(again.class_reader().prompts, reader.prompts)
    old = {k: v for k, v in model.state_dict().items() if k != "caption_centre"}
    again.load_state_dict(old)
    assert not again.class_reader().centred


def test_weighted_vote_follows_the_most_similar_neighbours() -> None:
    """Two neighbours say class 0, one far more similar says class 1: a sharp temperature follows the
    similar one, a flat one the majority; unlabelled neighbours (-1) do not vote."""
    z = torch.tensor([[1.0, 0.0]])
    nn_img = torch.tensor([[[0.0, 1.0], [0.1, 1.0], [1.0, 0.05]]])
    probs = label_probs(torch.tensor([[0, 0, 1]]), 2)
    assert int(weighted_vote(neighbour_weights(z, nn_img, 0.05), probs).argmax()) == 1
    assert int(weighted_vote(neighbour_weights(z, nn_img, 100.0), probs).argmax()) == 0
    assert torch.equal(label_probs(torch.tensor([-1, 5]), 2), torch.zeros(2, 2))


def test_stacked_rule_adds_prior_adjustment_and_beta_log_evidence() -> None:
    """The reloaded rule is the formula: L_I - prior_tau log prior + beta log e (no gate, alpha 0); with
    alpha = beta = prior_tau = 0 it is L_I exactly."""
    torch.manual_seed(0)
    options = FusionOptions(width=8, depth=1, heads=2, recipe="stacked")
    model = build_model("retformer", 3, 8, 4, 5, options).eval()
    model.set_prior([30, 10, 2])
    z, nn_img, nn_txt = torch.randn(6, 8), torch.randn(6, 5, 8), torch.randn(6, 5, 4)
    nn_label = torch.randint(0, 3, (6, 5))
    li = model.mlp(z)
    model.set_rule(replace(model.rule, alpha=0.0, beta=0.0, prior_tau=0.0))
    assert torch.equal(model(z, nn_img, nn_txt, nn_label=nn_label), li)
    model.set_rule(replace(model.rule, beta=0.5, prior_tau=1.0, evidence="label", vote_temp=0.1))
    e = weighted_vote(neighbour_weights(z, nn_img, 0.1), label_probs(nn_label, 3))
    want = li - model.log_prior + 0.5 * log_evidence(e)
    assert torch.allclose(model(z, nn_img, nn_txt, nn_label=nn_label), want, atol=1e-6)
    with pytest.raises(ValueError, match="KB labels"):
        model(z, nn_img, nn_txt)


def test_selection_options_refuse_grids_without_the_plain_rule() -> None:
    """betas and prior_taus must contain 0 (the rule without them stays reachable); temperatures > 0."""
    from retformer.artifacts.errors import UserError

    with pytest.raises(UserError, match="betas and select.prior_taus must contain 0"):
        SelectOptions.from_manifest({"betas": [1.0]})
    with pytest.raises(UserError, match="vote_temps must be > 0"):
        SelectOptions.from_manifest({"vote_temps": [0.0]})
    assert SelectOptions().select_metric == "balanced"


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> dict:
    """The synthetic selection workspace of tests/test_selection.py with every vote and RetFormer."""
    from tests.test_selection import EXPERIMENT, run

    root = tmp_path_factory.mktemp("evidence")
    exp = {**EXPERIMENT, "methods": ["retformer", "mlp_only", "knn_vote", "knn_weighted", "caption_vote"]}
    return {"root": root, "report": run(root, exp)}


def test_weighted_votes_are_selected_on_val_and_caption_vote_reads_captions(syn) -> None:
    """knn_weighted records k and its temperature from the grids; caption_vote is skipped where there is no
    text tower to read the class names with (the synthetic KB), with its reason."""
    m = syn["report"]["methods"]
    assert {"k", "vote_temp"} <= set(m["knn_weighted"]["selected"])
    assert m["knn_weighted"]["selected"]["vote_temp"] in SelectOptions().vote_temps
    assert "text encoder" in m["caption_vote"]["skipped"]


def test_caption_vote_equals_the_label_vote_when_captions_name_the_label(syn) -> None:
    """With class prompts equal to the synthetic KB's class words, reading the captions recovers the
    labels: caption_vote's val predictions match knn_weighted's on almost every image."""
    from retformer.artifacts.workspace import Workspace
    from tests.test_selection import C, K

    val = load_retrieval_features(Workspace(syn["root"]), "syn", "kbsyn", K, "val")
    words = torch.stack(
        [F.normalize(val.store_txt[val.store_label == c].float().mean(0), dim=0) for c in range(C)]
    )
    chosen, _, trials = select_vote(val, C, "caption", SelectOptions(knn_k=(4, 8)), words)
    assert len(trials) == 2 * len(SelectOptions().vote_temps)
    by_caption = vote_scores(val, C, "caption", chosen["k"], chosen["vote_temp"], words).argmax(1)
    by_label = vote_scores(val, C, "label", chosen["k"], chosen["vote_temp"]).argmax(1)
    assert float((by_caption == by_label).float().mean()) > 0.95


def test_reloaded_retformer_reproduces_its_rule_with_evidence(syn) -> None:
    """The selected rule (alpha, beta, gate, prior_tau, evidence, vote temperature) lives in the model file:
    the reloaded model reproduces the reported val top-1, and its selection scored balanced accuracy."""
    from retformer.artifacts.workspace import Workspace
    from tests.test_selection import K

    rep = syn["report"]["methods"]["retformer"]
    assert {"beta", "prior_tau", "evidence", "vote_temp", "val_score"} <= set(rep["selected"])
    assert rep["selected"]["evidence"] in (None, "label")
    model = load_model(Path(syn["root"]) / "runs" / "r" / "retformer.pt")
    val = load_retrieval_features(Workspace(syn["root"]), "syn", "kbsyn", K, "val")
    got = float((predict(model, val).argmax(1) == val.labels).float().mean())
    assert got == pytest.approx(rep["val"]["top1"], abs=1e-9)
