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
  bare: the same work on tensors resident before the clock starts, on what the experiment's fits train
      on (train plus its KB episodes, `kb_episodes`, each fit's epochs scaled as the experiment scales
      them: `pipelines.experiment_episodes.add_kb_episodes`, run outside the clock), written as the
      shortest loop that does it, with the threads the trainer gives each model
      (`trainer.train.head_threads`): linear_probe's L-BFGS fit per L2 value by the solver itself
      (`fit_logistic`) and a val forward after each; for each
      grid cell a fresh model; per epoch a shuffle and, where the method's recipe has mixup, the mixup
      of each batch (`lam * x + (1 - lam) * x[perm]` on the batch's rows: the data work the recipe asks
      for, done the plain way); as many optimizer steps (forward, soft-target cross-entropy, backward,
      AdamW step); one eval forward over val per epoch (and before the first for the stacked RetFormer,
      whose epoch 0 is a candidate); then the eval forwards the selection and the final evaluation make
      (counted from the run's own metrics file where the experiment skips repeats); votes: the votes of
      every grid cell on val and the chosen one on val and test, on neighbour data gathered once.
      `bare_steps_s` is the optimizer steps and eval forwards alone (no shuffle, no mixup).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.artifacts.workspace import Workspace, read_json  # noqa: E402
from retformer.kb_builder.kb_schema import KBManifest  # noqa: E402
from retformer.pipelines import stages  # noqa: E402
from retformer.pipelines.experiment import run_experiment  # noqa: E402
from retformer.pipelines.experiment_context import ExperimentContext  # noqa: E402
from retformer.pipelines.experiment_episodes import add_kb_episodes  # noqa: E402
from retformer.pipelines.experiment_plan import plan_experiment  # noqa: E402
from retformer.pipelines.experiment_schema import given  # noqa: E402
from retformer.trainer.baselines import vote_threads  # noqa: E402
from retformer.trainer.checkpoint import load_model  # noqa: E402
from retformer.trainer.config import FusionOptions  # noqa: E402
from retformer.trainer.evaluate import evaluate  # noqa: E402
from retformer.trainer.evidence import ClassText, caption_centre, class_text_embeddings, neighbour_vote  # noqa: E402
from retformer.trainer.features import load_retrieval_features, neighbor_table_path  # noqa: E402
from retformer.trainer.logistic_probe import fit_logistic  # noqa: E402
from retformer.trainer.model import relevance  # noqa: E402
from retformer.trainer.model_factory import build_model, model_from_config  # noqa: E402
from retformer.trainer.selection import shuffled  # noqa: E402
from retformer.trainer.stored_model import parse_stored_model  # noqa: E402
from retformer.trainer.train import (  # noqa: E402
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
    nn_label (N, k), at most `rows` rows (a large split is evaluated by reusing its first rows: the cost is
    the same)."""

    def __init__(self, features: Any, rows: int | None = None) -> None:
        n = len(features) if rows is None else min(rows, len(features))
        b = features.batch(torch.arange(n))
        self.z, self.nn_img, self.nn_txt, self.y = b["z"], b["nn_img"], b["nn_txt"], b["y"]
        self.nn_label = b["nn_label"]

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
            model.branches(z, a, t, data.nn_label[lo : lo + m])
        else:
            model(z, a, t, nn_label=data.nn_label[lo : lo + m])


def bare_fit(
    model: torch.nn.Module, train: Resident, config: Any, steps: int, eval_each: int, val: Resident, **kw: Any
) -> None:
    """`steps` optimizer steps on batches of the resident train split; every `eval_each` steps (an epoch)
    one eval forward over val (branches only for the stacked RetFormer: `kw["branches"]`, which also
    evaluates once before the first step); the threads `fit` would use. kw["data"]: shuffle each epoch
    and mix each batch as the recipe says (False: contiguous slices, no mixup)."""
    with intra_op_threads(head_threads(model, torch.device("cpu"), config.threads)):
        _bare_fit(model, train, config, steps, eval_each, val, **kw)


def _bare_fit(
    model: torch.nn.Module, train: Resident, config: Any, steps: int, eval_each: int, val: Resident, **kw: Any
) -> None:
    optimizer = make_optimizer(model, config)
    targets = soft_targets(train.y, int(kw["num_classes"]), config.label_smoothing)
    adjust = kw.get("adjust")
    data, reads_nn = kw.get("data", True), kw.get("reads_nn", True)
    n, bs = len(train), config.batch_size
    gen = torch.Generator().manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    starts = list(range(0, n, bs))
    order = torch.arange(n)
    if kw.get("branches"):
        eval_rows(model, val, len(val), config.eval_batch_size, True)
    for step in range(steps):
        model.train()
        s = starts[step % len(starts)]
        if data and s == 0:
            order = torch.randperm(n, generator=gen)
        if data:
            idx = order[s : s + bs]
            x, t = train.z[idx], targets[idx]
            a, tx = (train.nn_img[idx], train.nn_txt[idx]) if reads_nn else (None, None)
            lab = train.nn_label[idx]
            if config.mixup_alpha > 0:
                lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                p = torch.randperm(len(idx), generator=gen)
                x, t = lam * x + (1 - lam) * x[p], lam * t + (1 - lam) * t[p]
                if reads_nn:
                    a, tx = lam * a + (1 - lam) * a[p], lam * tx + (1 - lam) * tx[p]
        else:
            x, t, lab = train.z[s : s + bs], targets[s : s + bs], train.nn_label[s : s + bs]
            a, tx = train.nn_img[s : s + bs], train.nn_txt[s : s + bs]
        logits = model.training_logits(x, a, tx, nn_label=lab)
        loss = F.cross_entropy(logits + adjust if adjust is not None else logits, t)
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


def bare_probe(ctx: dict[str, Any], method: str, data: bool) -> tuple[float, int, int]:
    """(seconds, L-BFGS fits, eval rows) of linear_probe's selection and final evaluation: one full-batch
    L-BFGS fit per L2 strength, strongest first, each from the one before (`fit_logistic`, the solver
    itself: what is measured around it is the experiment's selection, prior search and bookkeeping), a val
    forward after each, then val and the eval split."""
    opts, config, res, sizes = ctx["opts"], ctx["plan"]["configs"][method], ctx["res"], ctx["sizes"]
    num_classes, train = int(ctx["info"]["num_classes"]), ctx["features"]["val"]
    torch.manual_seed(config.seed)
    probe = build_model(method, num_classes, train.img_dim, train.txt_dim, ctx["k"], ctx["model_options"])
    z, labels = res["train"].z, res["train"].y
    seconds = 0.0
    for l2 in sorted(opts.probe_l2, reverse=True):
        seconds += timed(fit_logistic, probe, z, labels, l2)
        seconds += timed(eval_rows, probe, res["val"], sizes["val"], config.eval_batch_size)
    seconds += timed(eval_rows, probe, res["val"], sizes["val"], config.eval_batch_size)
    seconds += timed(eval_rows, probe, res["test"], sizes["test"], config.eval_batch_size)
    fits = len(opts.probe_l2)
    return seconds, fits, (fits + 1) * sizes["val"] + sizes["test"]


def bare_baseline(ctx: dict[str, Any], method: str, data: bool) -> tuple[float, int, int]:
    """(seconds, optimizer steps, eval rows) of mlp_only's selection and final evaluation."""
    opts, config, res, sizes = ctx["opts"], ctx["plan"]["configs"][method], ctx["res"], ctx["sizes"]
    num_classes, train = int(ctx["info"]["num_classes"]), ctx["features"]["val"]
    epochs, spe = int(opts.baseline_epochs), math.ceil(sizes["train"] / config.batch_size)
    seconds, steps, rows = 0.0, 0, 0
    for lr in opts.lr_grid:
        torch.manual_seed(config.seed)
        model = build_model(method, num_classes, train.img_dim, train.txt_dim, ctx["k"], ctx["model_options"])
        cfg = replace(config, lr=lr, epochs=epochs)
        kw = {"num_classes": num_classes, "data": data, "reads_nn": False}
        seconds += timed(bare_fit, model, res["train"], cfg, epochs * spe, spe, res["val"], **kw)
        steps += epochs * spe
        rows += epochs * sizes["val"]
    # the final evaluation: val, then the eval split
    seconds += timed(eval_rows, model, res["val"], sizes["val"], config.eval_batch_size)
    seconds += timed(eval_rows, model, res["test"], sizes["test"], config.eval_batch_size)
    return seconds, steps, rows + sizes["val"] + sizes["test"]


def bare_stacked(ctx: dict[str, Any], method: str, data: bool) -> tuple[float, int, int]:
    """(seconds, steps, eval rows) of the stacked RetFormer: each grid cell's L_R training with its val
    branch forwards, the selection's branch forwards per distinct best epoch (val and shuffled val), s,
    and the selected model's predictions on val, test and both shuffled."""
    opts, config, res, sizes = ctx["opts"], ctx["plan"]["configs"][method], ctx["res"], ctx["sizes"]
    num_classes = int(ctx["info"]["num_classes"])
    epochs, spe, eb = (
        int(opts.retformer_epochs),
        math.ceil(sizes["train"] / config.batch_size),
        config.eval_batch_size,
    )
    seconds, steps, rows = 0.0, 0, 0
    for cell, (lr, la_tau) in enumerate(opts.retformer_grid):
        torch.manual_seed(config.seed)
        model = model_from_config(parse_stored_model(ctx["retformer_config"]))
        model.mlp.requires_grad_(False)
        cfg = replace(config, lr=lr, epochs=epochs)
        adjust = logit_adjustment(ctx["class_counts"], la_tau) if la_tau else None
        kw = {"num_classes": num_classes, "adjust": adjust, "branches": True, "data": data}
        seconds += timed(bare_fit, model, res["train"], cfg, epochs * spe, spe, res["val"], **kw)
        steps += epochs * spe
        rows += (epochs + 1) * sizes["val"]
        # per distinct best epoch: L_I, L_R over val and over shuffled val
        best = ctx["stacked_best"]
        repeats = len(best[cell]) if best else len(opts.alphas)
        for _ in range(repeats):
            seconds += timed(eval_rows, model, res["val"], sizes["val"], eb, True)
            seconds += timed(eval_rows, model, res["val_sh"], sizes["val"], eb, True)
        rows += repeats * 2 * sizes["val"]
    with torch.inference_mode(), intra_op_threads(head_threads(model, torch.device("cpu"))):
        seconds += timed(lambda: [relevance(r.z, r.nn_img) for r in (res["val"], res["val_sh"])])
    chosen = {k: v for k, v in ctx["retformer_config"].items() if k in RULE_KEYS}
    model.set_rule(replace(model.rule, **chosen))
    for data_, n in (("val", "val"), ("test", "test"), ("val_sh", "val"), ("test", "test")):
        seconds += timed(eval_rows, model, res[data_], sizes[n], eb)
    return seconds, steps, rows + 2 * sizes["val"] + 2 * sizes["test"]


def bare_votes(ctx: dict[str, Any], method: str, data: bool) -> tuple[float, int, int]:
    """(seconds, 0, rows) of a vote: knn_vote's k grid on val then the chosen k on val and test;
    knn_weighted / caption_vote's (k, temperature) grid on val, then the chosen one on val and test."""
    opts, k, sizes, feats = ctx["opts"], ctx["k"], ctx["sizes"], ctx["features"]
    num_classes, sel = int(ctx["info"]["num_classes"]), ctx["results"][method]["selected"]
    ks = sorted({min(x, k) for x in opts.knn_k})
    if method == "knn_vote":
        seconds = bare_knn(feats["val"], feats["test"], num_classes, ks, sel["k"], ctx["info"]["shot_split"])
        return seconds, 0, len(ks) * sizes["val"] + sizes["val"] + sizes["test"]
    kind = "label" if method == "knn_weighted" else "caption"
    class_text = ctx["class_text"]
    res = {"val": ctx["res"]["val"], "test": ctx["res"]["test"]}

    def vote(split: str, kk: int, temp: float) -> torch.Tensor:
        r = res[split]
        return neighbour_vote(
            kind, r.z, r.nn_img[:, :kk], r.nn_txt[:, :kk], r.nn_label[:, :kk], num_classes, temp, class_text
        )

    def work() -> None:
        for kk in ks:
            for temp in opts.vote_temps:
                vote("val", kk, temp)
        vote("val", sel["k"], sel["vote_temp"])
        for _ in range(0, sizes["test"], len(res["test"])):  # the resident test rows, cycled to its size
            vote("test", sel["k"], sel["vote_temp"])

    if kind == "caption" and class_text is None:
        return 0.0, 0, 0
    with intra_op_threads(vote_threads(sizes["val"] + sizes["test"], k, num_classes)):
        seconds = timed(work)
    if kind == "caption":  # the prompts through the text tower (loaded before the clock) and the centre
        encoder, names = ctx["text_encoder"]
        seconds += timed(class_text_embeddings, encoder, names)
        seconds += timed(caption_centre, ctx["features"]["val"].store_txt)
    rows = len(ks) * len(opts.vote_temps) * sizes["val"] + sizes["val"] + sizes["test"]
    return seconds, 0, rows


BARE = {
    "mlp_only": bare_baseline,
    "linear_probe": bare_probe,
    "retformer": bare_stacked,
    "knn_vote": bare_votes,
    "knn_weighted": bare_votes,
    "caption_vote": bare_votes,
}
TRAINED_HERE = ("mlp_only", "linear_probe", "retformer")
RULE_KEYS = ("alpha", "gate_t", "beta", "prior_tau", "evidence", "vote_temp", "vote_k", "image_weight")


def caption_text_encoder(kb: KBManifest, info: dict[str, Any]) -> tuple[Any, list[str]] | None:
    """The KB's text tower and the class names caption_vote embeds (loaded before any clock)."""
    spec = kb.encoders.text
    names = info.get("class_names") or []
    if not spec or not names:
        return None
    from retformer.kb_builder.encoders import build_text_encoder

    return build_text_encoder(spec), list(names)


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
    methods = list(exp.methods or [])
    order = sorted(methods, key=lambda m: m != "mlp_only")  # mlp_only first: see the docstring
    exp = exp.model_copy(update={"methods": order})
    plan = plan_experiment(exp, kb)
    plan["select"] = plan["select"].for_dataset(ds.name)
    k = exp.k
    ensure_tables(args.workdir, ds.name, kb.name, k)
    ws = Workspace(args.workdir)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        report = run_experiment(ws, ds, kb, exp, run_dir, progress=not args.no_progress)
        experiment_s = time.perf_counter() - started
        info = read_json(ws.dataset_info(ds.name))
        splits = {s: load_retrieval_features(ws, ds.name, kb.name, k, s) for s in ("train", "val", "test")}
        stacked_best = (
            best_epochs(
                run_dir / "retformer.metrics.jsonl",
                # the figure the stacked selection keeps its checkpoints by: val top-1 per alpha (grid)
                # or the fitted rule's val log-likelihood per (evidence, gate) (select.rule_fit: stack)
                "val_loglik_" if plan["select"].rule_fit == "stack" else "val_top1_",
            )
            if "retformer" in methods and plan["recipe"] == "stacked"
            else None
        )
        # the selected RetFormer's architecture (anchor and query bias resolved as the selection did)
        retformer_config = (
            load_model(run_dir / "retformer.pt").config if (run_dir / "retformer.pt").is_file() else None
        )
    results = report["methods"]
    train, val, test = (splits[s] for s in ("train", "val", "test"))
    # What the experiment's fits train on: train plus its KB episodes, every fit's epochs scaled to keep
    # its steps (`add_kb_episodes` updates `plan`); the prior their heads learn counts the episodes.
    episodes = ExperimentContext(ws, ds, kb, exp, info, progress=False)
    if exp.kb_episodes:
        train = add_kb_episodes(episodes, plan, train, val, exp.kb_episodes)
    opts = plan["select"]
    sizes = {"train": len(train), "val": len(val), "test": len(test)}
    res = {
        "train": Resident(train),
        "val": Resident(val),
        "val_sh": Resident(shuffled(val, opts.shuffle_seed)),
        "test": Resident(test, rows=2048),
    }
    ctx = {
        "opts": opts,
        "plan": plan,
        "info": info,
        "k": k,
        "sizes": sizes,
        "res": res,
        "model_options": FusionOptions(**given(exp.model)),
        "retformer_config": retformer_config,
        "stacked_best": stacked_best,
        "results": results,
        "features": {"val": val, "test": test},
        "class_counts": episodes.class_counts,
    }
    ctx["text_encoder"] = caption_text_encoder(kb, info) if "caption_vote" in methods else None
    # What caption_vote reads with: the prompts and the store's caption centre (captions read centred).
    ctx["class_text"] = (
        ClassText(class_text_embeddings(*ctx["text_encoder"]), caption_centre(val.store_txt))
        if ctx["text_encoder"]
        else None
    )
    out: dict[str, Any] = {}
    for method in order:
        if method not in BARE:
            print(method, "has no bare measure here", file=sys.stderr)
            continue
        bare_s, steps, rows = BARE[method](ctx, method, True)
        steps_s = BARE[method](ctx, method, False)[0] if method in TRAINED_HERE else bare_s
        wall = float(results[method]["seconds"])
        out[method] = {
            "wall_s": round(wall, 2),
            "bare_s": round(bare_s, 2),
            "wall_over_bare": round(wall / bare_s, 3) if bare_s > 0 else None,
            "bare_steps_s": round(steps_s, 2),
            "wall_over_bare_steps": round(wall / steps_s, 3) if steps_s > 0 else None,
            "optimizer_steps": steps,
            "eval_rows": rows,
            "top1": results[method].get("top1"),
        }
        print(method, json.dumps(out[method]), file=sys.stderr, flush=True)

    doc = {
        "command": "python bench/bench_trainer.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "dataset": ds.name,
        "kb": kb.name,
        "experiment": exp.name,
        "overrides": overrides,
        "sizes": {**sizes, "k": k, "kb_episodes": episodes.kb_episodes},
        "experiment_seconds": round(experiment_s, 1),
        "methods": out,
        "goal": "wall_over_bare <= 1.25 for every method",
        "bare": "shuffle, mixup, optimizer steps and eval forwards on resident tensors (bare_steps: the "
        "steps and eval forwards alone)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
