"""Download stage (entry `run_download`, task `download_chunk`): image-text metadata Parquet chunks
(DataComp layout: `url`, `text`, `uid`) to webdataset shards, with img2dataset
(https://github.com/rom1504/img2dataset) used as a library.

One task per input chunk: metadata file `<stem>.parquet` is downloaded into its own folder
`<out_dir>/<stem>/`, so many machines sharing `out_dir` can each take chunks (one runner per chunk):

    <out_dir>/<stem>/00000.tar            img2dataset's webdataset shard: per sample `jpg` (encode_format),
                                         `txt` (caption), `json` (uid, url, caption, key, status, ...)
    <out_dir>/<stem>/00000.parquet        img2dataset's per-sample status of that shard (every input row,
                                         success or not: uid, url, caption, status, error_message, ...)
    <out_dir>/<stem>/00000_stats.json     img2dataset's per-shard counts and error messages
    <out_dir>/<stem>/_img2dataset.log     img2dataset's console output (tracebacks of failed shards)
    <out_dir>/<stem>/retry-001/...        retry round 1: `_input.parquet` (the rows retried) + its shards
    <out_dir>/<stem>/_SUCCESS             JSON, written atomically last: the chunk is complete

A chunk is complete when `_SUCCESS` exists and every shard it lists has its tar (with the recorded size),
its status Parquet and its `*_stats.json`. `_SUCCESS` has no `.json` suffix on purpose: img2dataset
reads every `*.json` in its output folder as `<shard id>_stats.json`.

Reruns: a complete chunk is skipped (nothing is written). A chunk folder without a valid `_SUCCESS` (a
run died half-way) is deleted and downloaded again from scratch; so is a complete chunk whose input
file size or content settings (resize, encoding, shard size, columns; not threads/timeouts) changed.
With `retry_failed=True`, a complete chunk with failed samples gets one more round: the input rows whose
uid has not succeeded in any round are written to `retry-NNN/_input.parquet` and downloaded into
`retry-NNN/` (written as `retry-NNN.tmp-<pid>/`, renamed when done, then `_SUCCESS` is rewritten with
the round added). Only rows that failed are retried, so every uid is in at most one shard of a chunk:
`list_downloaded_shards` lists the main round's shards then the retry rounds' (sorted paths), and a
downstream stage reading them all sees each sample once. Shard base names repeat across chunks and
rounds (`00000.tar` everywhere): name per-shard outputs with `artifacts.shards.shard_stem`, not `Path.name`.

Fetching (`fetch.py`, in place of img2dataset's urllib call): http(s) URLs only, at most `max_bytes` per
response (20 MiB) and `max_pixels` per image (read from its header before any decoding: Pillow's
decompression-bomb limit), and `deadline` seconds per request in all (60; `timeout` bounds each socket
operation). A refused sample is a failure with its class: `unsupported_scheme`, `too_many_bytes`,
`too_many_pixels`, `deadline_exceeded`. These limits, like `timeout`, never redo a complete chunk.

Engines: with `processes_count == 1` (the default, one chunk per Dask worker) img2dataset's Reader,
Resizer and Downloader run inside the calling process; `img2dataset.download()` itself cannot run in a
Dask task (it installs a SIGINT handler, which only the main thread may do, and starts a process pool,
which a daemonic worker may not) and spawns three interpreters per call. With `processes_count > 1`,
`img2dataset.download()` runs in a subprocess with its own process pool. Both write the same files.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retformer.artifacts.atomic import is_leftover_tmp
from retformer.artifacts.errors import UserError
from retformer.kb_builder.download.chunk import (
    _chunk_state,
    _img2dataset_version,
    _listed_shards,
    download_chunk,
    read_chunk_marker,
)
from retformer.kb_builder.download.settings import (
    RETRY_INPUT_NAME,
    SUCCESS_NAME,
    DownloadTask,
    failure_class,
    plan_download,
)
from retformer.kb_builder.download.settings_schema import (
    DEFAULT_SETTINGS,
    DownloadSettings,
    normalize_settings,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SETTINGS",
    "RETRY_INPUT_NAME",
    "SUCCESS_NAME",
    "DownloadSettings",
    "DownloadTask",
    "download_chunk",
    "failure_class",
    "list_downloaded_shards",
    "normalize_settings",
    "plan_download",
    "read_chunk_marker",
    "run_download",
]


def _download_task(task: DownloadTask, retry_failed: bool = False) -> dict[str, Any]:
    """The Dask task: one chunk."""
    return download_chunk(task.chunk, task.out_dir, task.settings, retry_failed=retry_failed)


def run_download(
    map_tasks: Callable[..., list[dict]] | None, tasks: Sequence[DownloadTask], retry_failed: bool = False
) -> dict[str, Any]:
    """The download stage: every task (one per chunk) through `map_tasks` (pipelines/dask_runner.py),
    or one after another here when it is None, and aggregate: `totals` (chunks, samples, successes,
    failed, new_successes, shards), `status` (chunks per outcome), `failures` by class,
    `failures_by_status`, `per_chunk` (each chunk's summary)."""
    started = time.perf_counter()
    tasks = list(tasks)
    if map_tasks is None:
        results = [_download_task(t, retry_failed) for t in tasks]
    else:
        results = map_tasks(
            _download_task, tasks, desc="download", unit="chunk", count_key="new_successes",
            retry_failed=retry_failed,
        )  # fmt: skip
    failures: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    for r in results:
        failures.update(r["failures"])
        by_status.update(r["failures_by_status"])
    return {
        "stage": "download",
        "retry_failed": retry_failed,
        "img2dataset_version": _img2dataset_version(),
        "settings": tasks[0].settings.model_dump() if tasks else {},
        "totals": {
            "chunks": len(results),
            "samples": sum(r["count"] for r in results),
            "successes": sum(r["successes"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "new_successes": sum(r["new_successes"] for r in results),
            "shards": sum(len(r["shards"]) for r in results),
        },
        "status": dict(sorted(Counter(r["status"] for r in results).items())),
        "failures": dict(failures.most_common()),
        "failures_by_status": dict(sorted(by_status.items())),
        "seconds": round(time.perf_counter() - started, 3),
        "per_chunk": results,
    }


# ------------------------------------------------------------------------------------------- listing
def list_downloaded_shards(out_dir: Path | str) -> list[Path]:
    """The shards (holding at least one sample) of every complete chunk under `out_dir`, sorted: per
    chunk the main round's shards, then retry rounds' (`<chunk>/retry-NNN/00000.tar`). Chunks without a
    valid `_SUCCESS` are never listed (a warning counts them); a chunk whose `_SUCCESS` lists a file
    that is now missing or of another size is a UserError naming it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"download directory not found: {out_dir}")
    paths: list[Path] = []
    unfinished: list[str] = []
    for chunk_dir in sorted(p for p in out_dir.iterdir() if p.is_dir() and not is_leftover_tmp(p)):
        marker, damage = _chunk_state(chunk_dir)
        if damage is not None:
            # Complete once, changed since: leaving it out would shrink the KB without a word.
            raise UserError(
                f"downloaded chunk {chunk_dir} is damaged ({damage}): "
                "rerun `retformer download` to download it again"
            )
        if marker is None:
            unfinished.append(chunk_dir.name)
        else:
            paths.extend(chunk_dir / s for s in _listed_shards(marker))
    if unfinished:
        log.warning(
            "%d chunk folder(s) under %s are not complete (being downloaded, or a run died): %s; "
            "their shards are not listed",
            len(unfinished),
            out_dir,
            ", ".join(unfinished[:5]) + (" ..." if len(unfinished) > 5 else ""),
        )
    return sorted(paths)
