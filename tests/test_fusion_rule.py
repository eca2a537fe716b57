"""Issue 18's fusion: the query-aware attention bias, the anchored L_R, the rule's image weight, the
diagnostics that measure them, and the multi-seed summary with its paired bootstrap."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retformer.pipelines.seeds import (
    comparison,
    comparison_line,
    mean_over_seeds,
    paired_bootstrap,
    seed_list,
)
from retformer.trainer.config import FusionOptions
from retformer.trainer.diagnostics import (
    agreement_accuracy,
    attention_stats,
    neighbour_classes,
    retrieval_share,
)
from retformer.trainer.evidence import log_evidence, neighbour_vote
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.model import neighbor_attention
from retformer.trainer.model_factory import build_model

torch.set_num_threads(1)
DI, DT, C, K, B = 16, 12, 5, 6, 4


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, DI, generator=g),
        torch.randn(B, K, DI, generator=g),
        torch.randn(B, K, DT, generator=g),
        torch.randint(0, C, (B, K), generator=g),
    )


def _retformer(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    options = FusionOptions(width=16, depth=1, heads=2, recipe="stacked", **kw)
    return build_model("retformer", C, DI, DT, K, options).eval()


def _neighbour_ratios(
    model: torch.nn.Module, z: torch.Tensor, a: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Class-token attention over the neighbours, renormalised over them (the query slot left out)."""
    _, attn = model._retrieval_logits(z, a, t, True)
    w = neighbor_attention(attn)["image"]
    return w / w.sum(1, keepdim=True)


def test_query_bias_makes_neighbour_attention_depend_on_the_query() -> None:
    """At depth 1 without the bias, the class token's query is a constant, so the weights among a fixed
    neighbour list are the same for any query z; with query_bias they change with z (through
    cos(z, neighbour)), and more similar neighbours get more weight than under the plain model."""
    _, a, t, _ = _inputs()
    a = a[:1].expand(2, -1, -1).contiguous()
    t = t[:1].expand(2, -1, -1).contiguous()
    z = torch.stack([a[0, 0] * 3, a[0, 5] * 3])  # query 0 is near neighbour 0, query 1 near neighbour 5
    plain = _neighbour_ratios(_retformer(), z, a, t)
    torch.testing.assert_close(plain[0], plain[1])
    biased = _neighbour_ratios(_retformer(query_bias=True), z, a, t)
    assert biased[0, 0] > biased[1, 0] and biased[1, 5] > biased[0, 5]


def test_anchored_retrieval_branch_starts_as_the_vote() -> None:
    """With anchor="label" the untrained L_R is exactly log of the similarity-weighted label vote (its
    residual head starts at zero); training then moves it."""
    z, a, t, lab = _inputs()
    model = _retformer(anchor="label", anchor_temp=0.1)
    _, l_r = model.branches(z, a, t, lab)
    want = log_evidence(neighbour_vote("label", z, a, t, lab, C, 0.1))
    torch.testing.assert_close(l_r, want)
    with pytest.raises(ValueError, match="nn_label"):
        model.branches(z, a, t)


def test_image_weight_zero_is_retrieval_alone_where_the_gate_opens() -> None:
    """image_weight 0 with a gate: where s > t the prediction is the retrieval term alone (here the vote,
    beta 1, alpha 0), where the gate is closed it is L_I alone: both endpoints of the rule."""
    z, a, t, lab = _inputs()
    model = _retformer()
    l_i, l_r = model.branches(z, a, t)
    log_e = log_evidence(neighbour_vote("label", z, a, t, lab, C, 0.05))
    s = torch.tensor([0.9, 0.1, 0.8, 0.2])
    model.set_rule(replace(model.rule, alpha=0.0, beta=1.0, gate_t=0.5, prior_tau=0.0, image_weight=0.0))
    out = model.combine(l_i, l_r, s, log_e)
    torch.testing.assert_close(out[[0, 2]], log_e[[0, 2]])
    torch.testing.assert_close(out[[1, 3]], l_i[[1, 3]])
    model.set_rule(replace(model.rule, image_weight=0.5))
    torch.testing.assert_close(model.combine(l_i, l_r, s, log_e)[0], 0.5 * l_i[0] + log_e[0])


def _features(n: int = 40, seed: int = 0) -> RetrievalFeatures:
    g = torch.Generator().manual_seed(seed)
    m = 30
    store = torch.nn.functional.normalize(torch.randn(m, DI, generator=g), dim=-1)
    return RetrievalFeatures(
        query_img=torch.randn(n, DI, generator=g),
        labels=torch.randint(0, C, (n,), generator=g),
        uids=[f"q{i}" for i in range(n)],
        nn_rows=torch.randint(0, m, (n, K), generator=g),
        nn_score=torch.rand(n, K, generator=g),
        store_img=store.half(),
        store_txt=torch.randn(m, DT, generator=g).half(),
        store_has_text=torch.ones(m, dtype=torch.bool),
        store_label=torch.randint(0, C, (m,), generator=g),
    )


def test_attention_diagnostics_are_bounded_and_uniform_attention_is_entropy_one() -> None:
    """Entropy over log k is in (0, 1], correlation in [-1, 1], and the share of attention on
    other-class neighbours is measured beside its uniform-attention value, which is the plain share of
    such neighbours."""
    f = _features()
    classes = neighbour_classes(f, C, None, "label")
    stats = attention_stats(_retformer(query_bias=True, anchor="label"), f, classes)
    assert 0 < stats["attention_entropy_over_log_k"] <= 1 + 1e-6
    assert -1 <= stats["attention_similarity_corr"] <= 1
    other = (classes != f.labels[:, None]).float().mean(1).mean()
    assert stats["uniform_on_other_class"] == pytest.approx(float(other), abs=1e-6)
    assert stats["images"] == len(f)


def test_agreement_bins_count_every_image_once_and_read_each_method() -> None:
    """Images are binned by the share of neighbours carrying their label; the bins partition the split
    and a method right everywhere scores 1 in every non-empty bin."""
    f = _features()
    classes = neighbour_classes(f, C, None, "label")
    out = agreement_accuracy(f, classes, {"all": torch.ones(len(f), dtype=torch.bool)})
    assert sum(b["images"] for b in out["bins"]) == len(f)
    assert all(b["all"] == 1.0 for b in out["bins"] if b["images"])


def test_retrieval_share_follows_the_gate() -> None:
    """The share of images whose relevance passes the gate: 0 without a retrieval term, 1 without a
    gate, and the fraction above t otherwise."""
    f = _features()
    model = _retformer()
    model.set_rule(replace(model.rule, alpha=0.0, beta=0.0, gate_t=None))
    assert retrieval_share(model, f) == 0.0
    model.set_rule(replace(model.rule, alpha=1.0))
    assert retrieval_share(model, f) == 1.0
    model.set_rule(replace(model.rule, gate_t=1.1))  # a cosine mean never exceeds 1
    assert retrieval_share(model, f) == 0.0


def _predictions(run: Path, name: str, correct: list[bool], groups: list[str]) -> None:
    (run / "predictions").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"correct": correct, "shot_group": groups}), run / "predictions" / f"{name}.parquet"
    )


def test_paired_bootstrap_difference_and_interval(tmp_path: Path) -> None:
    """Paired over the same images and averaged over seeds: identical methods give 0 with a zero-width
    interval; a method right on 3 more of 10 images in each seed gives +0.3 inside its interval; the
    few-shot group reads only its images."""
    groups = ["few"] * 4 + ["many"] * 6
    runs = []
    for seed in range(2):
        run = tmp_path / f"s{seed}"
        _predictions(run, "retformer", [True] * 8 + [False] * 2, groups)
        _predictions(run, "knn_vote", [True] * 5 + [False] * 5, groups)
        _predictions(run, "mlp_only", [True] * 8 + [False] * 2, groups)
        runs.append(run)
    same = paired_bootstrap(runs, "retformer", "mlp_only")
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "images": 10}
    better = paired_bootstrap(runs, "retformer", "knn_vote", resamples=500)
    assert better["diff"] == pytest.approx(0.3) and better["lo"] <= 0.3 <= better["hi"]
    assert paired_bootstrap(runs, "retformer", "knn_vote", group="few")["diff"] == 0.0
    methods = {"retformer": {"top1": 0.8}, "knn_vote": {"top1": 0.5}, "mlp_only": {"top1": 0.8}}
    assert comparison(runs, methods)["baseline"] == "mlp_only"  # the strongest baseline, ties by name


def test_comparison_names_the_best_baseline_on_few_and_every_baseline_above(tmp_path: Path) -> None:
    """Where a vote leads on few while far under on top-1, the comparison pairs RetFormer with it on both
    columns (few: under by 1 of 4 images; top-1: above by 2 of 10) beside the strongest baseline, and
    lists per column the baselines whose mean is above RetFormer's; the console names both."""
    groups = ["few"] * 4 + ["many"] * 6
    run = tmp_path / "s0"
    _predictions(run, "retformer", [True, True, True, False] + [True] * 6, groups)
    _predictions(run, "mlp_only", [True, True, True, False] + [True] * 5 + [False], groups)
    _predictions(run, "knn_vote", [True] * 4 + [True, True, False, False, False, False], groups)
    methods = {
        "retformer": {"top1": 0.9, "few": 0.75},
        "mlp_only": {"top1": 0.8, "few": 0.75},
        "knn_vote": {"top1": 0.6, "few": 1.0},
    }
    cmp = comparison([run], methods)
    assert cmp["baseline"] == "mlp_only" and cmp["few_best"]["baseline"] == "knn_vote"
    assert cmp["few_best"]["few"]["diff"] == pytest.approx(-0.25)
    assert cmp["few_best"]["top1"]["diff"] == pytest.approx(0.3)
    assert cmp["above"] == {"top1": [], "few": ["knn_vote"]}
    text = comparison_line(cmp)
    assert "knn_vote (best baseline on few): few -25.00" in text and "few: knn_vote" in text
    methods["knn_vote"]["few"] = 0.5  # the strongest baseline also leads on few: no second pairing
    assert "few_best" not in comparison([run], methods)


def test_mean_over_seeds_keeps_each_seed_and_the_spread() -> None:
    """Per method the mean, the sample sd and each seed's value; a method skipped in a seed stays
    skipped; seeds count up from the experiment's own."""
    summaries = [
        {
            "methods": {
                "retformer": {"top1": v, "few": 0.5, "selected": {"alpha": a}},
                "knn_vote": {"skipped": "x"},
            }
        }
        for v, a in ((0.8, 0.0), (0.9, 0.5), (1.0, 1.0))
    ]
    out = mean_over_seeds(summaries)
    r = out["retformer"]
    assert r["top1"] == pytest.approx(0.9) and r["top1_sd"] == pytest.approx(0.1)
    assert r["top1_seeds"] == [0.8, 0.9, 1.0] and r["few_sd"] == 0.0
    assert [s["alpha"] for s in r["selected_seeds"]] == [0.0, 0.5, 1.0]
    assert out["knn_vote"] == {"skipped": "x"}
    assert seed_list(0, 3) == [0, 1, 2] and seed_list(5, 1) == [5]
    assert not math.isnan(r["few"])


def test_vote_grid_from_parts_equals_the_streamed_votes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The (k, temperature) grid of a weighted vote cast from the neighbours read once equals, trial by
    trial, the votes streamed per cell (the path for splits too large to hold)."""
    import retformer.trainer.select_votes as selection
    from retformer.trainer.config import SelectOptions

    f = _features(n=60)
    opts = SelectOptions(knn_k=(1, 3, 6), vote_temps=(0.02, 0.1))
    fast = selection.select_vote(f, C, "label", opts)
    monkeypatch.setattr(selection, "VOTE_PARTS_MAX", 0)
    assert selection.split_vote_parts(f, C, "label") is None
    assert selection.select_vote(f, C, "label", opts) == fast


def test_the_selected_rule_is_said_in_words_and_retrieval_off_is_a_warning() -> None:
    """Under every results table: lr, epoch, the rule with its image weight around the prior-adjusted L_I,
    the gate and the vote's (k, T), the share of images where retrieval was used; and a warning line
    when val chose alpha = beta = 0 (the retformer row is then L_I alone)."""
    from retformer.pipelines.results import format_table, selected_rule_lines

    sel = {"lr": 0.003, "epoch": 2, "alpha": 0.25, "beta": 0.5, "prior_tau": 1.0, "image_weight": 0.5}
    sel |= {"gate_t": 0.8161, "gate_quantile": 0.2, "evidence": "label", "vote_k": 20, "vote_temp": 0.1}
    report = {
        "methods": {"retformer": {"top1": 0.9, "selected": sel}},
        "diagnostics": {"rule": {"retrieval_share": 0.83}},
    }
    (line,) = selected_rule_lines(report)
    assert line == (
        "retformer selected on val: lr 0.003, epoch 2; rule 0.5 * (L_I - 1 log prior) + "
        "[s > 0.816 (val q 0.2)] 0.25 L_R + 0.5 log vote(label, k 20, T 0.1) "
        "(L_I alone where the gate is closed); "
        "retrieval used on 83.0% of eval images"
    )
    sel |= {"alpha": 0.0, "beta": 0.0}
    lines = format_table(report).splitlines()
    assert lines[-2].endswith("rule L_I - 1 log prior; retrieval used on 83.0% of eval images")
    assert lines[-1].startswith("warning: retrieval is off in the selected rule")
