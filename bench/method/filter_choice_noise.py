"""How sure val is of the kNN filter choice (`kb_episode_filter: auto`): for each seed of a finished
demo-style workspace, the mlp_only selection fitted with the filtered and with the unfiltered KB
episodes (exactly as `pipelines.experiment_episodes` fits them), each one's val predictions, and a
paired bootstrap of (without filter) - (with filter) in the experiment's select metric, resampling val
images within each class (val's class counts stay fixed). Label KBs only (their labels are the dataset's
classes). Prints one line per seed and writes nothing; e.g.

    RETFORMER_MANIFESTS=/tmp/ownlt100/manifests python bench/method/filter_choice_noise.py \\
        /tmp/ownlt100/work minef minef_world --seeds 3
"""

import argparse
from pathlib import Path

import numpy as np

from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines import stages
from retformer.pipelines.experiment import _load_inputs
from retformer.pipelines.experiment_context import ExperimentContext
from retformer.pipelines.experiment_episodes import _filter_options, _scaled_epochs
from retformer.pipelines.experiment_methods import select_mlp_only
from retformer.pipelines.experiment_plan import eval_splits, plan_experiment
from retformer.trainer.kb_episodes import class_counts
from retformer.trainer.train import predict


def balanced(right: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class accuracy over the classes val has."""
    return float(np.mean([right[labels == c].mean() for c in range(num_classes) if (labels == c).any()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("dataset")
    parser.add_argument("kb")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    ws = Workspace(args.workdir)
    ds, kb = stages.load_dataset_manifest(args.dataset, None), stages.load_kb(args.kb, None)
    base = stages.load_experiment(args.experiment, None)
    first = base.train.seed if base.train else 0
    for seed in range(first, first + args.seeds):
        exp = base.seeded(seed)
        plan = plan_experiment(exp, kb)
        info = read_json(ws.dataset_info(ds.name))
        plan["select"] = plan["select"].for_dataset(ds.name)
        inputs = _load_inputs(ws, ds.name, kb.name, plan, info, eval_splits(exp, info), exp.select_split)
        ctx = ExperimentContext(ws, ds, kb, exp, info, False)
        ctx.table_k = inputs.table_k
        train, val, num_classes = inputs.train_all, inputs.val_all, int(info["num_classes"])
        labels = train.store_label.cpu().numpy()
        options = _filter_options(ctx, train, labels, num_classes, exp.kb_episodes)
        right, scores = {}, {}
        for name, (union, _) in options.items():
            scaled = {**plan, **_scaled_epochs(plan, len(train) / len(union))}
            sel = select_mlp_only(ctx, scaled, union, val, class_counts(union.labels, num_classes))
            scores[name] = float(sel.selected["val_score"])
            right[name] = (predict(sel.model, val).argmax(1).cpu().numpy() == val.labels.cpu().numpy()) * 1.0
        y = val.labels.cpu().numpy()
        diff = balanced(right["none"], y, num_classes) - balanced(right["knn"], y, num_classes)
        rng = np.random.default_rng(0)
        by_class = [np.nonzero(y == c)[0] for c in range(num_classes) if (y == c).any()]
        draws = []
        for _ in range(args.draws):
            rows = np.concatenate([rng.choice(r, len(r)) for r in by_class])
            draws.append(
                balanced(right["none"][rows], y[rows], num_classes)
                - balanced(right["knn"][rows], y[rows], num_classes)
            )
        lo, hi = np.percentile(draws, [2.5, 97.5])
        p_worse = float(np.mean(np.array(draws) <= 0))
        print(
            f"seed {seed}: val knn {scores['knn']:.4f} none {scores['none']:.4f}; none - knn {diff:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] (95%), share of draws <= 0: {p_worse:.3f}; "
            f"discordant images {int((right['none'] != right['knn']).sum())} of {len(y)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
