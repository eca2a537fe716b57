"""On-disk names that more than one layer spells: one definition each (the folders themselves are
`artifacts.workspace.Workspace`'s)."""

from __future__ import annotations

import re

# A KB index folder's record (`Workspace.kb_index`): written last by the index stage, so its presence
# means the index is complete (kb_builder/index/build.py).
INDEX_JSON = "index.json"
# A neighbor-table folder's KB rows (`Workspace.neighbors_dir`), as the neighbors stage writes them.
NEIGHBOR_STORE = "store.parquet"
# `<run>/predictions/<result>.parquet`: one row per eval sample of a result.
PREDICTIONS = "predictions"


def safe_name(key: str) -> str:
    """A result name as a file name (`retformer@k8` -> `retformer-k8`): the stem of every file of a
    result in its run folder (model, checkpoint, metrics, predictions, TensorBoard folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def prediction_file(name: str) -> str:
    """Where result `name`'s per-sample predictions live, relative to the run folder."""
    return f"{PREDICTIONS}/{safe_name(name)}.parquet"
