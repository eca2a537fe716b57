"""Issue 9 experiments, val only. `python experiments.py <dataset> <kb> <exp> [<exp> ...]`.

Writes one JSON line per run to results/<dataset>__<kb>.jsonl: config, per-epoch val history of
every prediction rule (a0 = L_I alone, a1 = the paper's sum, r_only = L_R alone), the best-on-val
epoch per rule, val metrics of the selected rule with neighbours shuffled across queries, and the
class token's attention mass. Baselines are selected on the lr grid and saved for warm starts.
"""

from __future__ import annotations

import sys

import torch
from lab import RESULTS, Cfg, combos, fit, grid, knn_select, load, log, metrics, predict_branches, shuffled
from lab import attention_mass as attn_mass

LR_GRID = (1e-3, 3e-3, 1e-2)
SMALL = {"width": 64, "depth": 1, "ffn": False, "mlp_hidden": 128}


def summarize(r: dict, data, select: str | None = None) -> dict:
    """Row for one RetFormer run: best rule on val (or the given one), its val metrics, plain and
    with shuffled neighbours, per-branch accuracy at that epoch, attention mass."""
    best = r["best"]
    name = select or max(best, key=lambda k: best[k][1])
    epoch, acc, state = best[name]
    model = r["model"]
    model.load_state_dict(state)
    li, lr = predict_branches(model, data.val)
    plain = metrics(combos(li, lr, True)[name], data, data.val)
    li_s, lr_s = predict_branches(model, shuffled(data.val))
    shuf = metrics(combos(li_s, lr_s, True)[name], data, data.val)
    at_epoch = r["history"][epoch - 1]
    return {
        "cfg": r["cfg"].tag(),
        "selected_rule": name,
        "epoch": epoch,
        "val": plain,
        "val_shuffled": shuf,
        "branches_at_epoch": {k: at_epoch[k] for k in ("a0", "a1", "r_only")},
        "best_per_rule": {k: v[:2] for k, v in best.items()},
        "attention": attn_mass(model, data.val),
        "history": r["history"],
        "seconds": r["seconds"],
    }


def baselines(data, out: str) -> dict:
    res = {}
    for kind in ("linear", "mlp"):
        g = grid(Cfg(kind=kind), data, lrs=LR_GRID, epochs=(200,))
        b = g["best"]
        res[kind] = b
        row = {
            "exp": f"baseline_{kind}",
            "lr": b["run"]["cfg"].lr,
            "epoch": b["epoch"],
            "val": metrics(predict_branches(_load_state(b, data), data.val)[0], data, data.val),
            "grid_val": {r["cfg"].lr: r["best"]["model"][:2] for r in g["runs"]},
        }
        log(out, row)
        torch.save(
            {"cfg": b["run"]["cfg"], "state": b["state"], "epoch": b["epoch"]}, RESULTS / f"{out}__{kind}.pt"
        )
    kb_ds = data.kb.split("_")[0]
    if kb_ds == data.name.split("_")[0]:
        log(out, {"exp": "knn_vote", **knn_select(data)})
    else:
        log(out, {"exp": "knn_vote", "skipped": f"KB {data.kb} labels are not {data.name} classes"})
    return res


def _load_state(sel, data):
    from lab import build

    m = build(sel["run"]["cfg"], data)
    m.load_state_dict(sel["state"])
    return m


def warm_state(out: str) -> dict:
    return torch.load(RESULTS / f"{out}__mlp.pt", weights_only=False)


EXPS = {
    # name: (Cfg kwargs, needs warm MLP)
    "paper_small_20": ({**SMALL, "epochs": 20, "lr": 1e-3}, False),
    "paper_small_100": ({**SMALL, "epochs": 100, "lr": 1e-3}, False),
    "paper_small_100_lr3": ({**SMALL, "epochs": 100, "lr": 3e-3}, False),
    "aux_small_100": ({**SMALL, "epochs": 100, "lr": 3e-3, "aux": 1.0}, False),
    "warm_aux_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "aux": 1.0}, True),
    "warm_aux_shuf_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "aux": 1.0, "nn_shuffle": 0.3}, True),
    "warm_aux_la_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "aux": 1.0, "la_tau": 1.0}, True),
    "warm_aux_txtdrop_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "aux": 1.0, "txt_drop": 0.5}, True),
    "boost_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True}, True),
    "boost_small_60_lr1e-2": ({**SMALL, "epochs": 60, "lr": 1e-2, "freeze_li": True}, True),
    "boost_shuf_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "nn_shuffle": 0.3}, True),
    "boost_la_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "la_tau": 1.0}, True),
    "boost_shuf_la_small_60": (
        {**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "nn_shuffle": 0.3, "la_tau": 1.0},
        True,
    ),
    # independent branches: L_I = the selected mlp_only (frozen), L_R trained on its OWN CE (main = 0);
    # the two are only combined at prediction time, L_I + alpha L_R with alpha chosen on val.
    "indep_small_60": ({**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "main": 0.0, "aux": 1.0}, True),
    "indep_small_60_lr1e-2": (
        {**SMALL, "epochs": 60, "lr": 1e-2, "freeze_li": True, "main": 0.0, "aux": 1.0},
        True,
    ),
    "indep_shuf_small_60": (
        {**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "main": 0.0, "aux": 1.0, "nn_shuffle": 0.3},
        True,
    ),
    "indep_shuf_la_small_60": (
        {
            **SMALL,
            "epochs": 60,
            "lr": 3e-3,
            "freeze_li": True,
            "main": 0.0,
            "aux": 1.0,
            "nn_shuffle": 0.3,
            "la_tau": 1.0,
        },
        True,
    ),  # fmt: skip
    "indep_shufU_small_60": (
        {
            **SMALL,
            "epochs": 60,
            "lr": 3e-3,
            "freeze_li": True,
            "main": 0.0,
            "aux": 1.0,
            "nn_shuffle": 0.3,
            "shuffle_target": "uniform",
        },
        True,
    ),  # fmt: skip
    "indep_shufU5_small_60": (
        {
            **SMALL,
            "epochs": 60,
            "lr": 3e-3,
            "freeze_li": True,
            "main": 0.0,
            "aux": 1.0,
            "nn_shuffle": 0.5,
            "shuffle_target": "uniform",
        },
        True,
    ),  # fmt: skip
    "indep_gateU_small_60": (
        {
            **SMALL,
            "epochs": 60,
            "lr": 3e-3,
            "freeze_li": True,
            "main": 0.0,
            "aux": 1.0,
            "nn_shuffle": 0.3,
            "shuffle_target": "uniform",
            "gate": True,
        },
        True,
    ),  # fmt: skip
    "indep_gate_small_60": (
        {**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "main": 0.0, "aux": 1.0, "gate": True},
        True,
    ),  # fmt: skip
    "indep_la_small_60": (
        {**SMALL, "epochs": 60, "lr": 3e-3, "freeze_li": True, "main": 0.0, "aux": 1.0, "la_tau": 1.0},
        True,
    ),  # fmt: skip
    "warm_aux_demo_60": (
        {"width": 128, "depth": 2, "ffn": True, "mlp_hidden": 128, "epochs": 60, "lr": 3e-3, "aux": 1.0},
        True,
    ),
}


def main() -> None:
    dataset, kb, *exps = sys.argv[1:]
    data = load(dataset, kb)
    out = f"{dataset}__{kb}"
    for exp in exps:
        if exp == "baselines":
            baselines(data, out)
            continue
        name, _, ep = exp.partition("@")  # "<exp>@<epochs>" overrides the epoch count
        kw, warm = EXPS[name]
        cfg = Cfg(**{**kw, **({"epochs": int(ep)} if ep else {})})
        if warm:
            w = warm_state(out)
            cfg.warm_mlp = {k.removeprefix("mlp."): v for k, v in w["state"].items()}
            cfg.mlp_hidden = w["cfg"].width
        r = fit(cfg, data)
        log(out, {"exp": exp, **summarize(r, data)})


if __name__ == "__main__":
    main()
