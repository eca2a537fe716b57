"""The notebook API: `load_run` -> `Run.predict`, and the readers of the pipeline's Parquet tables."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from retformer.artifacts.embeddings_io import arrow_to_table, list_parts, read_part_arrow
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import NEIGHBOR_STORE
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.use.inputs import iter_inputs
from retformer.pipelines.use.model_file import workspace_of
from retformer.pipelines.use.predictor import Predictor
from retformer.trainer.features import neighbor_k_values, neighbor_table_path

log = logging.getLogger(__name__)

RECORD_COLUMNS = [
    "path",
    "uid",
    "class",
    "class_index",
    "score",
    "top5",
    "label",
    "label_class",
    "correct",
    "retrieval_used",
    "mean_similarity",
    "ood",
    "neighbors",
]


class Run:
    """A trained run's model with its encoder, KB index and class names, ready to predict.

    Attributes: `method` (the model's result name), `class_names`, `k` (neighbors the model reads),
    `model` (the torch module, eval mode), `info` (what the model file records: encoders, KB, index
    parameters, dataset, training config), `path` (the model file), `skipped` (the inputs the last
    `predict` could not read, as (name, reason))."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor
        self.method = predictor.method
        self.class_names = predictor.class_names
        self.k = predictor.k
        self.model = predictor.model
        self.info = predictor.info
        self.path = predictor.saved.path
        self.skipped: list[tuple[str, str]] = []

    def __repr__(self) -> str:
        return f"Run({self.path.parent.name}: {self.method}, k={self.k}, {len(self.class_names)} classes)"

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """The run's eval.json (every method's metrics), or None when the model file is not in its run."""
        return read_json(self.path.parent / "eval.json")

    @property
    def ood_threshold(self) -> float | None:
        """The s below which `predict` flags an image `ood`: percentile 1 of s over the run's val images
        (pipelines/relevance.py); None when the run's val neighbour table is not at hand."""
        return self._predictor.ood_threshold().value

    def predict(
        self,
        images: str | Path | Iterable[str | Path] | None = None,
        *,
        embeddings: Any = None,
        uids: list[str | None] | None = None,
        neighbors: int = 5,
        batch_size: int | None = None,
        progress: bool = False,
        kb: str | None = None,
    ) -> pd.DataFrame:
        """Predictions, one row per image: path, uid, class, class_index, score, top5, label,
        label_class, correct (the true class where a shard sample or the embeddings' `label` column
        gives one, else None), retrieval_used, mean_similarity, ood (`retformer predict`'s fields, see
        pipelines/relevance.py), neighbors.

        images: image files, folders (searched recursively) and webdataset shards (`.tar`); unreadable
        ones are logged, listed in `self.skipped` and left out. embeddings instead: a DataFrame from
        `read_embeddings` (its `image_emb`, and `uid` so that a KB row with the query's own uid is not
        retrieved, as in the run's neighbor tables) or an (N, D) array made by the run's image encoder
        (rounded to float16, as the embed stage stores it; `uids` optional). `neighbors`: how many of
        the k neighbors each row lists. `kb`: retrieve from that KB of the run's workspace instead of
        the run's own (embedded with the run's encoders; or the run's KB grown since): the same trained
        model with other knowledge, as `retformer predict --kb` and `retformer evaluate --kb`."""
        predictor = self._predictor if kb is None else self._with_kb(kb)
        if (images is None) == (embeddings is None):
            raise UserError("give images or embeddings (one of them)")
        self.skipped = []
        if images is not None:
            paths = [images] if isinstance(images, (str, Path)) else list(images)

            def skip(name: str, reason: str) -> None:
                self.skipped.append((name, reason))
                log.warning("%s: skipped (%s)", name, reason)

            records = list(
                predictor.predict_images(
                    iter_inputs(paths), neighbors, batch_size, on_skip=skip, progress=progress
                )
            )
        else:
            names, labels = None, None
            if isinstance(embeddings, pd.DataFrame):
                if "image_emb" not in embeddings:
                    raise UserError("the embeddings DataFrame has no image_emb column (see read_embeddings)")
                if uids is None and "uid" in embeddings:
                    uids = embeddings["uid"].tolist()
                    names = list(uids)
                if "label" in embeddings:  # -1: none (read_embeddings)
                    labels = [int(y) for y in embeddings["label"]]
                vectors = (
                    np.stack(embeddings["image_emb"].to_numpy()) if len(embeddings) else np.zeros((0, 0))
                )
            else:
                vectors = np.asarray(embeddings)
            records = predictor.predict_embeddings(vectors, uids, names, neighbors, labels)
        return pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)

    def _with_kb(self, kb: str) -> Predictor:
        """A predictor of the same model searching KB `kb` (kept for the next call with that KB)."""
        cache = self.__dict__.setdefault("_by_kb", {})
        if kb not in cache:
            p = self._predictor
            ws = workspace_of(p.saved, p.ws.root, kb)
            cache[kb] = Predictor(p.saved, ws, str(p.device), kb)
        return cache[kb]


def load_run(
    run: str | Path, method: str | None = None, workdir: str | Path = "work", device: str = "auto"
) -> Run:
    """A trained run: a run folder, a run name under `workdir/runs` (a pattern such as
    `fmnist_lt-fmnist_world-demo-*` picks the newest match), or a model file (`<run>/<method>.pt`).

    method: which of the run's models (default: retformer, else the run's only model); device: auto,
    cpu, cuda. Everything else comes from the model file; the KB must be the one the run was trained
    against (checked)."""
    return Run(Predictor.open(run, method, workdir, device))


def _vectors_column(vectors: np.ndarray, present: np.ndarray | None = None) -> list[Any]:
    """One float32 1-d array per row (None where `present` is False), views into one matrix."""
    matrix = vectors.astype(np.float32)
    rows: list[Any] = list(matrix)
    if present is not None:
        rows = [row if ok else None for row, ok in zip(rows, present, strict=True)]
    return rows


def read_embeddings(path: str | Path) -> pd.DataFrame:
    """An embeddings folder (parts in kb_id order), one part, or a neighbor store as a DataFrame.

    The Parquet files keep each vector as float16 bytes in a `fixed_size_binary` column (fast to write and
    read: artifacts/embeddings_io.py), which pandas alone shows as bytes; here they come back decoded:
    columns uid, image_emb (float32 numpy vector), text_emb (float32 vector, None where the sample has no
    caption), caption, label (-1 = none), source, plus kb_id for a neighbor store. For a KB's embeddings
    folder the row number is the kb_id. `np.stack(df.image_emb)` gives the (N, D) matrix."""
    path = Path(path)
    parts = list_parts(path) if path.is_dir() else [path]
    if not parts:
        raise UserError(f"no embeddings parts in {path} (run the embed stage first)")
    frames = []
    for part in parts:
        arrow = read_part_arrow(part)
        table = arrow_to_table(arrow)
        frame = pd.DataFrame(
            {
                "uid": table.uid.astype(str),
                "image_emb": _vectors_column(table.image_emb),
                "text_emb": _vectors_column(table.text_emb, table.has_text),
                "caption": table.caption,
                "label": table.label.astype(np.int64),
                "source": table.source,
            }
        )
        if "kb_id" in arrow.column_names:
            frame["kb_id"] = arrow.column("kb_id").to_numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _fixed_lists(column: pa.ChunkedArray, k: int) -> np.ndarray:
    arr = column.combine_chunks()
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).reshape(len(arr), k)


def read_neighbors(workdir: str | Path, dataset: str, kb: str, k: int, split: str) -> pd.DataFrame:
    """A split's neighbor table against a KB, one row per query image, with the neighbors' KB rows joined.

    Columns: uid, label (-1 = none) and class (the dataset's class name) of the query; nn_kb_id (int64
    array, best first), nn_score (float32 array, cosine similarity), nn_uid, nn_caption (lists) and
    nn_label (int64 array, -1 = none) of its k neighbors. Read from the table with this k, else the
    smallest larger one cut to k. `df.explode(["nn_kb_id", "nn_score", "nn_uid", "nn_caption",
    "nn_label"])` gives one row per (query, neighbor)."""
    ws = Workspace(Path(workdir))
    have = neighbor_k_values(ws, dataset, kb)
    table_k = k if k in have else min((x for x in have if x >= k), default=None)
    if table_k is None or k < 1:
        raise UserError(
            f"no neighbor table with k >= {k} for {dataset} x {kb} under {workdir} (have: {have or 'none'}): "
            f"run `retformer neighbors --dataset {dataset} --kb {kb} --k {k}`"
        )
    nn_path = neighbor_table_path(ws, dataset, kb, table_k, split)
    if not nn_path.is_file():
        raise UserError(f"no neighbor table for split {split!r}: {nn_path} is missing")
    nn = read_part_arrow(nn_path, columns=["uid", "nn_id", "nn_score"])
    ids = _fixed_lists(nn.column("nn_id"), table_k)[:, :k].astype(np.int64)
    scores = _fixed_lists(nn.column("nn_score"), table_k)[:, :k].astype(np.float32)
    store_path = ws.neighbors_dir(dataset, kb, table_k) / NEIGHBOR_STORE
    store = read_part_arrow(store_path, columns=["kb_id", "uid", "caption", "label"])
    kb_id = store.column("kb_id").to_numpy().astype(np.int64)
    order = np.argsort(kb_id, kind="stable")
    rows = order[np.searchsorted(kb_id[order], ids)]
    s_uid = np.array(store.column("uid").to_pylist(), dtype=object)
    s_caption = np.array(store.column("caption").to_pylist(), dtype=object)
    s_label = store.column("label").fill_null(-1).to_numpy().astype(np.int64)
    queries = pd.concat(
        [
            read_part_arrow(p, columns=["uid", "label"]).to_pandas()
            for p in list_parts(ws.dataset_embeddings(dataset, split))
        ],
        ignore_index=True,
    )
    queries["label"] = queries["label"].fillna(-1).astype(np.int64)
    label_of = dict(zip(queries["uid"], queries["label"], strict=True))
    names = (read_json(ws.dataset_info(dataset)) or {}).get("class_names") or []
    uids = nn.column("uid").to_pylist()
    labels = [int(label_of.get(u, -1)) for u in uids]
    return pd.DataFrame(
        {
            "uid": uids,
            "label": labels,
            "class": [names[y] if 0 <= y < len(names) else None for y in labels],
            "nn_kb_id": list(ids),
            "nn_score": list(scores),
            "nn_uid": [list(s_uid[r]) for r in rows],
            "nn_caption": [list(s_caption[r]) for r in rows],
            "nn_label": list(s_label[rows]),
        }
    )
