"""A run's KB as prediction searches it: the index with the run's tuned parameters (checked to be the
one the run was trained against) and the top-k neighbors of new queries as `RetrievalFeatures`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retformer.artifacts.embeddings_io import arrow_to_table, list_parts
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.trainer.features import RetrievalFeatures


@dataclass(frozen=True)
class KbIndex:
    """A KB's loaded index with its embeddings parts and their kb_id offsets (where the rows live)."""

    index: Any
    parts: list[Path]
    offsets: np.ndarray


def open_kb_index(ws: Workspace, kb: str, record: dict[str, Any], model_file: str, same_kb: bool) -> KbIndex:
    """KB `kb`'s index in `ws`. `same_kb` (the run's own KB): UserError unless its key, size and parts
    are those the model file `record`s, then searched with the run's tuned parameters; another KB is
    searched as it is now, with its own."""
    from retformer.kb_builder.index.search import ShardedIndex
    from retformer.kb_builder.neighbors import part_offsets

    index = ShardedIndex.load(ws.kb_index(kb))
    parts = list_parts(ws.kb_embeddings(kb))
    offsets = part_offsets(parts)
    now = {"key": index.meta.get("key"), "n": index.ntotal}
    was = {"key": record.get("key"), "n": record.get("n")}
    kb_parts = [[p.name, int(b - a)] for p, a, b in zip(parts, offsets[:-1], offsets[1:], strict=True)]
    changed = now != was or (record.get("parts") and kb_parts != [list(p) for p in record["parts"]])
    if changed and same_kb:
        raise UserError(
            f"the KB {kb} in {ws.root} is not the one {model_file} was trained "
            f"against (index {now}, the run's {was}): retrain the run on the current KB, or pass "
            f"--kb {kb} to predict with the KB as it is now"
        )
    if same_kb:
        index.set_params(record.get("params") or {})
    return KbIndex(index, parts, offsets)


def retrieve(
    kb: KbIndex, z16: np.ndarray, uids: list[str | None], k: int, search_k: int, kb_name: str
) -> tuple[RetrievalFeatures, Any, np.ndarray]:
    """The queries z16 (float16 (N, D)) with their top-k KB neighbors: (`RetrievalFeatures` with
    labels -1, the KB rows they use as an EmbeddingTable, those rows' kb_ids). Searched as the
    neighbors stage searches: `search_k` deep cut to `k`, the same self-exclusion by uid."""
    from retformer.kb_builder.neighbors import build_store, self_kb_ids

    index = kb.index
    q = z16.astype(np.float32)
    if q.shape[1] != index.d:
        raise UserError(f"embeddings have {q.shape[1]} dimensions, the KB index {index.d}")
    self_ids = np.full(len(q), -1, dtype=np.int64)
    if any(u is not None for u in uids):  # only shard samples have uids (a file has none)
        self_ids = self_kb_ids(kb.parts, kb.offsets, np.array([u or "" for u in uids], dtype=object))
        self_ids[np.array([u is None for u in uids], dtype=bool)] = -1
    scores, ids = index.search(q, search_k, exclude_ids=self_ids)
    if (ids < 0).any():
        raise UserError(f"the KB {kb_name} returned fewer than {search_k} neighbors for some images")
    ids, scores = ids[:, :k], scores[:, :k]
    store = build_store(kb.parts, kb.offsets, ids.reshape(-1))
    kb_id = store.column("kb_id").to_numpy()
    rows = np.searchsorted(kb_id, ids)
    table = arrow_to_table(store)
    features = RetrievalFeatures(
        query_img=torch.from_numpy(q),
        labels=torch.full((len(q),), -1, dtype=torch.long),
        uids=[u or "" for u in uids],
        nn_rows=torch.from_numpy(rows.astype(np.int64)),
        nn_score=torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
        store_img=torch.from_numpy(np.array(table.image_emb)),  # a copy: Arrow's buffers are read-only
        store_txt=torch.from_numpy(np.array(table.text_emb)),
        store_has_text=torch.from_numpy(table.has_text.astype(bool)),
        store_label=torch.from_numpy(table.label.astype(np.int64)),
    )
    return features, table, kb_id
