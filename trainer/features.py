"""Retrieval features in memory: query embeddings, neighbor ids, and the compact neighbor store.

Memory layout: the neighbors' vectors are never materialised per query as (N, k, D) (for
ImageNet-LT at k=32 that is the paper's 30 GB); each query holds k row indexes into the store and
`batch()` gathers the vectors of one mini-batch. The store keeps the dtype it was read with
(float16 from Parquet: half the memory); `batch()` returns float32.

The store is either read into RAM or memory-mapped (`open_store`): a large store (from
STORE_MMAP_AUTO_BYTES of vectors on, or `mmap=True`) is first copied once, row batch by row batch,
into raw .npy files in `store.mmap/` beside `store.parquet` (a folder swapped in whole, keyed by the
Parquet file's size and mtime), then opened with `np.load(mmap_mode="c")`. The vectors then live in
the page cache, not in the process: every split of an experiment and every process of a
multi-process run share one copy, the kernel reads only the rows a batch gathers, and the gathered
values are bit for bit those of the in-RAM path. docs/scale.md has the figures.
Paths come from `artifacts.workspace.Workspace`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from retformer.artifacts.atomic import atomic_dir
from retformer.artifacts.embeddings_io import binary_to_vectors, read_embeddings, read_part_arrow
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import output_lock
from retformer.artifacts.names import NEIGHBOR_STORE
from retformer.artifacts.workspace import Workspace

log = logging.getLogger(__name__)

# The memory-mappable copy of the neighbor store (artifacts.names.NEIGHBOR_STORE) that the trainer writes
# beside it (`build_store_mmap`).
STORE_MMAP = "store.mmap"
STORE_MMAP_FORMAT = 1
# Auto mode memory-maps a store from this many bytes of vectors on: below it, reading it into RAM is
# cheap and leaves no extra files; above it the copies add up (one per split and per process).
STORE_MMAP_AUTO_BYTES = 256 << 20
# A split whose neighbours' vectors take at most this many bytes as float32 (N, k, Di + Dt) keeps them
# gathered once (`RetrievalFeatures.make_resident`): Fashion-MNIST-LT's train split at k = 32 is 0.27 GB.
RESIDENT_MAX_BYTES = 1 << 30
# Rows decoded at a time while copying a store into its .npy files (bounds the copy's memory).
STORE_COPY_ROWS = 65_536
_STORE_COLUMNS = ["kb_id", "image_emb", "text_emb", "label"]


def neighbor_table_path(ws: Workspace, dataset: str, kb: str, k: int, split: str) -> Path:
    """The neighbor table of one split: uid, nn_id[k], nn_score[k]."""
    return ws.neighbors_dir(dataset, kb, k) / f"{split}.parquet"


def neighbor_k_values(ws: Workspace, dataset: str, kb: str) -> list[int]:
    """The k values for which a dataset x KB has neighbor tables (a complete store)."""
    parent = ws.neighbors_dir(dataset, kb, 0).parent
    found = (int(p.name[1:]) for p in parent.glob("k*") if p.name[1:].isdigit())
    return sorted(k for k in found if (ws.neighbors_dir(dataset, kb, k) / NEIGHBOR_STORE).is_file())


@dataclass
class RetrievalFeatures:
    """Queries of one split with their top-k neighbors, as row indexes into a shared store.

    query_img (N, Di) float32, labels (N,) int64 (-1 = unknown), uids list[str] (N),
    nn_rows (N, k) int64 rows of the store, nn_score (N, k) float32 cosine (descending),
    store_img (M, Di), store_txt (M, Dt) (zeros where no text), store_has_text (M,) bool,
    store_label (M,) int64 (-1 = none).
    """

    query_img: torch.Tensor
    labels: torch.Tensor
    uids: list[str]
    nn_rows: torch.Tensor
    nn_score: torch.Tensor
    store_img: torch.Tensor
    store_txt: torch.Tensor
    store_has_text: torch.Tensor
    store_label: torch.Tensor

    def __post_init__(self) -> None:
        n = self.query_img.shape[0]
        m = self.store_img.shape[0]
        if not (len(self.labels) == len(self.uids) == self.nn_rows.shape[0] == self.nn_score.shape[0] == n):
            raise ValueError("query_img, labels, uids, nn_rows and nn_score must have the same length")
        if self.nn_rows.shape != self.nn_score.shape:
            raise ValueError(f"nn_rows {tuple(self.nn_rows.shape)} != nn_score {tuple(self.nn_score.shape)}")
        if not (self.store_txt.shape[0] == len(self.store_has_text) == len(self.store_label) == m):
            raise ValueError("store arrays must have the same number of rows")
        if self.nn_rows.numel() and (int(self.nn_rows.min()) < 0 or int(self.nn_rows.max()) >= m):
            raise ValueError(f"nn_rows out of range for a store of {m} rows")

    def __len__(self) -> int:
        return int(self.query_img.shape[0])

    @property
    def k(self) -> int:
        """Neighbors per query."""
        return int(self.nn_rows.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.query_img.shape[1])

    @property
    def txt_dim(self) -> int:
        return int(self.store_txt.shape[1])

    @property
    def device(self) -> torch.device:
        return self.query_img.device

    def batch(
        self, idx: torch.Tensor | np.ndarray | list[int], neighbors: bool = True
    ) -> dict[str, torch.Tensor]:
        """Gather one mini-batch: z (B, Di), y (B,), and unless neighbors=False, nn_img (B, k, Di),
        nn_txt (B, k, Dt), nn_label (B, k), nn_score (B, k), nn_has_text (B, k); all on self.device,
        vectors float32."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        out = {"z": self.query_img[idx].float(), "y": self.labels[idx]}
        if neighbors:
            rows = self.nn_rows[idx]  # (B, k)
            dense = self._resident
            out["nn_img"] = dense[0][idx] if dense else self.store_img[rows].float()
            out["nn_txt"] = dense[1][idx] if dense else self.store_txt[rows].float()
            out["nn_label"] = self.store_label[rows]
            out["nn_score"] = self.nn_score[idx]
            out["nn_has_text"] = self.store_has_text[rows]
        return out

    # ---------------------------------------------------------------- resident neighbour vectors
    # A split small enough (RESIDENT_MAX_BYTES) keeps its neighbours' vectors gathered once, as float32
    # (N, k, D) tensors: training batches index them, evaluation reads them in slices (no copy), instead
    # of gathering (and widening from float16) every batch of every epoch again. The values are those
    # the store gather gives, bit for bit. The cache is no dataclass field: `replace()` (subset_k,
    # shuffled, to) makes features without it, so it can never describe other neighbour rows.

    @property
    def _resident(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.__dict__.get("_dense")

    def resident_bytes(self) -> int:
        """Bytes of the float32 (N, k, Di + Dt) neighbour vectors `make_resident` would hold."""
        return len(self) * self.k * (self.img_dim + self.txt_dim) * 4

    def make_resident(self, max_bytes: int | None = None) -> bool:
        """Gather every query's neighbour vectors once (float32, on self.device) when they take at most
        `max_bytes` (default RESIDENT_MAX_BYTES); True when they are (now) resident."""
        if self._resident is not None:
            return True
        if self.resident_bytes() > (RESIDENT_MAX_BYTES if max_bytes is None else max_bytes):
            return False
        self.__dict__["_dense"] = (self.store_img[self.nn_rows].float(), self.store_txt[self.nn_rows].float())
        return True

    def inputs(self, start: int, stop: int, neighbors: bool = True) -> dict[str, torch.Tensor]:
        """The model inputs of queries [start, stop): z (float32) and, unless neighbors=False, nn_img and
        nn_txt (float32): slices of the resident tensors (no copy) when resident, else `batch`'s gather;
        and nn_label (int64), the neighbours' KB labels (what a rule with label evidence reads)."""
        z = self.query_img[start:stop].float()
        if not neighbors:
            return {"z": z}
        nn_label = self.store_label[self.nn_rows[start:stop]]
        if self._resident is None:
            b = self.batch(torch.arange(start, stop))
            return {"z": z, "nn_img": b["nn_img"], "nn_txt": b["nn_txt"], "nn_label": nn_label}
        img, txt = self._resident
        return {"z": z, "nn_img": img[start:stop], "nn_txt": txt[start:stop], "nn_label": nn_label}

    def gather_into(self, key: str, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One model input of the queries `idx` ("z", "nn_img" or "nn_txt"), written into `out` (float32,
        shaped for len(idx) rows, on self.device): `batch(idx)[key]`'s values without a new tensor."""
        if key == "z":
            if self.query_img.dtype == torch.float32:
                return torch.index_select(self.query_img, 0, idx, out=out)
            return out.copy_(self.query_img[idx])
        dense = self._resident
        if dense is not None:
            return torch.index_select(dense[0 if key == "nn_img" else 1], 0, idx, out=out)
        store = self.store_img if key == "nn_img" else self.store_txt
        rows = self.nn_rows[idx].reshape(-1)
        return out.copy_(store[rows].view(out.shape))

    def subset_k(self, k: int) -> RetrievalFeatures:
        """The same queries with only their first (best) k neighbors; the store is shared, not copied."""
        if not 1 <= k <= self.k:
            raise ValueError(f"k={k} must be in [1, {self.k}] (features were loaded with k={self.k})")
        return replace(self, nn_rows=self.nn_rows[:, :k], nn_score=self.nn_score[:, :k])

    def subset(self, idx: torch.Tensor | np.ndarray | list[int]) -> RetrievalFeatures:
        """The given queries (e.g. a held-out part of train); the store is shared, not copied."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        pos = idx.cpu().tolist()
        return replace(
            self,
            query_img=self.query_img[idx],
            labels=self.labels[idx],
            uids=[self.uids[i] for i in pos],
            nn_rows=self.nn_rows[idx],
            nn_score=self.nn_score[idx],
        )

    def to(self, device: torch.device | str) -> RetrievalFeatures:
        """A copy with every tensor on `device` (gathering on the GPU avoids a host copy per batch)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "uids"}
        return replace(self, **{name: t.to(device) for name, t in tensors.items()})


@dataclass
class StoreArrays:
    """The columns of a neighbor store the trainer uses, in file order: kb_id (M,) int64, image
    (M, Di) and text (M, Dt) float16 (text zeros where missing), has_text (M,) bool, label (M,) int64
    (-1 = none). `mapped`: image and text are memory-mapped .npy files (else arrays in RAM)."""

    kb_id: np.ndarray
    image: np.ndarray
    text: np.ndarray
    has_text: np.ndarray
    label: np.ndarray
    mapped: bool = False

    def __len__(self) -> int:
        return int(len(self.kb_id))


def _store_dims(path: Path) -> tuple[int, int, int]:
    """(rows, image_dim, text_dim) of a store file, from its Parquet footer."""
    try:
        meta = pq.ParquetFile(path).metadata
        md = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"corrupt or unreadable Parquet file {path}: {exc}") from exc
    try:
        return meta.num_rows, int(md["image_dim"]), int(md["text_dim"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: no image_dim/text_dim in its metadata (not a neighbor store)") from exc


def _decode_store(batch: pa.Table | pa.RecordBatch, image_dim: int, text_dim: int) -> dict[str, np.ndarray]:
    """One batch of store rows as arrays (the in-RAM and the memory-mapped path share this decoding)."""
    text = batch.column("text_emb")
    return {
        "kb_id": np.asarray(batch.column("kb_id").to_numpy(zero_copy_only=False), dtype=np.int64),
        "image": binary_to_vectors(batch.column("image_emb"), image_dim),
        "text": binary_to_vectors(text, text_dim),
        "has_text": ~np.asarray(text.is_null(), dtype=bool),
        "label": np.asarray(pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False), np.int64),
    }


def read_store(path: Path) -> StoreArrays:
    """The store's columns read into RAM (only those the trainer uses: no uids or captions)."""
    _, image_dim, text_dim = _store_dims(path)
    cols = _decode_store(read_part_arrow(path, columns=_STORE_COLUMNS), image_dim, text_dim)
    return StoreArrays(**cols)


def _mmap_key(path: Path) -> dict[str, int]:
    st = path.stat()
    rows, image_dim, text_dim = _store_dims(path)
    return {
        "format": STORE_MMAP_FORMAT,
        "store_bytes": st.st_size,
        "store_mtime_ns": st.st_mtime_ns,
        "rows": rows,
        "image_dim": image_dim,
        "text_dim": text_dim,
    }


def _mmap_current(path: Path) -> bool:
    """True when store.mmap/ beside `path` was copied from this very store file."""
    meta = path.parent / STORE_MMAP / "meta.json"
    try:
        return json.loads(meta.read_text()) == _mmap_key(path)
    except (OSError, ValueError):
        return False


def build_store_mmap(path: Path) -> Path:
    """Copy the store's columns into raw .npy files in `store.mmap/` beside it; return that folder.

    Streams row batches (STORE_COPY_ROWS at a time) into `np.lib.format.open_memmap` files, so the
    copy never holds the whole store in memory. The folder is filled under a temporary name and
    swapped in whole, with meta.json (the store file's size, mtime and shape) written last."""
    key = _mmap_key(path)
    rows, image_dim, text_dim = key["rows"], key["image_dim"], key["text_dim"]
    out = path.parent / STORE_MMAP
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        image = np.lib.format.open_memmap(tmp / "image.npy", "w+", np.float16, (rows, image_dim))
        text = np.lib.format.open_memmap(tmp / "text.npy", "w+", np.float16, (rows, text_dim))
        small = {
            "kb_id": np.empty(rows, np.int64),
            "has_text": np.empty(rows, bool),
            "label": np.empty(rows, np.int64),
        }
        start = 0
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=STORE_COPY_ROWS, columns=_STORE_COLUMNS)
            for batch in batches:
                cols = _decode_store(batch, image_dim, text_dim)
                stop = start + batch.num_rows
                image[start:stop] = cols["image"]
                text[start:stop] = cols["text"]
                for name, arr in small.items():
                    arr[start:stop] = cols[name]
                start = stop
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"corrupt or unreadable Parquet file {path}: {exc}") from exc
        if start != rows:
            raise UserError(f"{path}: read {start} rows, its footer says {rows}")
        image.flush()
        text.flush()
        del image, text  # close the maps before the folder is renamed
        for name, arr in small.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "meta.json").write_text(json.dumps(key) + "\n")
    log.info("copied %s (%d rows) to %s in %.1fs", path.name, rows, out, time.perf_counter() - t0)
    return out


def open_store(path: Path, mmap: bool | None = None) -> StoreArrays:
    """The store's arrays: in RAM (mmap=False), memory-mapped (True), or by size (None: from
    STORE_MMAP_AUTO_BYTES of vectors on). The memory-mapped path copies the store into `store.mmap/`
    on first use (one process at a time: `output_lock`; others wait, then find it current)."""
    path = Path(path)
    if mmap is None:
        rows, image_dim, text_dim = _store_dims(path)
        mmap = rows * (image_dim + text_dim) * 2 >= STORE_MMAP_AUTO_BYTES
    if not mmap:
        return read_store(path)
    out = path.parent / STORE_MMAP
    if not _mmap_current(path):
        with output_lock(out, f"{out.name} (memory-mapped copy of {path})"):
            if not _mmap_current(path):
                build_store_mmap(path)
    # mode "c" (copy-on-write): writable arrays, so torch wraps them without a copy or a warning,
    # while unwritten pages stay shared with the page cache and with every other process.
    return StoreArrays(
        kb_id=np.load(out / "kb_id.npy"),
        image=np.load(out / "image.npy", mmap_mode="c"),
        text=np.load(out / "text.npy", mmap_mode="c"),
        has_text=np.load(out / "has_text.npy"),
        label=np.load(out / "label.npy"),
        mapped=True,
    )


def _tensor(a: np.ndarray) -> torch.Tensor:
    # np.frombuffer views over Arrow buffers are read-only; torch wants writable memory.
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def _fixed_list_to_numpy(column: pa.ChunkedArray, k: int, dtype: type, path: Path, name: str) -> np.ndarray:
    arr = column.combine_chunks()
    if not pa.types.is_fixed_size_list(arr.type) and not pa.types.is_list(arr.type):
        raise UserError(f"{path}: column {name} is {arr.type}, expected fixed_size_list[{k}]")
    if arr.null_count:
        raise UserError(f"{path}: column {name} has {arr.null_count} null rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != k).any():
        bad = int(lengths[lengths != k][0])
        raise UserError(f"{path}: column {name} holds lists of {bad} values, expected k={k}")
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(arr), k)


def load_retrieval_features(
    ws: Workspace, dataset: str, kb: str, k: int, split: str, *, mmap: bool | None = None
) -> RetrievalFeatures:
    """Load one split of `dataset`: its embeddings (queries and labels), its neighbor table against `kb`
    at `k` (joined by uid) and the neighbor store (nn_id -> store row by kb_id).

    mmap: the store in RAM (False), memory-mapped (True) or by its size (None), see `open_store`;
    the features are the same values either way.
    Raises UserError naming the file when a query has no neighbor row, when a neighbor id is
    missing from the store, or when a file is absent."""
    emb_dir = ws.dataset_embeddings(dataset, split)
    nn_path = neighbor_table_path(ws, dataset, kb, k, split)
    store_path = ws.neighbors_dir(dataset, kb, k) / NEIGHBOR_STORE
    for p in (nn_path, store_path):
        if not p.is_file():
            raise UserError(f"neighbor file not found: {p} (run the neighbors stage for kb={kb}, k={k})")

    queries = read_embeddings(emb_dir)

    # Join queries to neighbor rows by uid (Arrow's hash join; neighbor rows may be in any order).
    nn = read_part_arrow(nn_path, columns=["uid", "nn_id", "nn_score"])
    nn_uid = nn.column("uid").combine_chunks()
    if pc.count_distinct(nn_uid).as_py() != len(nn_uid):
        raise UserError(f"{nn_path}: duplicate query uids")
    q_uid = pa.array(queries.uid.tolist(), type=pa.string())
    pos = pc.index_in(q_uid, value_set=nn_uid)
    if pos.null_count:
        missing = q_uid.filter(pos.is_null())
        raise UserError(
            f"{nn_path}: no neighbour row for {pos.null_count} of {len(q_uid)} queries "
            f"(first: {missing[0].as_py()!r}); rerun the neighbors stage for split {split!r}"
        )
    pos_np = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    nn_id = _fixed_list_to_numpy(nn.column("nn_id"), k, np.int64, nn_path, "nn_id")[pos_np]
    nn_score = _fixed_list_to_numpy(nn.column("nn_score"), k, np.float32, nn_path, "nn_score")[pos_np]

    # Map KB ids to store rows with a binary search over the (ascending) kb_id column.
    store = open_store(store_path, mmap)
    kb_id = store.kb_id
    order = None
    if len(kb_id) > 1 and not (np.diff(kb_id) > 0).all():
        order = np.argsort(kb_id, kind="stable")  # contract says ascending; tolerate, but no duplicates
        kb_id = kb_id[order]
        if (np.diff(kb_id) == 0).any():
            raise UserError(f"{store_path}: duplicate kb_id values")
    rows = np.searchsorted(kb_id, nn_id)
    rows_c = np.minimum(rows, max(len(kb_id) - 1, 0))
    found = (kb_id[rows_c] == nn_id) if len(kb_id) else np.zeros_like(nn_id, dtype=bool)
    if not found.all():
        bad = int(nn_id[~found][0])
        raise UserError(
            f"{store_path}: kb_id {bad} used by {nn_path.name} is missing from the store "
            f"({int((~found).sum())} missing references); rerun the neighbors stage"
        )
    if order is not None:
        rows_c = order[rows_c]

    if queries.image_dim != store.image.shape[1]:
        raise UserError(
            f"{store_path}: KB image_dim {store.image.shape[1]} != query image_dim {queries.image_dim} "
            f"in {emb_dir} (different image encoders?)"
        )
    return RetrievalFeatures(
        query_img=_tensor(queries.image_emb).float(),
        labels=_tensor(queries.label.astype(np.int64)),
        uids=queries.uid.tolist(),
        nn_rows=_tensor(rows_c.astype(np.int64)),
        nn_score=_tensor(nn_score),
        store_img=_tensor(store.image),  # a memory-mapped store stays mapped: no copy
        store_txt=_tensor(store.text),
        store_has_text=_tensor(store.has_text),
        store_label=_tensor(store.label),
    )
