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
import torch

from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines import stages
from retformer.pipelines.experiment import _load_inputs
from retformer.pipelines.experiment_context import ExperimentContext
from retformer.pipelines.experiment_episodes import _episodes_selection, _filter_options
from retformer.pipelines.experiment_plan import eval_splits, plan_experiment
from retformer.trainer.evidence import balanced_accuracy
from retformer.trainer.train import predict


def gain(logits: dict[str, torch.Tensor], y: torch.Tensor, rows: np.ndarray | slice) -> float:
    """Balanced val accuracy without the filter minus with it, on the val rows `rows`."""
    return balanced_accuracy(logits["none"][rows], y[rows]) - balanced_accuracy(logits["knn"][rows], y[rows])


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
    info = read_json(ws.dataset_info(ds.name))
    # The features are the same for every seed (a seed changes what training draws, nothing read)
    plan = plan_experiment(base, kb)
    plan["select"] = plan["select"].for_dataset(ds.name)
    inputs = _load_inputs(ws, ds.name, kb.name, plan, info, eval_splits(base, info), base.select_split)
    train, val, num_classes = inputs.train_all, inputs.val_all, int(info["num_classes"])
    y = val.labels.long()
    by_class = [torch.nonzero(y == c).flatten().numpy() for c in range(num_classes) if (y == c).any()]
    first = base.train.seed if base.train else 0
    for seed in range(first, first + args.seeds):
        exp = base.seeded(seed)
        plan = plan_experiment(exp, kb)
        plan["select"] = plan["select"].for_dataset(ds.name)
        ctx = ExperimentContext(ws, ds, kb, exp, info, False)
        ctx.table_k = inputs.table_k
        options = _filter_options(ctx, train, train.store_label.cpu().numpy(), num_classes, exp.kb_episodes)
        # Each option's fit as the run fits it (`_chosen_on_val`), then its val scores for the bootstrap
        fits = {
            name: _episodes_selection(ctx, plan, train, val, union, name)
            for name, (union, _) in options.items()
        }
        logits = {name: predict(fit.selection.model, val) for name, fit in fits.items()}

        rng = np.random.default_rng(0)
        draws = np.array(
            [
                gain(logits, y, np.concatenate([rng.choice(r, len(r)) for r in by_class]))
                for _ in range(args.draws)
            ]
        )
        lo, hi = np.percentile(draws, [2.5, 97.5])
        right = {name: out.argmax(1) == y for name, out in logits.items()}
        discordant = int((right["none"] != right["knn"]).sum())
        print(
            f"seed {seed}: val knn {fits['knn'].val_score:.4f} none {fits['none'].val_score:.4f}; none - knn "
            f"{gain(logits, y, slice(None)):+.4f} [{lo:+.4f}, {hi:+.4f}] (95%), share of draws <= 0: "
            f"{float(np.mean(draws <= 0)):.3f}; images right in one fit only {discordant} of {len(y)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
