"""The 2-fold check inside val (issue 18): per dataset, the demo experiment selected on one val half
and scored on the other, both ways, for the methods given; then the out-of-half table and what a
"best single source on val" rule (RetFormer's fitted rule unless knn_weighted or mlp_only scores higher
on the selecting half) would have scored. The workspace comes from val_halves.py.

    python bench/method/val_halves.py /tmp/demo_time /tmp/vcv/ws fmnist_lt digits_lt fmnist_lt_noisy
    python bench/method/two_fold.py /tmp/vcv digits_lt fmnist_lt fmnist_lt_noisy
"""

import json
import sys
from pathlib import Path

from retformer.artifacts.workspace import Workspace
from retformer.pipelines import stages
from retformer.pipelines.experiment import run_experiment

KBS = {"fmnist_lt": "fmnist_world", "digits_lt": "digits_world", "fmnist_lt_noisy": "fmnist_world"}
METHODS = "[retformer,mlp_only,knn_vote,knn_weighted,mlp_vote]"
root, datasets = Path(sys.argv[1]), sys.argv[2:]
out = root / "results.jsonl"
for ds in datasets:
    for sel, ev in (("vala", "valb"), ("valb", "vala")):
        sets = [
            f"experiment.select_split={sel}",
            f"experiment.eval_split={ev}",
            f"experiment.methods={METHODS}",
        ]
        exp = stages.load_experiment("demo", sets)
        d, kb = stages.load_dataset_manifest(ds, None), stages.load_kb(KBS[ds], None)
        rep = run_experiment(Workspace(root / "ws"), d, kb, exp, root / f"run-{ds}-{sel}", progress=False)
        rows = {
            m: {"sel": r.get("val", {}).get("top1"), "out": r.get("top1")}
            for m, r in rep["methods"].items()
            if "top1" in r
        }
        with out.open("a") as f:
            f.write(json.dumps({"dataset": ds, "select": sel, "rows": rows}) + "\n")

means: dict[str, list] = {}
for line in out.read_text().splitlines():
    r = json.loads(line)
    m = r["rows"]
    pick = max(["retformer", "knn_weighted", "mlp_only"], key=lambda k: (m[k]["sel"], k == "retformer"))
    outs = [m[k]["out"] for k in ("retformer", "mlp_vote", "knn_weighted", "knn_vote")] + [m[pick]["out"]]
    means.setdefault(r["dataset"], []).append(outs)
    print(r["dataset"], r["select"], " ".join(f"{100 * v:.1f}" for v in outs), pick)
NAMES = ("retformer", "mlp_vote", "knn_weighted", "knn_vote", "single")
for ds, rows in means.items():
    avg = [100 * sum(col) / len(col) for col in zip(*rows, strict=True)]
    print(ds, "out-of-half mean:", ", ".join(f"{n} {v:.2f}" for n, v in zip(NAMES, avg, strict=True)))
