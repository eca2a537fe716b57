"""Memory of the trainer's retrieval features: the neighbor store in RAM vs memory-mapped.

    python bench/bench_store.py --scale 0.1 --out bench/results/store.json [--reuse 1.0] [--k 32]

Writes a synthetic dataset x KB in the neighbor stage's layout at `--scale` times ImageNet-LT's split
sizes (115,846 train, 20,000 val, 50,000 test queries), k neighbors each, CLIP-sized vectors (512-d
image and 512-d text, fp16) and `--reuse` slots per distinct store row (1 = every neighbor a distinct
KB row: the worst case). Then, in a fresh process per mode, loads the three splits as an experiment
does (`load_retrieval_features` per split) and gathers one epoch of training batches, recording:

  peak_rss: VmHWM, the process's high-water mark of resident pages (anonymous and file-backed);
  rss_anon / rss_file: /proc/self/status after loading and after the epoch. File-backed pages of a
      memory-mapped store are page cache: shared by every process that maps the file and dropped by
      the kernel under memory pressure; anonymous pages are the process's own.
Modes: `ram` (store read into RAM per split), `mmap-copy` (first use: copies the store into
store.mmap/, then maps it), `mmap` (the copy exists). Baseline figures are taken after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402

IMAGENET_LT = {"train": 115_846, "val": 20_000, "test": 50_000}
KB_ROWS = 1_400_000_000  # the paper's KB: neighbor ids are drawn from its id range
DATASET, KB = "syn", "kbsyn"


def _unit_fp16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_workspace(root: Path, scale: float, k: int, dim: int, reuse: float, seed: int) -> dict[str, Any]:
    """The synthetic workspace (query embeddings, neighbor tables, store); returns its sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retformer.artifacts.embeddings_io import EmbeddingTable, table_to_arrow, write_embeddings_part
    from retformer.artifacts.workspace import Workspace
    from retformer.kb_builder.neighbors import neighbor_table

    rng = np.random.default_rng(seed)
    ws = Workspace(root)
    sizes = {s: max(1, round(n * scale)) for s, n in IMAGENET_LT.items()}
    slots = sum(sizes.values()) * k
    rows = max(k, int(slots / reuse))
    kb_ids = np.sort(rng.choice(KB_ROWS, size=rows, replace=False)).astype(np.int64)
    nn_dir = ws.neighbors_dir(DATASET, KB, k)
    nn_dir.mkdir(parents=True)
    table_bytes = 0
    perm = rng.permutation(slots) % rows  # every store row used at least once when reuse >= 1
    at = 0
    for split, n in sizes.items():
        q = EmbeddingTable(
            uid=np.array([f"{split}{i:07d}" for i in range(n)], dtype=object),
            image_emb=_unit_fp16(rng, n, dim),
            text_emb=np.zeros((n, dim), np.float16),
            has_text=np.zeros(n, bool),
            caption=[None] * n,
            label=rng.integers(0, 1000, n).astype(np.int32),
            source=[split] * n,
        )
        write_embeddings_part(ws.dataset_embeddings(DATASET, split) / "part-00000.parquet", q)
        ids = kb_ids[perm[at : at + n * k]].reshape(n, k)
        at += n * k
        scores = -np.sort(-rng.random((n, k), dtype=np.float32), axis=1)
        pq.write_table(neighbor_table(q.uid, ids, scores), nn_dir / f"{split}.parquet", compression="zstd")
        table_bytes += (nn_dir / f"{split}.parquet").stat().st_size
    store = EmbeddingTable(
        uid=np.array([f"kb{i:010d}" for i in kb_ids], dtype=object),
        image_emb=_unit_fp16(rng, rows, dim),
        text_emb=_unit_fp16(rng, rows, dim),
        has_text=np.ones(rows, bool),
        caption=[f"a web alt-text caption of about fifty characters {i % 997}" for i in range(rows)],
        label=rng.integers(-1, 1000, rows).astype(np.int32),
        source=["kb"] * rows,
    )
    arrow = table_to_arrow(store)
    arrow = arrow.append_column("kb_id", pa.array(kb_ids, pa.int64()))
    pq.write_table(arrow, nn_dir / "store.parquet", compression="zstd")  # as the neighbors stage does
    store_bytes = (nn_dir / "store.parquet").stat().st_size
    queries = sum(sizes.values())
    return {
        "queries": sizes,
        "k": k,
        "dim": dim,
        "neighbor_slots": slots,
        "store_rows": rows,
        "reuse": round(slots / rows, 3),
        "store_vector_bytes": rows * 2 * dim * 2,
        "table_bytes": table_bytes,
        "store_bytes": store_bytes,
        "bytes_per_query_image": round((table_bytes + store_bytes) / queries, 1),
        "table_bytes_per_slot": round(table_bytes / slots, 2),
        "store_bytes_per_row": round(store_bytes / rows, 1),
    }


def _status() -> dict[str, int]:
    """Peak RSS (VmHWM), RssAnon and RssFile of this process, in bytes (/proc/self/status).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child would
    report its parent's peak (here: the parent that wrote the workspace)."""
    names = {"VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[names[key]] = int(value.split()[0]) * 1024
    return out


def child(workdir: Path, mode: str, k: int, batch_size: int) -> dict[str, Any]:
    """Load train/val/test as an experiment does, then gather one epoch of training batches."""
    import torch

    from retformer.artifacts.workspace import Workspace
    from retformer.trainer.features import load_retrieval_features

    torch.set_num_threads(1)
    ws = Workspace(workdir)
    base = _status()
    t0 = time.perf_counter()
    feats = {s: load_retrieval_features(ws, DATASET, KB, k, s, mmap=mode != "ram") for s in IMAGENET_LT}
    load_s = time.perf_counter() - t0
    loaded = _status()
    train = feats["train"]
    t1 = time.perf_counter()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    checksum = 0.0
    for s in range(0, len(train), batch_size):
        b = train.batch(perm[s : s + batch_size])
        checksum += float(b["nn_img"][:, :, 0].sum())  # use the gathered values
    epoch_s = time.perf_counter() - t1
    epoch = _status()
    return {
        "mode": mode,
        "load_s": round(load_s, 2),
        "epoch_gather_s": round(epoch_s, 2),
        "baseline": base,
        "after_load": loaded,
        "after_epoch": epoch,
        "store_mapped": "store.mmap/image.npy" in Path("/proc/self/maps").read_text(),
        "checksum": checksum,
    }


def run_child(workdir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--k", str(args.k)]
    cmd += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1, help="fraction of ImageNet-LT's split sizes")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dim", type=int, default=512, help="image and text vector dimension")
    ap.add_argument("--reuse", type=float, default=1.0, help="neighbor slots per distinct store row (>= 1)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/store.json"))
    ap.add_argument("--child", choices=["ram", "mmap-copy", "mmap"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.workdir, args.child, args.k, args.batch_size)))
        return 0
    if args.reuse < 1 or not 0 < args.scale <= 1:
        ap.error("--reuse must be >= 1 and --scale in (0, 1]")
    root = Path(tempfile.mkdtemp(prefix="bench_store-"))
    try:
        t0 = time.perf_counter()
        data = write_workspace(root, args.scale, args.k, args.dim, args.reuse, args.seed)
        data["write_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(data), flush=True)
        runs = {}
        for mode in ("ram", "mmap-copy", "mmap"):
            runs[mode] = run_child(root, mode, args)
            r = runs[mode]
            print(
                f"{mode:9s} load {r['load_s']:6.1f}s  peak RSS {r['after_epoch']['peak_rss'] / 1e9:5.2f} GB  "
                f"anon after load {r['after_load']['rss_anon'] / 1e9:5.2f} GB, after epoch "
                f"{r['after_epoch']['rss_anon'] / 1e9:5.2f} GB; file-backed after epoch "
                f"{r['after_epoch']['rss_file'] / 1e9:5.2f} GB",
                flush=True,
            )
        if len({r["checksum"] for r in runs.values()}) != 1:
            raise SystemExit("error: the modes gathered different values")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = {
        "bench": "store",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": data,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
