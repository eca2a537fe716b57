"""RetFormer's Python API, for notebooks: load a trained run, predict on images or embeddings, and read
the pipeline's tables (embeddings, neighbors) as pandas DataFrames.

    from retformer import load_run, read_embeddings, read_neighbors

    run = load_run("fmnist_lt-fmnist_world-demo-*")  # a run name or pattern, a run folder, a model file
    preds = run.predict(["shirt.png", "photos/", "shard-00000.tar"])  # files, folders, shards
    preds = run.predict(embeddings=read_embeddings("work/datasets/fmnist_lt/embeddings/test"))
    table = read_neighbors("work", "fmnist_lt", "fmnist_world", k=32, split="test")

`Run.predict` returns one row per image: path, uid, class, class_index, score (softmax of the logits),
top5 (list of {class, index, score}) and neighbors (list of {kb_id, uid, caption, similarity, label}),
the same records `retformer predict` writes as JSON lines (`pipelines/use/` does the work).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retformer.api import Run, load_run, read_embeddings, read_neighbors

__all__ = ["Run", "load_run", "read_embeddings", "read_neighbors"]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): every subpackage (retformer.pipelines.cli, the CLI's entry point,
    # included) runs this file first, and the API pulls in torch, webdataset and pandas; eagerly, each
    # `retformer` command paid ~2 s of imports before parsing its arguments.
    if name in __all__:
        import retformer.api as api

        return getattr(api, name)
    raise AttributeError(f"module 'retformer' has no attribute {name!r}")
