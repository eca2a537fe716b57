"""The stacked RetFormer with its prediction rule fitted on val (`select.rule_fit: stack`).

The same model and training as `selection.select_stacked` (L_I the selected mlp_only, frozen; L_R trained
on its own loss per (lr, la_tau) cell, epoch 0 a candidate), but the rule is fitted, not picked from a
grid (trainer/stacking.py): after every epoch, per evidence and per gate (t = a quantile of the
relevance s over val; None: no gate), the weights of (L_I, log prior, L_R, log e) are fitted on the val
images the gate opens by class-balanced negative log-likelihood; where it is closed L_I predicts alone
with its own fitted prior shift. The checkpoint, the evidence and the gate are chosen by the whole val
split's likelihood, smooth where val accuracy moves in steps of one image. The gate is what keeps a
heavily weighted retrieval term safe when the neighbours are not relevant (shuffled val, another KB).
Kept from the grid recipe: the evidence is the weighted-vote baseline's (its (k, T) chosen on val as
knn_weighted / caption_vote choose them), the shuffled-neighbour admissibility rule (val with neighbours
shuffled across queries must score >= L_I's best - `tolerance` points), and L_I alone as the fallback (at
the prior adjustment mlp_only chose: then RetFormer predicts as mlp_only): a fitted rule whose val
criterion is below L_I's stack by more than -`min_gain` points, or below the fallback's, is not taken.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from retformer.trainer.config import SelectOptions
from retformer.trainer.model import RetFormer
from retformer.trainer.selection import (
    Selected,
    Task,
    best_prior_tau,
    branch_logits,
    relevance_of,
    rule_evidence,
    rule_logits,
    shuffled,
    stacked_cell,
    train_tracked,
)
from retformer.trainer.stacking import Stack, class_weights, fit_stack, stack_logits, weighted_nll
from retformer.trainer.val_criteria import criterion, top1

# Decimals the fitted weights keep in the rule (what results.json and the rule line show); the val
# figures are computed with the rounded rule, so a reloaded model predicts what selection scored.
RULE_DECIMALS = 4
# Where the fitted rule fails the shuffled-neighbour control, its retrieval weights are scaled by these in
# turn (L_I's kept) and the first that passes is the candidate: the control bounds how much a rule may
# trust neighbours whose relevance the gate cannot tell from chance (e.g. digits, where any digit's
# neighbours look alike), as the grid's small alphas and betas did.
SHRINKS = (1.0, 0.5, 0.25, 0.125, 0.0625)
RULE_KEYS = (
    "alpha",
    "gate_t",
    "beta",
    "prior_tau",
    "evidence",
    "vote_temp",
    "vote_k",
    "image_weight",
    "closed_prior_tau",
)


def _rows(values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[mask]


def _rule(stack: Stack, evidence: tuple[str, float, int] | None, default_temp: float) -> dict[str, Any]:
    rule = {k: round(v, RULE_DECIMALS) for k, v in stack.rule().items()}
    kind, temp, k = evidence if evidence is not None and rule["beta"] else (None, default_temp, None)
    return rule | {"gate_t": None, "gate_quantile": None, "evidence": kind, "vote_temp": temp, "vote_k": k}


def _gated(rule: dict[str, Any], q: float | None, t: float | None, plain: dict[str, Any]) -> dict[str, Any]:
    """The rule with its gate (quantile q, threshold t) and, where the gate is closed, L_I's own shift."""
    if q is None or not (rule["alpha"] or rule["beta"]):
        return rule | {"closed_prior_tau": None}
    return rule | {"gate_t": t, "gate_quantile": q, "closed_prior_tau": plain["prior_tau"]}


def _gated_votes(
    model: RetFormer,
    evidence: dict[Any, tuple[Any, Any]],
    gates: dict[float | None, tuple[float | None, torch.Tensor, float]],
    val_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    plain_rule: dict[str, Any],
    y: torch.Tensor,
    score_of: Any,
) -> list[tuple[float, dict[str, Any]]]:
    """(val score, row) of each evidence's vote alone where gate q opens, L_I with its fitted shift where it
    is closed (no gate: the vote everywhere); val_parts: L_I on val and on shuffled val, s on both."""
    l_i, li_sh, s_val, s_sh = val_parts
    out = []
    for key, (e_plain, e_mixed) in evidence.items():
        if key is None:
            continue
        kind, temp, k = key
        for q, (t, _, _) in gates.items():
            rule = {"image_weight": 0.0, "prior_tau": 0.0, "alpha": 0.0, "beta": 1.0, "evidence": kind}
            rule |= {"vote_temp": temp, "vote_k": k, "gate_t": t, "gate_quantile": q}
            rule["closed_prior_tau"] = None if t is None else plain_rule["prior_tau"]
            rule_val = rule_logits(model, (l_i, l_i, s_val), rule, e_plain)
            rule_sh = rule_logits(model, (li_sh, li_sh, s_sh), rule, e_mixed)
            score = score_of(rule_val, y)
            row = {"lr": None, "la_tau": 0.0, "epoch": 0, **rule, "val_nll": None, "source": "vote"}
            row |= {"val_score": score, "val_top1": top1(rule_val, y)}
            row["val_shuffled_score"] = score_of(rule_sh, y)
            out.append((score, row))
    return out


def select_fitted(
    task: Task, mlp_state: dict[str, torch.Tensor], opts: SelectOptions, retrieval_branch: bool = True
) -> Selected:
    """The stacked RetFormer, its checkpoint, evidence, gate and rule weights fitted on val: see the module
    docstring. mlp_state: the selected mlp_only's `mlp` weights (L_I). retrieval_branch False: L_R is never
    trained and the rule is fitted over L_I, the prior and the evidence alone (`mlp_vote`)."""
    train, val = task.train, task.val
    score_of = criterion(task.metric)
    y = val.labels
    val_sh = shuffled(val, opts.shuffle_seed)
    probe: RetFormer = task.build(recipe="stacked")
    probe.mlp.load_state_dict(mlp_state)
    prior = probe.log_prior.float().cpu()
    default_temp = float(probe.rule.vote_temp)
    device = next(probe.parameters()).device
    s_val, s_sh = relevance_of(val, device), relevance_of(val_sh, device)
    # The evidence the rule may add, read once (key None: L_R without evidence).
    evidence: dict[tuple[str, float, int] | None, tuple[torch.Tensor | None, torch.Tensor | None]] = {
        None: (None, None),
        **rule_evidence(task, probe, val_sh, opts),
    }
    sw = class_weights(y)
    l_i = branch_logits(probe, val, with_relevance=False)[0]
    plain_stack = fit_stack(l_i, prior, y, sample_weight=sw)
    plain_rule = _gated(_rule(replace(plain_stack, alpha=0.0, beta=0.0), None, default_temp), None, None, {})
    # The reference of the shuffled-neighbour control and the fallback: L_I alone, its prior shift fitted.
    plain_val = rule_logits(probe, (l_i, l_i, s_val), plain_rule, None)
    plain_score = score_of(plain_val, y)
    l_i_score = max([plain_score] + [score_of(l_i - tau * prior, y) for tau in opts.prior_taus])
    # each val image's weighted nll under L_I alone: what a closed gate contributes
    plain_nll = weighted_nll(stack_logits(plain_stack, l_i, prior), y, sw)
    # per gate quantile (None: no gate): its threshold t, the val images it opens and the nll of the rest
    gates: dict[float | None, tuple[float | None, torch.Tensor, float]] = {}
    for q in opts.gate_quantiles:
        t = None if q is None else float(torch.quantile(s_val, q))
        open_ = torch.ones_like(y, dtype=torch.bool) if t is None else s_val > t
        gates[q] = (t, open_, float(plain_nll[~open_].sum()))

    def split_nll(stack: Stack, li: torch.Tensor, lr_: Any, log_e: Any, q: float | None) -> float:
        """The whole val split's weighted nll: `stack` where gate q is open, L_I alone where closed."""
        _, open_, closed_nll = gates[q]
        logits = stack_logits(stack, li[open_], prior, _rows(lr_, open_), _rows(log_e, open_))
        return float(weighted_nll(logits, y[open_], sw[open_]).sum()) + closed_nll

    def fit_open(li: torch.Tensor, lr_: Any, log_e: Any, open_: torch.Tensor) -> Stack:
        """The stack fitted on the val images a gate opens, with their weights in the whole split (lr_ or
        log_e None: that term stays out)."""
        return fit_stack(
            li[open_], prior, y[open_], _rows(lr_, open_), _rows(log_e, open_), sample_weight=sw[open_]
        )

    trials: list[dict[str, Any]] = []
    candidates = []
    # tolerance is in points; 1e-9: 0.81 - 0.01 is a hair above 0.8 in floating point
    control = opts.tolerance / 100 + 1e-9

    def consider(
        m: RetFormer, state: dict[str, torch.Tensor], branches: tuple, key: Any, q: float | None, meta: dict
    ) -> None:
        """Fit the rule of (evidence key, gate q) on m's val branches (li, lr_ or None, li_sh, lr_sh), shrink
        its retrieval weights until the shuffled control passes, and keep it as a candidate if it gains.
        state: m's weights the branches came from (a copy no later training touches)."""
        li, lr_, li_sh, lr_sh = branches
        e_plain, e_mixed = evidence[key]
        t, open_, _ = gates[q]
        fitted = fit_open(li, lr_, e_plain, open_)
        for shrink in SHRINKS:
            stack = replace(fitted, alpha=fitted.alpha * shrink, beta=fitted.beta * shrink)
            rule = _gated(_rule(stack, key, default_temp), q, t, plain_rule)
            rule_val = rule_logits(m, (li, li if lr_ is None else lr_, s_val), rule, e_plain)
            rule_sh = rule_logits(m, (li_sh, li_sh if lr_sh is None else lr_sh, s_sh), rule, e_mixed)
            nll = split_nll(stack, li, lr_, e_plain, q)
            row = {
                **meta,
                **rule,
                "source": "fitted",
                "shrink": shrink,
                "val_nll": round(nll, 6),
                "val_score": score_of(rule_val, y),
                "val_top1": top1(rule_val, y),
                "val_shuffled_score": score_of(rule_sh, y),
                "l_i_val_score": l_i_score,
            }
            trials.append(row)
            if row["val_shuffled_score"] >= l_i_score - control:
                # the largest shrink of the fitted retrieval weights that passes the control
                if row["val_score"] >= plain_score + opts.min_gain / 100 - 1e-9:
                    candidates.append((nll, len(candidates), row, state))
                break

    # L_I and the evidence without L_R (alpha = 0): what mlp_vote is, and candidates of RetFormer too
    # (the probe is never trained: its weights stay as they are)
    li_sh = branch_logits(probe, val_sh, with_relevance=False)[0]
    probe_state, probe_meta = probe.state_dict(), {"lr": None, "la_tau": 0.0, "epoch": 0}
    for key in evidence:
        if key is not None:
            for q in gates:
                consider(probe, probe_state, (l_i, None, li_sh, None), key, q, probe_meta)
    model = probe
    for lr, la_tau in opts.retformer_grid if retrieval_branch else ():
        model, config = stacked_cell(task, mlp_state, opts, lr, la_tau)

        def score(m: RetFormer = model) -> dict[Any, float]:
            li, lr_ = branch_logits(m, val, with_relevance=False)
            return {
                (key, q): -(fit_open(li, lr_, log_e, open_).nll + closed_nll)
                for key, (log_e, _) in evidence.items()
                for q, (_, open_, closed_nll) in gates.items()
            }

        best = train_tracked(
            model, train, config, score, task.class_counts, from_epoch_zero=True, figure="val_loglik"
        )
        for (key, q), (ep, _, state) in best.best.items():
            model.load_state_dict(state)
            # the fit this epoch won with, refitted (deterministic: the same branches, the same weights)
            branches = (
                *branch_logits(model, val, with_relevance=False),
                *branch_logits(model, val_sh, with_relevance=False),
            )
            consider(model, state, branches, key, q, {"lr": lr, "la_tau": la_tau, "epoch": ep})
    # The single sources the fitted rule must beat on val: L_I alone, and (single_source l_i_or_vote)
    # each evidence's vote alone behind a gate that passes the shuffled-neighbour control.
    # L_I alone is mlp_only's own rule (the prior adjustment tau mlp_only chose on val, as
    # `select_plain` chooses it), so a RetFormer whose retrieval adds nothing on val predicts as mlp_only.
    mlp_tau = best_prior_tau(l_i, prior, y, opts.prior_taus, score_of)
    mlp_rule = plain_rule | {"image_weight": 1.0, "prior_tau": mlp_tau}
    mlp_val = rule_logits(probe, (l_i, l_i, s_val), mlp_rule, None)
    plain_row = {"lr": None, "la_tau": 0.0, "epoch": 0, **mlp_rule, "val_nll": None}
    plain_row |= {"source": "l_i", "val_score": score_of(mlp_val, y), "val_top1": top1(mlp_val, y)}
    singles = [(plain_row["val_score"], plain_row)]
    if opts.single_source == "l_i_or_vote":
        votes = _gated_votes(probe, evidence, gates, (l_i, li_sh, s_val, s_sh), plain_rule, y, score_of)
        singles += [(sc, r) for sc, r in votes if r["val_shuffled_score"] >= l_i_score - control]
    best_single, single_row = max(singles, key=lambda c: c[0])  # ties: L_I, the first
    mix = min(candidates, key=lambda c: (c[0], c[1])) if candidates else None
    if mix is not None and mix[2]["val_score"] >= best_single + opts.min_gain / 100 - 1e-9:
        _, _, row, state = mix
        model.load_state_dict(state)
    else:  # a single source: any trained L_R state will do, alpha = 0 never reads it
        row = single_row
    model.set_rule(replace(model.rule, **{key: row[key] for key in RULE_KEYS}))
    model.eval()
    selected = {k: v for k, v in row.items() if k != "val_top1"} | {"rule_fit": "stack"}
    return Selected(model, selected, row["val_top1"], trials)
