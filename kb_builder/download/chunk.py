"""One chunk: download, check, summarise and mark complete (`_SUCCESS`), or retry its failed rows."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retformer.artifacts.atomic import remove_dead_temps, tmp_name, write_json_atomic
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import UID_RE
from retformer.kb_builder.download.engine import _img2dataset_version, _run_img2dataset
from retformer.kb_builder.download.settings import (
    _OOM_SHARD_COUNT,
    FORMAT_VERSION,
    LOG_NAME,
    MAIN_ROUND,
    RETRY_INPUT_NAME,
    RETRY_PREFIX,
    RUN_ONLY_KEYS,
    SUCCESS_NAME,
    chunk_name,
    failure_class,
    settings_fingerprint,
)
from retformer.kb_builder.download.settings_schema import UID_COL, DownloadSettings, normalize_settings

log = logging.getLogger(__name__)


def _read_input(chunk: Path, settings: DownloadSettings) -> pa.Table:
    """The url / caption / uid columns of a chunk, validated (UserError on bad input)."""
    if not chunk.is_file():
        raise UserError(f"metadata chunk not found: {chunk}")
    cols = [settings.url_col, UID_COL] + ([settings.caption_col] if settings.caption_col else [])
    try:
        names = pq.read_schema(chunk).names
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"metadata chunk {chunk} is not a readable Parquet file: {exc}") from exc
    missing = [c for c in cols if c not in names]
    if missing:
        raise UserError(
            f"metadata chunk {chunk} has no column(s) {', '.join(missing)} (it has {', '.join(names)})"
        )
    table = pq.read_table(chunk, columns=cols)
    uids = table.column(UID_COL)
    if uids.null_count:
        raise UserError(f"metadata chunk {chunk}: {uids.null_count} row(s) have no {UID_COL}")
    texts = [str(u) for u in uids.to_pylist()]
    if len(set(texts)) != table.num_rows:
        raise UserError(f"metadata chunk {chunk}: the {UID_COL} column has duplicates")
    bad = next((u for u in texts if not UID_RE.fullmatch(u)), None)
    if bad is not None:
        raise UserError(
            f"metadata chunk {chunk}: uid {bad!r} has characters outside [A-Za-z0-9_-] "
            "(uids name the KB's rows and files)"
        )
    return table


def _shard_stem(index: int) -> str:
    return f"{index:0{_OOM_SHARD_COUNT}d}"


def _round_record(
    chunk_dir: Path, round_name: str, n_rows: int, settings: DownloadSettings, seconds: float
) -> dict:
    """Check that img2dataset finished every shard of a round (tar, status Parquet and stats json) and
    summarise it; a RuntimeError (the chunk stays incomplete) names the shards it did not finish."""
    folder = chunk_dir if round_name == MAIN_ROUND else chunk_dir / round_name
    prefix = "" if round_name == MAIN_ROUND else f"{round_name}/"
    n_shards = math.ceil(n_rows / settings.number_sample_per_shard)
    shards: list[dict[str, Any]] = []
    totals: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    missing: list[str] = []
    for i in range(n_shards):
        stem = _shard_stem(i)
        tar, status, stats_path = (
            folder / f"{stem}.tar",
            folder / f"{stem}.parquet",
            folder / f"{stem}_stats.json",
        )
        if not (tar.is_file() and status.is_file() and stats_path.is_file()):
            missing.append(stem)
            continue
        stats = json.loads(stats_path.read_text())
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        for message, n in (stats.get("status_dict") or {}).items():
            if message != "success":
                failures[failure_class(message)] += int(n)
        shards.append(
            {
                "name": f"{prefix}{stem}.tar",
                "bytes": tar.stat().st_size,
                "count": int(stats.get("count", 0)),
                "successes": int(stats.get("successes", 0)),
            }
        )
    if missing:
        raise RuntimeError(
            f"img2dataset did not finish shard(s) {', '.join(missing)} of {folder} "
            f"(see {folder / LOG_NAME}); "
            "rerun the download stage to redo this chunk"
        )
    return {
        "name": round_name,
        "input_rows": n_rows,
        "shards": shards,
        "count": totals["count"],
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "failures": dict(sorted(failures.items())),
        "seconds": round(seconds, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _latest_status(chunk_dir: Path, rounds: list[dict]) -> dict[str, tuple[str, str | None]]:
    """uid -> (status, error_message) of the last round that tried it (its latest attempt)."""
    latest: dict[str, tuple[str, str | None]] = {}
    for rnd in rounds:
        for shard in rnd["shards"]:
            status_path = chunk_dir / (shard["name"][: -len(".tar")] + ".parquet")
            t = pq.read_table(status_path, columns=[UID_COL, "status", "error_message"]).to_pydict()
            for uid, status, message in zip(t[UID_COL], t["status"], t["error_message"], strict=True):
                latest[str(uid)] = (status, message)
    return latest


def _summarise_state(chunk_dir: Path, marker: dict, uids: Iterable[Any]) -> None:
    """Fill the marker's current totals: per input uid, the outcome of its latest attempt."""
    latest = _latest_status(chunk_dir, marker["rounds"])
    failures: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    successes = 0
    for uid in uids:
        status, message = latest.get(str(uid), ("missing", "no status row written by img2dataset"))
        if status == "success":
            successes += 1
        else:
            by_status[status or "unknown"] += 1
            failures[failure_class(message, status)] += 1
    marker["successes"] = successes
    marker["failed"] = marker["input_rows"] - successes
    marker["failures"] = dict(sorted(failures.items()))
    marker["failures_by_status"] = dict(sorted(by_status.items()))


def read_chunk_marker(chunk_dir: Path | str) -> dict[str, Any] | None:
    """The `_SUCCESS` record of a complete chunk folder, or None when the chunk is not complete
    (no or unreadable marker, or a listed shard's tar, status Parquet or stats json is missing)."""
    marker, _ = _chunk_state(Path(chunk_dir))
    return marker


def _chunk_state(chunk_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) for a complete chunk; (None, None) without a valid marker (not finished);
    (None, what is wrong) when the marker lists a file that is missing or has another size."""
    try:
        marker = json.loads((chunk_dir / SUCCESS_NAME).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return None, None
    for rnd in marker.get("rounds", []):
        for shard in rnd.get("shards", []):
            tar = chunk_dir / shard["name"]
            stem = str(tar)[: -len(".tar")]
            if not tar.is_file():
                return None, f"shard {tar} is missing"
            if tar.stat().st_size != shard["bytes"]:
                return (
                    None,
                    f"shard {tar} is {tar.stat().st_size} bytes, {SUCCESS_NAME} records {shard['bytes']}",
                )
            for other in (Path(stem + ".parquet"), Path(stem + "_stats.json")):
                if not other.is_file():
                    return None, f"{other} is missing"
    return marker, None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _listed_shards(marker: dict) -> list[str]:
    return [s["name"] for rnd in marker["rounds"] for s in rnd["shards"] if s["successes"] > 0]


def download_chunk(
    chunk_parquet: Path | str,
    out_dir: Path | str,
    settings: DownloadSettings | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Download one metadata chunk into `out_dir/<chunk stem>/` (idempotent; see the module doc).

    Returns the chunk's summary: `status` (downloaded | redone | retried | done_before), `count` (input
    rows), `successes` and `failed` (per uid, latest attempt), `new_successes` (gained by this call),
    `failures` by class and `failures_by_status`, `rounds_run`, `shards` (relative to `out_dir`, the ones
    holding samples) and `seconds`.
    """
    started = time.perf_counter()
    settings = normalize_settings(settings)
    chunk = Path(chunk_parquet).resolve()
    out_dir = Path(out_dir).resolve()
    name = chunk_name(chunk)
    chunk_dir = out_dir / name
    if not chunk.is_file():
        raise UserError(f"metadata chunk not found: {chunk}")
    fingerprint = settings_fingerprint(settings)
    marker = read_chunk_marker(chunk_dir)
    before = 0
    if marker is not None and (
        marker.get("fingerprint") != fingerprint or marker.get("input_bytes") != chunk.stat().st_size
    ):
        log.warning("chunk %s: settings or input changed since it was downloaded; downloading it again", name)
        marker = None
    rounds_run: list[str] = []
    if marker is None:
        status = "redone" if chunk_dir.exists() else "downloaded"
        table = _read_input(chunk, settings)
        if chunk_dir.exists():
            _remove(chunk_dir)  # a partial (or outdated) folder: never mix its shards with a new run's
        chunk_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        if table.num_rows:
            _run_img2dataset(chunk, chunk_dir, settings)
        marker = {
            "format_version": FORMAT_VERSION,
            "chunk": name,
            "input": str(chunk),
            "input_rows": table.num_rows,
            "input_bytes": chunk.stat().st_size,
            "fingerprint": fingerprint,
            "settings": settings.model_dump(exclude=set(RUN_ONLY_KEYS)),
            "img2dataset_version": _img2dataset_version(),
            "rounds": [
                _round_record(chunk_dir, MAIN_ROUND, table.num_rows, settings, time.perf_counter() - t0)
            ],
        }
        rounds_run.append(MAIN_ROUND)
        _summarise_state(chunk_dir, marker, table.column(UID_COL).to_pylist())
        write_json_atomic(chunk_dir / SUCCESS_NAME, marker)
    elif retry_failed and marker["failed"] > 0:
        status = "retried"
        before = marker["successes"]
        table = _read_input(chunk, settings)
        latest = _latest_status(chunk_dir, marker["rounds"])
        failed = [
            latest.get(str(u), ("missing", None))[0] != "success" for u in table.column(UID_COL).to_pylist()
        ]
        retry_table = table.filter(pa.array(failed, type=pa.bool_()))
        round_name = f"{RETRY_PREFIX}{len(marker['rounds']):03d}"
        final = chunk_dir / round_name
        # Leftovers of a retry that died before `_SUCCESS` listed it: this round replaces them.
        _remove(final)
        remove_dead_temps(p for p in chunk_dir.iterdir() if p.name.startswith(RETRY_PREFIX))
        work = tmp_name(final)
        work.mkdir()
        t0 = time.perf_counter()
        try:
            pq.write_table(retry_table, work / RETRY_INPUT_NAME)
            _run_img2dataset(work / RETRY_INPUT_NAME, work, settings)
            os.replace(work, final)
        finally:
            if work.exists():
                shutil.rmtree(work)
        marker["rounds"].append(
            _round_record(chunk_dir, round_name, retry_table.num_rows, settings, time.perf_counter() - t0)
        )
        rounds_run.append(round_name)
        _summarise_state(chunk_dir, marker, table.column(UID_COL).to_pylist())
        write_json_atomic(chunk_dir / SUCCESS_NAME, marker)
    else:
        status = "done_before"
        before = marker["successes"]
    return {
        "chunk": name,
        "input": str(chunk),
        "dir": str(chunk_dir),
        "status": status,
        "rounds_run": rounds_run,
        "count": marker["input_rows"],
        "successes": marker["successes"],
        "new_successes": marker["successes"] - before,
        "failed": marker["failed"],
        "failures": marker["failures"],
        "failures_by_status": marker["failures_by_status"],
        "rounds": len(marker["rounds"]),
        "shards": [f"{name}/{s}" for s in _listed_shards(marker)],
        "seconds": round(time.perf_counter() - started, 3),
    }
