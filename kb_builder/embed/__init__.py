"""The embed stage: webdataset shards -> one embeddings Parquet part per shard.

Each shard is one task. A part is written under a temporary name and renamed when complete, so
the part's existence is its done-marker: a rerun embeds only the shards whose part is missing (or
stale, or unreadable). Bad samples are skipped and counted by reason; they never stop the run.

Inside a task, reading, decoding and the PIL half of the encoder's transform run in a torch
DataLoader over the shard (`num_workers` processes) or, with 0, in a thread of the task's process,
while the task's thread runs the image encoder. Workers hand over uint8 HWC pixels; the
ToTensor/Normalize half of the transform runs once per batch on the encoder's device (4x less data to
move, one vectorised op instead of two per image; in the loader thread when it is one and the device
is the CPU). The result is bit-identical to `encoder.preprocess` per image. The text encoder runs in
a thread of its own, beside the image forward (torch releases the GIL in its kernels), on each
batch's new captions in batch order. Neither thread changes a bit of the vectors: every op runs
with the task's torch thread count whichever thread calls it (`tests/test_embed_overlap.py`).

Where the time goes (Fashion-MNIST shard, Lite0 at 64 px, one thread, CPU us per image; measured by
`bench/bench_embed.py`, figures in BENCHMARKS.md): tarfile's header parsing ~130 -> own parser
with json ~60-90; PNG decode ~66 (unchanged); torchvision resize + crop ~100 -> the same Pillow
calls without the wrappers ~64; per-image ToTensor + Normalize ~145 -> uint8 stack + batched ~50.
About 440 -> 275 us of input work against a ~2.8-3.5 ms forward.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retformer.artifacts.devices import resolve_device
from retformer.artifacts.embeddings_io import EmbeddingTable, write_embeddings_part
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import shard_stem as part_stem
from retformer.artifacts.step_timer import StepTimer
from retformer.artifacts.tar_reader import iter_shard_files
from retformer.kb_builder.embed.fast_transform import normalize_batch, split_transform
from retformer.kb_builder.embed.loader import ShardBatches, iter_batches
from retformer.kb_builder.embed.options import default_num_workers
from retformer.kb_builder.embed.parts import (
    embed_coverage,
    part_path_for,
    part_stats,
    remove_extra_parts,
    remove_leftovers,
    shard_fingerprint,
    shard_record,
)
from retformer.kb_builder.kb_schema import EmbedSection, Encoders, ImageEncoder, TextEncoder, embed_options

__all__ = [
    "embed_options",
    "embed_shard",
    "iter_shard_files",
    "normalize_batch",
    "part_stem",
    "run_embed",
    "split_transform",
    "summarize",
]

_ENCODERS: dict[str, Any] = {}
_DEFAULTS = EmbedSection()  # the `embed:` options' defaults (the KB schema's)
MAX_EXAMPLES = 5  # skipped uids kept per reason in the part's stats (for a human to look at)
# map_tasks(fn, items, desc=, unit=, count_key=, **kwargs) -> results in item order (pipelines/dask_runner.py)
MapTasks = Callable[..., list[dict]]


def _given(spec: ImageEncoder | TextEncoder | None) -> dict[str, Any] | None:
    """An encoder spec as the manifest gave it (what a part's metadata records)."""
    return None if spec is None else spec.model_dump(exclude_unset=True)


def _encoders(image_spec: ImageEncoder, text_spec: TextEncoder | None, device: str) -> tuple[Any, Any]:
    """Load (once per worker process) the frozen encoders for these specs."""
    from retformer.kb_builder.encoders import build_image_encoder, build_text_encoder

    key = json.dumps([_given(image_spec), _given(text_spec), device], sort_keys=True)
    if key not in _ENCODERS:
        image = build_image_encoder(image_spec).to(device)
        text = build_text_encoder(text_spec).to(device) if text_spec is not None else None
        _ENCODERS[key] = (image, text)
    return _ENCODERS[key]


class _TextCache:
    """Text vectors of one shard: each distinct caption is encoded once (captions repeat a lot)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.row: dict[str, int] = {}
        self.chunks: list[Any] = []
        self.seconds = 0.0

    def add(self, captions: list[str | None]) -> None:
        new = list(dict.fromkeys(c for c in captions if c is not None and c not in self.row))
        if not new or self.encoder is None:
            return
        started = time.perf_counter()
        vecs = self.encoder.encode(new, dedupe=False).to(torch.float16)
        offset = len(self.row)
        self.row.update({c: offset + i for i, c in enumerate(new)})
        self.chunks.append(vecs)
        self.seconds += time.perf_counter() - started

    def vectors(self, captions: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(fp16 [n, D] vectors, has_text [n]) for captions in order (zeros and False for None)."""
        dim = self.encoder.dim if self.encoder is not None else 1
        has = np.array([c is not None and self.encoder is not None for c in captions], dtype=bool)
        out = np.zeros((len(captions), dim), dtype=np.float16)
        if has.any():
            table = torch.cat(self.chunks).cpu().numpy()
            out[has] = table[[self.row[c] for c, h in zip(captions, has, strict=True) if h]]
        return out, has


def _text_pool() -> ThreadPoolExecutor:
    """One thread for the text tower, with the task's torch thread count (torch's intra-op setting
    is read per thread: a new thread would otherwise start from OMP_NUM_THREADS or the core count)."""
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(
        1, thread_name_prefix="embed-text", initializer=torch.set_num_threads, initargs=(threads,)
    )


# The timing keys of a part's stats, in their order (present, 0.0, even when a step never ran).
TIMING_STEPS = (
    "load_encoders",  # 0 once this worker process has them
    "wait_for_loader",  # this thread waiting for batches (decoded in a thread or processes)
    "loader_cpu",  # CPU time reading/decoding/resizing, in whichever process did it
    # ToTensor + Normalize per batch here (on a GPU: its launch, async; 0 with num_workers=0 on a CPU:
    # the loader thread does it, its time is in loader_cpu)
    "normalise",
    "image_forward",
    "text_forward",  # in its own thread, overlapping the image forward
    "wait_for_text",  # this thread waiting for the text thread after the last batch
    "assemble",
)


@dataclass
class _Collected:
    """What the batch loop gathers from one shard: the kept rows' batches (with their sample indexes),
    their image vectors, the skipped samples by reason, and how many samples were read."""

    parts: list[tuple[np.ndarray, dict[str, Any]]] = field(default_factory=list)
    vec_chunks: list[torch.Tensor] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    samples_read: int = 0

    def count(self, batch: dict[str, Any]) -> None:
        """Count a batch's samples and its skips (a few uids kept per reason)."""
        self.samples_read += len(batch["index"]) + len(batch["skipped"])
        for _, uid, reason in batch["skipped"]:
            self.skipped[reason] += 1
            if len(self.examples.setdefault(reason, [])) < MAX_EXAMPLES:
                self.examples[reason].append(uid)

    def order(self) -> np.ndarray:
        """The permutation that puts the kept rows back in shard order."""
        index = np.concatenate([i for i, _ in self.parts]) if self.parts else np.zeros(0, np.int64)
        return np.argsort(index, kind="stable")

    def column(self, name: str, order: np.ndarray) -> list[Any]:
        flat = [v for _, b in self.parts for v in b[name]]
        return [flat[i] for i in order]


def _check_size(shard: Path, recorded: dict[str, Any] | None) -> None:
    """UserError when the shard's size is not the one its manifest records (cut or changed)."""
    if recorded is not None and shard.stat().st_size != recorded["bytes"]:
        raise UserError(
            f"shard {shard} is {shard.stat().st_size} bytes, but {recorded['manifest']} records "
            f"{recorded['bytes']}: it was cut or changed after it was written; {_fix_hint(recorded)}"
        )


def _embed_batches(
    batches: Any,
    image_enc: Any,
    texts: _TextCache,
    text_pool: ThreadPoolExecutor | None,
    split: Any,
    dev: str,
    timer: StepTimer,
) -> _Collected:
    """Run the image forward on every batch of the loader (the text tower in `text_pool` beside it);
    raise the UserError of a broken shard."""
    got = _Collected()
    # One text job per batch (its new captions), in batch order, so the cache's rows and chunks are a
    # serial run's.
    text_jobs: list[Future[None]] = []
    while True:
        with timer.step("wait_for_loader"):
            batch = next(batches, None)
        if batch is None:
            break
        if "error" in batch:  # the shard itself is broken: no part, whatever was read before
            raise UserError(batch["error"])
        got.count(batch)
        timer.add("loader_cpu", batch["seconds"])
        if not batch["index"]:
            continue
        if text_pool is not None:
            text_jobs.append(text_pool.submit(texts.add, batch["caption"]))
        with timer.step("normalise"):
            pixels = batch["pixels"]
            if batch.get("normalised"):
                x = pixels
            else:
                x = normalize_batch(pixels, split[1], split[2], dev) if split else pixels.to(dev)
        with timer.step("image_forward"):
            # Kept on the device (fp16) until the shard ends: no host sync per batch on a GPU.
            got.vec_chunks.append(image_enc.encode(x).to(torch.float16))
        got.parts.append((np.asarray(batch["index"], dtype=np.int64), batch))
    with timer.step("wait_for_text"):
        for job in text_jobs:
            job.result()  # a text forward's exception is raised here
    return got


def _table(
    got: _Collected,
    texts: _TextCache,
    image_enc: Any,
    image_spec: ImageEncoder,
    text_spec: TextEncoder | None,
) -> EmbeddingTable:
    """The part's rows in shard order."""
    order = got.order()
    captions = got.column("caption", order)
    if got.vec_chunks:
        image_emb = torch.cat(got.vec_chunks).cpu().numpy()[order]
    else:
        image_emb = np.zeros((0, image_enc.dim), np.float16)
    text_emb, has_text = texts.vectors(captions)
    return EmbeddingTable(
        uid=np.array(got.column("uid", order), dtype=object),
        image_emb=image_emb,
        text_emb=text_emb,
        has_text=has_text,
        caption=captions,
        label=np.array(got.column("label", order), dtype=np.int32),
        source=got.column("source", order),
        meta={"image_encoder": _given(image_spec), "text_encoder": _given(text_spec)},
    )


def embed_shard(
    task: tuple[Path, str],
    out_dir: Path,
    image_spec: ImageEncoder,
    text_spec: TextEncoder | None,
    batch_size: int = _DEFAULTS.batch_size,
    device: str | None = _DEFAULTS.device,
    threads: int | None = _DEFAULTS.threads,
    num_workers: int | None = _DEFAULTS.num_workers,
    prefetch_factor: int = _DEFAULTS.prefetch_factor,
) -> dict[str, Any]:
    """Embed one shard (task = (shard path, part stem)) into its Parquet part; returns counts, skips
    by reason and timings.

    A part already written from this very shard (same fingerprint) is kept ("done_before"). Rows
    follow shard order whatever `num_workers` is; the same shard, options and machine give the
    same bytes. A shard that is cut short or corrupt, holds a uid outside `[A-Za-z0-9_-]`, or differs
    from what its manifest records (size before reading, sample count after) raises a UserError
    naming it, and no part is written for it.
    """
    if threads:
        torch.set_num_threads(threads)
    shard, stem = Path(task[0]), task[1]
    out = part_path_for(stem, Path(out_dir))
    fingerprint = shard_fingerprint(shard)
    if out.exists() and part_stats(out).get("shard_fingerprint") == fingerprint:
        return {"shard": str(shard), "part": str(out), "status": "done_before", "images": 0}
    recorded = shard_record(shard)
    _check_size(shard, recorded)
    started = time.perf_counter()
    timer = StepTimer(*TIMING_STEPS)
    with timer.step("load_encoders"):
        # The manifest's device, else cuda when torch can use a GPU; a GPU torch cannot use is a UserError.
        dev = str(resolve_device(device, "embed"))
        workers = default_num_workers(dev, threads) if num_workers is None else int(num_workers)
        image_enc, text_enc = _encoders(image_spec, text_spec, dev)
    split = split_transform(image_enc)
    dataset = ShardBatches(shard, batch_size, image_enc.image_size, split, image_enc.preprocess)
    if split and workers == 0 and dev == "cpu":  # the loader thread normalises too (same ops, same bits)
        dataset.normalise = partial(normalize_batch, mean=split[1], std=split[2], device=dev)
    texts = _TextCache(text_enc)
    batches = iter_batches(dataset, workers, prefetch_factor, pin_memory=dev.startswith("cuda"))
    # The text tower runs in a thread of its own while this one runs the image forward.
    text_pool = _text_pool() if text_enc is not None else None
    try:
        got = _embed_batches(batches, image_enc, texts, text_pool, split, dev, timer)
    finally:
        batches.close()  # stops the loader (thread or processes) now when the loop ended early
        if text_pool is not None:
            text_pool.shutdown(wait=True, cancel_futures=True)
    timer.add("text_forward", texts.seconds)

    if recorded is not None and got.samples_read != recorded["count"]:
        raise UserError(
            f"shard {shard}: {got.samples_read} samples read, but {recorded['manifest']} records "
            f"{recorded['count']}; {_fix_hint(recorded)}"
        )
    with timer.step("assemble"):
        table = _table(got, texts, image_enc, image_spec, text_spec)
        n = len(table.caption)
        stats: dict[str, Any] = {
            "shard": str(shard),
            "part": str(out),
            "status": "embedded",
            "shard_fingerprint": fingerprint,
            "images": n,
            "skipped": dict(got.skipped),
            "skipped_examples": got.examples,
            "missing_caption": int(sum(c is None for c in table.caption)),
            "device": dev,
            "batch_size": batch_size,
            "num_workers": workers,
            "threads": torch.get_num_threads(),
        }
        remove_leftovers(out)
    # The stats travel in the part's metadata (a rerun's stage record reads them from there); the
    # write's own duration can only be in the returned copy.
    with timer.step("write"):
        write_embeddings_part(out, table, {"shard_stats": {**stats, "timings": _rounded(timer.as_dict())}})
    finished = time.perf_counter()
    stats["timings"] = _rounded(timer.as_dict())
    stats["seconds"] = round(finished - started, 3)
    stats["images_per_s"] = round(n / max(finished - started, 1e-9), 1)
    return stats


def _fix_hint(recorded: dict[str, Any]) -> str:
    """What rebuilds a shard its manifest describes (the sets' manifests are `_SUCCESS-<prefix>.json`,
    an img2dataset chunk's is `_SUCCESS`)."""
    own_set = Path(recorded["manifest"]).name.startswith("_SUCCESS-")
    command = "retformer shards" if own_set else "retformer download"
    return f"rerun `{command}` to rebuild it, then embed again (finished parts are kept)"


def _embed_task(task: tuple[Path, str], **kwargs: Any) -> dict[str, Any]:
    """The Dask task: `embed_shard`, with a broken shard reported as a result instead of raised (a
    raised error would cancel the other shards' tasks, losing their finished work)."""
    try:
        return embed_shard(task, **kwargs)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the reader put in it
        return {"shard": str(task[0]), "status": "failed", "error": message, "images": 0}


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timings.items()}


def summarize(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Totals for a stage record: counts, skips by reason, from this run and from parts done before;
    the time the tasks of this run spent per step (seconds summed over tasks)."""
    skipped: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    images = 0
    embedded_now = 0
    seconds = 0.0
    for res in results:
        if res["status"] == "failed":
            continue
        stats = part_stats(Path(res["part"])) if res["status"] == "done_before" else res
        images += int(stats.get("images", 0))
        skipped.update(stats.get("skipped", {}))
        if res["status"] == "embedded":
            embedded_now += int(res["images"])
            seconds += float(res["seconds"])
            timings.update(res.get("timings", {}))
    return {
        "output": str(out_dir),
        "parts": len(results),
        "images": images,
        "embedded_this_run": embedded_now,
        "parts_done_before": sum(r["status"] == "done_before" for r in results),
        "skipped": dict(skipped),
        "task_seconds": round(seconds, 2),
        "task_timings": {k: round(v, 2) for k, v in timings.items()},
    }


def run_embed(
    shards: list[Path],
    shard_root: Path,
    out_dir: Path,
    encoders: Encoders,
    embed: EmbedSection,
    desc: str,
    map_tasks: MapTasks,
) -> dict[str, Any]:
    """The embed stage: one `embed_shard` task per shard through `map_tasks`; returns the totals of
    `summarize` plus wall seconds and images/s. `embed`: the manifest's `embed:` (`embed_shard`'s
    keyword options).

    A broken shard does not stop the others: every task runs to its end (so each good shard's part
    is written and kept for a rerun), then one UserError line names the shard(s) that failed. Parts
    of shards not in `shards` (the set lost them) are removed: the folder then holds exactly the
    parts of `shards` (kb_builder/embed/parts.py, `embed_coverage`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(s, part_stem(s, shard_root)) for s in shards]
    results = map_tasks(
        _embed_task,
        tasks,
        desc=desc,
        count_key="images",
        out_dir=out_dir,
        image_spec=encoders.image,
        text_spec=encoders.text,
        **embed.model_dump(),
    )
    # The folder holds exactly the parts of these shards: a shard that left the set (its images taken
    # down, a larger shard_size) takes its part with it.
    removed = remove_extra_parts(embed_coverage(shards, shard_root, out_dir))
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        kept = len(results) - len(failed)
        others = f" (and {len(failed) - 1} more: {', '.join(Path(r['shard']).name for r in failed[1:])})"
        raise UserError(
            f"{desc}: {len(failed)} of {len(results)} shard(s) not embedded, the other {kept} part(s) "
            f"are kept: {failed[0]['error']}" + (others if len(failed) > 1 else "")
        )
    summary = summarize(results, out_dir)
    summary["parts_removed"] = len(removed)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["images_per_s"] = round(summary["embedded_this_run"] / max(summary["seconds"], 1e-9), 1)
    return summary
