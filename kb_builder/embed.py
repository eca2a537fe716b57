"""The embed stage: webdataset shards -> one embeddings Parquet part per shard.

Each shard is one task. A part is written under a temporary name and renamed when complete, so
the part's existence is its done-marker: a rerun embeds only the shards whose part is missing.
Bad samples are skipped and counted by reason; they never stop the run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kb_builder.decode import clean_caption, decode_image
from kb_builder.embeddings_io import EmbeddingTable, write_embeddings_part

_ENCODERS: dict[str, Any] = {}


def part_stem(shard: Path, shard_root: Path) -> str:
    """A unique, sortable part name for a shard: its path under the shards root with '/' -> '-'
    (img2dataset names the shards of every chunk folder 00000.tar, 00001.tar, ...)."""
    rel = Path(shard).resolve().relative_to(Path(shard_root).resolve())
    return "-".join(rel.with_suffix("").parts)


def part_path_for(stem: str, out_dir: Path) -> Path:
    """The embeddings part of a shard (sorted shard paths give sorted part names)."""
    return out_dir / f"part-{stem}.parquet"


def _encoders(image_spec: dict, text_spec: dict | None, device: str) -> tuple[Any, Any]:
    """Load (once per worker process) the frozen encoders for these specs."""
    from kb_builder.encoders import build_image_encoder, build_text_encoder

    key = json.dumps([image_spec, text_spec, device], sort_keys=True)
    if key not in _ENCODERS:
        image = build_image_encoder(image_spec).to(device)
        text = build_text_encoder(text_spec).to(device) if text_spec else None
        _ENCODERS[key] = (image, text)
    return _ENCODERS[key]


def _pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def embed_shard(
    task: tuple[Path, str],
    out_dir: Path,
    image_spec: dict,
    text_spec: dict | None,
    batch_size: int = 256,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Embed one shard (task = (shard path, part stem)) into its Parquet part; returns counts, skips
    by reason and timings."""
    import torch

    from kb_builder.shards import read_shard

    if threads:
        torch.set_num_threads(threads)
    shard, stem = Path(task[0]), task[1]
    out = part_path_for(stem, Path(out_dir))
    fingerprint = shard_fingerprint(Path(shard))
    if out.exists() and part_stats(out).get("shard_fingerprint") == fingerprint:
        return {"shard": str(shard), "part": str(out), "status": "done_before", "images": 0}
    started = time.perf_counter()
    dev = _pick_device(device)
    image_enc, text_enc = _encoders(image_spec, text_spec, dev)
    skipped: Counter[str] = Counter()
    uids: list[str] = []
    captions: list[str | None] = []
    labels: list[int] = []
    sources: list[str] = []
    image_vecs: list[np.ndarray] = []
    pending: list[Any] = []

    def flush() -> None:
        if pending:
            batch = torch.stack(pending).to(dev)
            image_vecs.append(image_enc.encode(batch).float().cpu().numpy().astype(np.float16))
            pending.clear()

    for sample in read_shard(Path(shard)):
        img, reason = decode_image(sample.get("image_bytes"))
        if img is None:
            skipped[reason or "unknown"] += 1
            continue
        try:
            tensor = image_enc.preprocess(img)
        except Exception:  # noqa: BLE001 - a sample the transform rejects is skipped, not fatal
            skipped["preprocess_failed"] += 1
            continue
        pending.append(tensor)
        uids.append(str(sample["uid"]))
        captions.append(clean_caption(sample.get("caption")))
        label = sample.get("label")
        labels.append(-1 if label is None else int(label))
        sources.append(str(sample.get("source") or ""))
        if len(pending) >= batch_size:
            flush()
    flush()
    decoded_at = time.perf_counter()

    n = len(uids)
    image_emb = np.concatenate(image_vecs) if image_vecs else np.zeros((0, image_enc.dim), np.float16)
    text_dim = text_enc.dim if text_enc else 1
    text_emb = np.zeros((n, text_dim), dtype=np.float16)
    has_text = np.array([c is not None for c in captions], dtype=bool)
    if text_enc is not None and has_text.any():
        rows = np.flatnonzero(has_text)
        for start in range(0, len(rows), batch_size * 4):
            chunk = rows[start : start + batch_size * 4]
            vecs = text_enc.encode([captions[i] for i in chunk])
            text_emb[chunk] = vecs.float().cpu().numpy().astype(np.float16)
    if text_enc is None:
        has_text[:] = False
    n_missing_caption = int((~np.array([c is not None for c in captions], dtype=bool)).sum())
    finished = time.perf_counter()
    stats = {
        "shard": str(shard),
        "part": str(out),
        "status": "embedded",
        "shard_fingerprint": fingerprint,
        "images": n,
        "skipped": dict(skipped),
        "missing_caption": n_missing_caption,
        "image_seconds": round(decoded_at - started, 3),
        "text_seconds": round(finished - decoded_at, 3),
        "seconds": round(finished - started, 3),
        "device": dev,
    }
    table = EmbeddingTable(
        uid=np.array(uids, dtype=object),
        image_emb=image_emb,
        text_emb=text_emb,
        has_text=has_text,
        caption=captions,
        label=np.array(labels, dtype=np.int32),
        source=sources,
        meta={"image_encoder": image_spec, "text_encoder": text_spec, "shard_stats": stats},
    )
    write_embeddings_part(out, table)
    return stats


def shard_fingerprint(shard: Path) -> str:
    """Size and mtime of a shard: a part made from an older shard of the same name is stale."""
    st = shard.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def part_stats(part: Path) -> dict[str, Any]:
    """The per-shard stats a finished part carries in its metadata (for reruns' stage records)."""
    import pyarrow.parquet as pq

    md = pq.read_schema(part).metadata or {}
    meta = json.loads(md.get(b"meta", b"{}"))
    return meta.get("shard_stats", {})


def summarize(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Totals for a stage record: counts, skips by reason, from this run and from parts done before."""
    skipped: Counter[str] = Counter()
    images = 0
    embedded_now = 0
    seconds = 0.0
    for res in results:
        stats = part_stats(Path(res["part"])) if res["status"] == "done_before" else res
        images += int(stats.get("images", 0))
        skipped.update(stats.get("skipped", {}))
        if res["status"] == "embedded":
            embedded_now += int(res["images"])
            seconds += float(res["seconds"])
    return {
        "output": str(out_dir),
        "parts": len(results),
        "images": images,
        "embedded_this_run": embedded_now,
        "parts_done_before": sum(r["status"] == "done_before" for r in results),
        "skipped": dict(skipped),
        "task_seconds": round(seconds, 2),
    }
