"""The demo experiment's trainer against its bare compute: per method, the experiment's wall time vs the
same forward / backward / optimizer steps and eval forwards on resident tensors, in the same process.

    python bench/bench_trainer.py --workdir work --out bench/results/trainer.json   (make bench-trainer)
        [--quick] [--set select.baseline_epochs=50 ...] [--threads N]

Data: the demo's own tables (`--dataset fmnist_lt --kb fmnist_world`, experiment `--experiment demo`) in
`--workdir`; when its neighbor tables are missing they are built first with the CLI (`retformer shards`,
`embed`, `index`, `neighbors`: ~6 min on 2 CPU cores). `--quick`: the same experiment with 20 baseline
epochs and 3 RetFormer epochs per grid cell (a minute or two instead of several).

  wall: `run_experiment` with the manifest's methods, mlp_only first (RetFormer's stacked recipe reuses
      the selected mlp_only: in the demo's order its time would count in RetFormer's), each method's
      `seconds` as the experiment records it (selection grid, per-epoch val scoring, the final
      predictions, the shuffled control, model files).
  bare: the same work on tensors resident before the clock starts, no loop around it, with the
      threads the trainer gives each model (`trainer.train.head_threads`): for each grid
      cell a fresh model, as many optimizer steps (forward, soft-target cross-entropy, backward, AdamW
      step) on batch-sized slices, one eval forward over val per epoch, then the eval forwards the
      selection and the final evaluation make (counted from the run's own metrics file where the
      experiment skips repeats); kNN vote: the votes and their metrics on labels gathered once.
Recorded: per method wall_s, bare_s, wall_over_bare (goal <= 1.25), steps, eval rows, top1 (test); the
torch thread count both ran with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from artifacts.atomic import write_json_atomic  # noqa: E402
from artifacts.workspace import Workspace, read_json  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.experiment import run_experiment  # noqa: E402
from pipelines.experiment_plan import plan_experiment  # noqa: E402
from trainer.baselines import vote_threads  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.features import load_retrieval_features, neighbor_table_path  # noqa: E402
from trainer.model import build_model, relevance  # noqa: E402
from trainer.selection import shuffled  # noqa: E402
from trainer.train import (  # noqa: E402
    head_threads,
    intra_op_threads,
    logit_adjustment,
    make_optimizer,
    soft_targets,
)

QUICK = ["select.baseline_epochs=20", "select.retformer_epochs=3"]


def ensure_tables(workdir: Path, dataset: str, kb: str, k: int) -> None:
    """Build the dataset's neighbor tables with the CLI when they are missing."""
    ws = Workspace(workdir)
    if neighbor_table_path(ws, dataset, kb, k, "train").is_file():
        return
    cli = [str(Path(sys.executable).with_name("retformer")), "-q"]
    common = ["--workdir", str(workdir)]
    for args in (
        ["shards", "--kb", kb],
        ["shards", "--dataset", dataset],
        ["embed", "--kb", kb, "--dataset", dataset],
        ["index", "--kb", kb],
        ["neighbors", "--dataset", dataset, "--kb", kb],
    ):
        print("building:", " ".join(args), file=sys.stderr, flush=True)
        subprocess.run([*cli, *args, *common], check=True)


class Resident:
    """One split's model inputs gathered once (float32): z (N, Di), nn_img (N, k, Di), nn_txt (N, k, Dt),
    at most `rows` rows (a large split is evaluated by reusing its first rows: the cost is the same)."""

    def __init__(self, features: Any, rows: int | None = None) -> None:
        n = len(features) if rows is None else min(rows, len(features))
        b = features.batch(torch.arange(n))
        self.z, self.nn_img, self.nn_txt, self.y = b["z"], b["nn_img"], b["nn_txt"], b["y"]

    def __len__(self) -> int:
        return len(self.z)


@torch.inference_mode()
def eval_rows(model: torch.nn.Module, data: Resident, n: int, batch: int, branches: bool = False) -> None:
    """Eval forwards over n rows in `batch`-row chunks, reading the resident rows (cycled), with the
    threads the trainer gives the model (`trainer.train.head_threads`)."""
    model.eval()
    with intra_op_threads(head_threads(model, torch.device("cpu"))):
        _eval_rows(model, data, n, batch, branches)


def _eval_rows(model: torch.nn.Module, data: Resident, n: int, batch: int, branches: bool) -> None:
    for start in range(0, n, batch):
        m = min(batch, n - start)
        lo = start % len(data)
        m = min(m, len(data) - lo)
        z, a, t = data.z[lo : lo + m], data.nn_img[lo : lo + m], data.nn_txt[lo : lo + m]
        if branches:
            model.branches(z, a, t)
        else:
            model(z, a, t)


def bare_fit(
    model: torch.nn.Module, train: Resident, config: Any, steps: int, eval_each: int, val: Resident, **kw: Any
) -> None:
    """`steps` optimizer steps on batch-sized slices of the resident train split; every `eval_each` steps
    (an epoch) one eval forward over val (branches only for the stacked RetFormer: `kw["branches"]`);
    the threads `fit` would use."""
    with intra_op_threads(head_threads(model, torch.device("cpu"), config.threads)):
        _bare_fit(model, train, config, steps, eval_each, val, **kw)


def _bare_fit(
    model: torch.nn.Module, train: Resident, config: Any, steps: int, eval_each: int, val: Resident, **kw: Any
) -> None:
    optimizer = make_optimizer(model, config)
    targets = soft_targets(train.y, int(kw["num_classes"]), config.label_smoothing)
    adjust = kw.get("adjust")
    n, bs = len(train), config.batch_size
    starts = list(range(0, n, bs))
    for step in range(steps):
        model.train()
        s = starts[step % len(starts)]
        logits = model(train.z[s : s + bs], train.nn_img[s : s + bs], train.nn_txt[s : s + bs])
        loss = F.cross_entropy(logits + adjust if adjust is not None else logits, targets[s : s + bs])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % eval_each == 0:
            eval_rows(model, val, len(val), config.eval_batch_size, kw.get("branches", False))


def best_epochs(metrics: Path, prefix: str) -> list[set[int]]:
    """Per fit of a selection's metrics file: the distinct best-on-val epochs over its `prefix*` figures
    (ties keep the earlier epoch, as `trainer.selection._Best`)."""
    fits: dict[int, list[dict[str, Any]]] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        fits.setdefault(row["fit"], []).append(row)
    out = []
    for rows in fits.values():
        keys = [k for k in rows[0] if k.startswith(prefix)]
        chosen = set()
        for key in keys:
            best = max(rows, key=lambda r, key=key: (r[key], -r["epoch"]))
            chosen.add(int(best["epoch"]))
        out.append(chosen)
    return out


def bare_knn(val: Any, test: Any, num_classes: int, ks: list[int], chosen: int, shot: Any) -> float:
    """Seconds of the kNN votes the experiment casts (each k of the grid on val, the chosen k on val
    and on test) and of the metrics it computes from them, on neighbour labels and scores gathered
    before the clock starts."""
    lab = {"val": val.store_label[val.nn_rows], "test": test.store_label[test.nn_rows]}
    sim = {"val": val.nn_score, "test": test.nn_score}

    def votes(split: str, kk: int) -> torch.Tensor:
        la, si = lab[split][:, :kk], sim[split][:, :kk]
        valid = (la >= 0) & (la < num_classes)
        la = torch.where(valid, la, torch.zeros_like(la))
        v = torch.zeros(len(la), num_classes).scatter_add_(1, la, valid.float())
        s = torch.zeros(len(la), num_classes).scatter_add_(1, la, torch.where(valid, si, 0.0))
        tie = (s.clamp(-kk, kk) + kk) / (2 * kk + 1)
        return v + torch.where(v > 0, tie, torch.full_like(tie, kk / (2 * kk + 1)))

    def work() -> None:
        for kk in ks:
            votes("val", kk)
        evaluate(votes("val", chosen), val.labels, shot)
        evaluate(votes("test", chosen), test.labels, shot)

    with intra_op_threads(vote_threads(len(val) + len(test), test.k, num_classes)):  # `_knn`'s threads
        return timed(work)


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("work"))
    ap.add_argument("--dataset", default="fmnist_lt")
    ap.add_argument("--kb", default="fmnist_world")
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="experiment.KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help=f"also {' '.join(QUICK)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines (the demo draws them)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/trainer.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [o if o.startswith("experiment.") else f"experiment.{o}" for o in args.overrides]
    if args.quick:
        overrides += [f"experiment.{o}" for o in QUICK]
    ds = stages.load_dataset_manifest(args.dataset, None)
    kb = stages.load_kb(args.kb, None)
    exp = stages.load_experiment(args.experiment, overrides)
    methods = list(exp["methods"])
    order = sorted(methods, key=lambda m: m != "mlp_only")  # mlp_only first: see the docstring
    exp = {**exp, "methods": order}
    plan = plan_experiment(exp, kb)
    opts = plan["select"].for_dataset(ds["name"])
    k = int(exp.get("k", 32))
    ensure_tables(args.workdir, ds["name"], kb["name"], k)
    ws = Workspace(args.workdir)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        report = run_experiment(ws, ds, kb, exp, run_dir, progress=not args.no_progress)
        experiment_s = time.perf_counter() - started
        info = read_json(ws.dataset_info(ds["name"]))
        splits = {
            s: load_retrieval_features(ws, ds["name"], kb["name"], k, s) for s in ("train", "val", "test")
        }
        stacked_best = (
            best_epochs(run_dir / "retformer.metrics.jsonl", "val_top1_")
            if "retformer" in methods and plan["recipe"] == "stacked"
            else None
        )
    results = report["methods"]
    train, val, test = (splits[s] for s in ("train", "val", "test"))
    num_classes = int(info["num_classes"])
    n_train, n_val, n_test = len(train), len(val), len(test)
    res_train, res_val = Resident(train), Resident(val)
    res_val_sh, res_test = Resident(shuffled(val, opts.shuffle_seed)), Resident(test, rows=2048)
    model_options = exp.get("model", {}) or {}
    out: dict[str, Any] = {}

    for method in order:
        config = plan["configs"].get(method)
        bare_s, steps, rows = 0.0, 0, 0
        if method in ("mlp_only", "linear_probe"):
            epochs = int(opts.baseline_epochs)
            spe = math.ceil(n_train / config.batch_size)
            for lr in opts.lr_grid:
                torch.manual_seed(config.seed)
                model = build_model(method, num_classes, train.img_dim, train.txt_dim, k, **model_options)
                cfg = replace(config, lr=lr, epochs=epochs)
                bare_s += timed(
                    bare_fit, model, res_train, cfg, epochs * spe, spe, res_val, num_classes=num_classes
                )
                steps += epochs * spe
                rows += epochs * n_val
            # the final evaluation: val, then the eval split
            bare_s += timed(eval_rows, model, res_val, n_val, config.eval_batch_size)
            bare_s += timed(eval_rows, model, res_test, n_test, config.eval_batch_size)
            rows += n_val + n_test
        elif method == "retformer" and plan["recipe"] == "stacked":
            epochs = int(opts.retformer_epochs)
            spe = math.ceil(n_train / config.batch_size)
            eb = config.eval_batch_size
            for cell, (lr, la_tau) in enumerate(opts.retformer_grid):
                torch.manual_seed(config.seed)
                dims = (num_classes, train.img_dim, train.txt_dim, k)
                model = build_model("retformer", *dims, recipe="stacked", **model_options)
                model.mlp.requires_grad_(False)
                cfg = replace(config, lr=lr, epochs=epochs)
                counts = info.get("train_class_counts")
                adjust = logit_adjustment(counts, la_tau) if la_tau else None
                bare_s += timed(
                    bare_fit,
                    model,
                    res_train,
                    cfg,
                    epochs * spe,
                    spe,
                    res_val,
                    num_classes=num_classes,
                    adjust=adjust,
                    branches=True,
                )
                steps += epochs * spe
                rows += epochs * n_val
                # per distinct best epoch: L_I, L_R over val and over shuffled val
                repeats = len(stacked_best[cell]) if stacked_best else len(opts.alphas)
                for _ in range(repeats):
                    bare_s += timed(eval_rows, model, res_val, n_val, eb, True)
                    bare_s += timed(eval_rows, model, res_val_sh, n_val, eb, True)
                rows += repeats * 2 * n_val
            # s over val and shuffled val (once), then the selected model on val, test and both shuffled
            with torch.inference_mode(), intra_op_threads(head_threads(model, torch.device("cpu"))):
                bare_s += timed(lambda: [relevance(r.z, r.nn_img) for r in (res_val, res_val_sh)])
            sel = results["retformer"]["selected"]
            model.config.update(alpha=sel["alpha"], gate_t=sel["gate_t"])
            for data, n in ((res_val, n_val), (res_test, n_test), (res_val_sh, n_val), (res_test, n_test)):
                bare_s += timed(eval_rows, model, data, n, eb)
            rows += 2 * n_val + 2 * n_test
        elif method == "knn_vote":
            ks = sorted({min(x, k) for x in opts.knn_k})
            chosen = results["knn_vote"]["selected"]["k"]
            bare_s = bare_knn(val, test, num_classes, ks, chosen, info["shot_split"])
            rows = len(ks) * n_val + n_val + n_test
        else:
            continue
        wall = float(results[method]["seconds"])
        out[method] = {
            "wall_s": round(wall, 2),
            "bare_s": round(bare_s, 2),
            "wall_over_bare": round(wall / bare_s, 3) if bare_s > 0 else None,
            "optimizer_steps": steps,
            "eval_rows": rows,
            "top1": results[method].get("top1"),
        }
        print(method, json.dumps(out[method]), file=sys.stderr, flush=True)

    doc = {
        "command": "python bench/bench_trainer.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "dataset": ds["name"],
        "kb": kb["name"],
        "experiment": exp["name"],
        "overrides": overrides,
        "sizes": {"train": n_train, "val": n_val, "test": n_test, "k": k},
        "experiment_seconds": round(experiment_s, 1),
        "methods": out,
        "goal": "wall_over_bare <= 1.25 for every method",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
