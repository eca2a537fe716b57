"""A small run shaped like the demo's, for the browser and report screenshots (tests/test_browse.py):
Fashion-MNIST-LT with a val split and a disjoint world KB with 20%-wrong template captions (the demo's
fmnist_lt x fmnist_world at a few hundred images), trained with the demo's own experiment manifest
(recipe stacked, every choice on val, the `retformer:shuffled` control) at `retformer demo --quick`'s
grids. Built in this process with the stage_* functions the CLI calls (about a minute on 2 busy cores)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FMNIST_DIR, SMALL_ENCODERS, write_manifest

RUN = "demo_like"
K = 8


def build_demo_like(root: Path) -> Path:
    """Every stage on the small demo-like slice under `root/work`; returns the run folder."""
    from retformer.artifacts.workspace import Workspace
    from retformer.pipelines import stages
    from retformer.pipelines.demo import QUICK_OVERRIDES

    manifests = root / "manifests"
    ds_path = write_manifest(
        manifests / "mini_lt.yaml",
        {
            "name": "mini_lt",
            "kind": "fashion_mnist_lt",
            "root": str(FMNIST_DIR),
            "n_max": 40,
            "imbalance_ratio": 10,
            "seed": 0,
            "val_per_class": 10,
            "shard_size": 200,
            "test_limit": 200,
            "shot_thresholds": {"many": 20, "few": 8},
            "neighbors": {"k": K},
        },
    )
    kb_path = write_manifest(
        manifests / "mini_world.yaml",
        {
            "name": "mini_world",
            "source": {"kind": "world", "dataset": str(ds_path), "size": 400, "wrong_caption_fraction": 0.2},
            "shard_size": 200,
            "encoders": SMALL_ENCODERS,
            "embed": {"batch_size": 64},
            "index": {"kind": "auto", "recall_target": 0.9, "memory_budget_gb": 1, "num_shards": 1, "k": K},
        },
    )
    ws = Workspace(root / "work")
    kb = stages.load_kb(str(kb_path), None)
    ds = stages.load_dataset_manifest(str(ds_path), None)
    # the demo's experiment at the quick grids, at the small KB's k
    overrides = [*QUICK_OVERRIDES, f"experiment.k={K}", f"experiment.select.knn_k=[1,4,{K}]"]
    exp = stages.load_experiment("demo", overrides)
    stages.stage_shards(ws, kb, ds, None)
    stages.stage_embed_kb(ws, kb, None)
    stages.stage_embed_dataset(ws, ds, kb.encoders, None, kb.embed)
    stages.stage_index(ws, kb, in_process=True)
    stages.stage_neighbors(ws, ds, kb)
    stages.stage_train(ws, ds, kb, exp, RUN)
    return ws.run_dir(RUN)
