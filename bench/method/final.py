"""The recommended recipe end to end, selected on val only, then test reported ONCE.

`python final.py <dataset> <kb> [<recipe grid json>]` writes results/final__<dataset>__<kb>.json:

1. linear_probe and mlp_only: lr in LR_GRID, 200 epochs, best epoch on val, best lr on val.
2. RetFormer: L_I warm-started from the selected mlp_only; grid over the recipe options given
   (default: lr x nn_shuffle), best (epoch, alpha) on val for each run, best run on val.
3. knn_vote: k in {1, 3, 5, 10, 20, 32} on val; skipped when the KB's labels are not the dataset's.
4. Only then: test metrics of every selected model, and RetFormer with neighbours shuffled across
   queries (val and test).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from experiments import LR_GRID, SMALL
from lab import RESULTS, Cfg, eval_gated, final_eval, fit, grid, knn_select, load, metrics, select_gated

from trainer.baselines import knn_vote

RETFORMER_GRID = {"lr": [3e-3, 1e-2]}
# Independent branches: L_I = the selected mlp_only, frozen; L_R trained on its own CE (main = 0).
BASELINE_EPOCHS = int(os.environ.get("BASELINE_EPOCHS", 200))
BASE = {**SMALL, "epochs": 60, "freeze_li": True, "main": 0.0, "aux": 1.0}


def main() -> None:
    dataset, kb, *rest = sys.argv[1:]
    rf_grid = json.loads(rest[0]) if rest else RETFORMER_GRID
    base = {**BASE, **(json.loads(rest[1]) if len(rest) > 1 else {})}
    data = load(dataset, kb)
    out: dict = {"dataset": dataset, "kb": kb, "lr_grid_baselines": LR_GRID, "retformer_grid": rf_grid,
                 "retformer_base": base}  # fmt: skip
    sel = {}
    for kind in ("linear", "mlp"):
        g = grid(Cfg(kind=kind), data, lrs=LR_GRID, epochs=(BASELINE_EPOCHS,))
        sel[kind] = g["best"]
    warm = {k.removeprefix("mlp."): v for k, v in sel["mlp"]["state"].items()}
    runs = []
    keys = list(rf_grid)

    def expand(i: int, cur: dict) -> None:
        if i == len(keys):
            runs.append(dict(cur))
            return
        for v in rf_grid[keys[i]]:
            cur[keys[i]] = v
            expand(i + 1, cur)

    expand(0, {})
    best = gbest = None
    out["retformer_runs"] = []
    for opts in runs:
        cfg = Cfg(**{**base, **opts}, warm_mlp=warm)
        cfg = replace(cfg, mlp_hidden=sel["mlp"]["run"]["cfg"].width)
        r = fit(cfg, data)
        for name, (epoch, acc, state) in r["best"].items():
            if best is None or acc > best["val_top1"]:
                best = {
                    "run": r,
                    "combo": name,
                    "epoch": epoch,
                    "val_top1": acc,
                    "state": state,
                    "opts": opts,
                }
        g = select_gated(r, data)
        if gbest is None or g["best"]["val"] > gbest["val"]:
            gbest = {**g["best"], "run": r, "opts": opts}
        out["retformer_runs"].append(
            {"opts": opts, "best_per_rule": {k: v[:2] for k, v in r["best"].items()},
             "gate_table": g["table"], "sim_val_mean": g["sim_val_mean"], "sim_shuf_mean": g["sim_shuf_mean"],
             "history": r["history"]}
        )  # fmt: skip
        print(json.dumps({k: v for k, v in out["retformer_runs"][-1].items() if k != "history"}), flush=True)
    sel["retformer_ungated"] = best
    # ---- selection is over; everything below only reports
    table = {}
    for name, s in sel.items():
        table[name] = {
            "selected": {
                "lr": s["run"]["cfg"].lr,
                "epoch": s["epoch"],
                "rule": s["combo"],
                **({"opts": s["opts"]} if "opts" in s else {}),
            },  # fmt: skip
            "val": final_eval(s, data, "val"),
            "test": final_eval(s, data, "test"),
        }
    same_labels = kb.split("_")[0] == dataset.split("_")[0]
    if same_labels:
        kn = knn_select(data)
        table["knn_vote"] = {
            "selected": {"k": kn["k"]},
            "val": {"plain": kn["val"]},
            "test": {
                "plain": metrics(knn_vote(data.test.subset_k(kn["k"]), data.num_classes), data, data.test)
            },
        }
    else:
        table["knn_vote"] = {"skipped": f"the labels of KB {kb} are not classes of {dataset}"}
    gr = gbest["run"]
    gm = gr["model"]
    table["retformer"] = {
        "selected": {"lr": gr["cfg"].lr, "epoch": gbest["epoch"], "alpha": gbest["alpha"],
                     "gate_q": gbest["q"], "gate_t": gbest["t"], "opts": gbest["opts"]},
        "val": eval_gated(gm, gbest, data, "val"),
        "test": eval_gated(gm, gbest, data, "test"),
    }  # fmt: skip
    out["table"] = table
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"final__{dataset}__{kb}{os.environ.get('FINAL_SUFFIX', '')}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(table, indent=1, default=str))


if __name__ == "__main__":
    main()
