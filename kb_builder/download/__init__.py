"""Download stage: image-text metadata Parquet chunks (DataComp layout: `url`, `text`, `uid`) to
webdataset shards, with img2dataset (https://github.com/rom1504/img2dataset) used as a library.

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
rounds (`00000.tar` everywhere): name per-shard outputs with `downloaded_shard_name`, not `Path.name`.

Engines: with `processes_count == 1` (the default, one chunk per Dask worker) img2dataset's Reader,
Resizer and Downloader run inside the calling process; `img2dataset.download()` itself cannot run in a
Dask task (it installs a SIGINT handler, which only the main thread may do, and starts a process pool,
which a daemonic worker may not) and spawns three interpreters per call. With `processes_count > 1`,
`img2dataset.download()` runs in a subprocess with its own process pool. Both write the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.atomic import is_leftover_tmp, tmp_name, write_json_atomic
from artifacts.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUCCESS_NAME = "_SUCCESS"
LOG_NAME = "_img2dataset.log"
RETRY_PREFIX = "retry-"
RETRY_INPUT_NAME = "_input.parquet"
UID_COL = "uid"
MAIN_ROUND = "."
_RETRY_RE = re.compile(r"^retry-(\d{3,})$")

# img2dataset's own defaults, except caption_col ("text", DataComp's) and thread_count (its 256 is sized
# for one process per core over the open internet).
DEFAULT_SETTINGS: dict[str, Any] = {
    "url_col": "url",
    "caption_col": "text",
    "image_size": 256,
    "resize_mode": "border",
    "resize_only_if_bigger": False,
    "upscale_interpolation": "lanczos",
    "downscale_interpolation": "area",
    "encode_format": "jpg",
    "encode_quality": None,  # None: 95 for jpg/webp, 9 for png (png's "quality" is a 0-9 compression)
    "skip_reencode": False,
    "disable_all_reencoding": False,
    "min_image_size": 0,
    "max_image_area": None,  # None: no limit (img2dataset's float("inf"), which JSON cannot hold)
    "max_aspect_ratio": None,
    "number_sample_per_shard": 10000,
    "extract_exif": True,
    "compute_hash": "sha256",
    "user_agent_token": None,
    "disallowed_header_directives": None,  # None: img2dataset's default (noai, noimageai, noindex, ...)
    "processes_count": 1,
    "thread_count": 64,
    "timeout": 10,
    "retries": 0,
    "max_shard_retry": 1,
}
# Settings that change how a chunk is fetched but not what it contains: changing them never redoes a chunk.
RUN_ONLY_KEYS = frozenset({"processes_count", "thread_count", "timeout", "retries", "max_shard_retry"})
# download() arguments this stage fixes itself.
_FIXED_KEYS = frozenset(
    {
        "url_list", "input_format", "output_format", "output_folder", "save_additional_columns",
        "incremental_mode", "enable_wandb", "wandb_project", "distributor", "subjob_size",
        "oom_shard_count", "bbox_col", "verify_hash",
    }
)  # fmt: skip
_RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
_ENCODE_FORMATS = ("jpg", "png", "webp")
_OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5-digit (00000.tar)


@dataclass(frozen=True)
class DownloadTask:
    """One unit of work: download `chunk` (a metadata Parquet file) into `out_dir/<chunk stem>/`."""

    chunk: Path
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The chunk's folder name under `out_dir`."""
        return chunk_name(self.chunk)


def chunk_name(chunk: Path | str) -> str:
    """The folder name of a chunk: its file name without `.parquet`."""
    name = Path(chunk).name
    return name[: -len(".parquet")] if name.endswith(".parquet") else Path(name).stem


# ------------------------------------------------------------------------------------------- settings
def normalize_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """`settings` over DEFAULT_SETTINGS, validated; a UserError names the first bad key."""
    settings = dict(settings or {})
    fixed = sorted(set(settings) & _FIXED_KEYS)
    if fixed:
        raise UserError(f"download settings: {', '.join(fixed)} is set by the download stage itself")
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise UserError(
            f"download settings: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(DEFAULT_SETTINGS))}"
        )
    out = {**DEFAULT_SETTINGS, **settings}
    for key in ("image_size", "number_sample_per_shard", "processes_count", "thread_count", "timeout"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise UserError(f"download settings: {key} must be an integer >= 1, got {out[key]!r}")
    for key in ("retries", "max_shard_retry", "min_image_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise UserError(f"download settings: {key} must be an integer >= 0, got {out[key]!r}")
    if out["resize_mode"] not in _RESIZE_MODES:
        raise UserError(
            f"download settings: resize_mode must be one of {_RESIZE_MODES}, got {out['resize_mode']!r}"
        )
    if out["encode_format"] not in _ENCODE_FORMATS:
        raise UserError(
            f"download settings: encode_format must be one of {_ENCODE_FORMATS}, got {out['encode_format']!r}"
        )
    if out["encode_quality"] is None:
        out["encode_quality"] = 9 if out["encode_format"] == "png" else 95
    if not isinstance(out["url_col"], str) or not out["url_col"]:
        raise UserError(f"download settings: url_col must be a column name, got {out['url_col']!r}")
    if out["caption_col"] is not None and not isinstance(out["caption_col"], str):
        raise UserError(
            f"download settings: caption_col must be a column name or null, got {out['caption_col']!r}"
        )
    if UID_COL in (out["url_col"], out["caption_col"]):
        raise UserError(f"download settings: the {UID_COL!r} column cannot also be the url or caption column")
    return out


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """Hash of the settings that determine a chunk's content (everything but RUN_ONLY_KEYS)."""
    content = {k: v for k, v in sorted(normalize_settings(settings).items()) if k not in RUN_ONLY_KEYS}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- failures
_SIMPLE_REASONS = {
    "image too small": "image_too_small",
    "image area too large": "image_area_too_large",
    "aspect ratio too large": "aspect_ratio_too_large",
    "hash mismatch": "hash_mismatch",
    "image decoding error": "decode_error",
    "use of image disallowed by x-robots-tag directive": "disallowed_by_x_robots_tag",
}


def failure_class(message: str | None, status: str | None = None) -> str:
    """A short class for img2dataset's free-text `error_message` (urllib, OpenCV and resizer texts).

    HTTP errors keep their code (`http_404`), so a report tells dead links from throttling (`http_429`,
    `http_503`), which a retry may fix.
    """
    if not message:
        return status or "unknown"
    text = message.strip()
    low = text.lower()
    http = re.match(r"http error (\d{3})", low)
    if http:
        return f"http_{http.group(1)}"
    if low in _SIMPLE_REASONS:
        return _SIMPLE_REASONS[low]
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "!buf.empty()" in low:
        return "empty_file"  # OpenCV's assertion on a zero-byte body
    if low.startswith("opencv"):
        return "image_processing_error"
    if "connection refused" in low:
        return "connection_refused"
    if any(s in low for s in ("name or service not known", "nodename nor servname", "name resolution")):
        return "dns_error"
    if "ssl" in low or "certificate" in low:
        return "ssl_error"
    if "unknown url type" in low or "no host given" in low:
        return "bad_url"
    if any(s in low for s in ("urlopen error", "connection reset", "remote end closed", "incompleteread")):
        return "connection_error"
    return "other"


# ----------------------------------------------------------------------------------------------- plan
def plan_download(
    metadata: Path | str | Sequence[Path | str], out_dir: Path | str, settings: dict[str, Any] | None = None
) -> list[DownloadTask]:
    """One task per metadata Parquet chunk: a directory means its `*.parquet` files (sorted)."""
    settings = normalize_settings(settings)
    items = [metadata] if isinstance(metadata, (str, Path)) else list(metadata)
    chunks: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.parquet") if q.is_file() and not is_leftover_tmp(q))
            if not found:
                raise UserError(f"no metadata Parquet files (*.parquet) in {p}")
            chunks.extend(found)
        elif p.is_file():
            if not p.name.endswith(".parquet"):
                raise UserError(f"metadata file {p} is not a .parquet file")
            chunks.append(p)
        else:
            raise UserError(f"metadata path not found: {p}")
    if not chunks:
        raise UserError("no metadata Parquet files given")
    unique: dict[Path, Path] = {}
    for c in chunks:  # the same file named twice is one task, never two concurrent runs of a chunk
        unique.setdefault(c.resolve(), c)
    seen: dict[str, Path] = {}
    for c in unique.values():
        name = chunk_name(c)
        if not name or name.startswith(("_", ".")):
            raise UserError(f"metadata file {c}: a chunk name may not start with '_' or '.'")
        if name in seen:
            raise UserError(f"metadata files {seen[name]} and {c} would share the output folder {name}/")
        seen[name] = c
    out = Path(out_dir).resolve()
    return [DownloadTask(resolved, out, settings) for resolved in unique]


# -------------------------------------------------------------------------------------------- running
def _read_input(chunk: Path, settings: dict[str, Any]) -> pa.Table:
    """The url / caption / uid columns of a chunk, validated (UserError on bad input)."""
    if not chunk.is_file():
        raise UserError(f"metadata chunk not found: {chunk}")
    cols = [settings["url_col"], UID_COL] + ([settings["caption_col"]] if settings["caption_col"] else [])
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
    if len(set(map(str, uids.to_pylist()))) != table.num_rows:
        raise UserError(f"metadata chunk {chunk}: the {UID_COL} column has duplicates")
    return table


def _img2dataset_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img2dataset")
    except PackageNotFoundError:
        return "not installed"


def _quiet_env() -> dict[str, str]:
    # albumentations (imported by img2dataset) checks PyPI for updates at import; wandb stays off.
    return {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


def _download_kwargs(input_parquet: Path, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """img2dataset.download() arguments for one run (also what the in-process engine mirrors)."""
    s = settings
    return {
        "url_list": str(input_parquet),
        "input_format": "parquet",
        "url_col": s["url_col"],
        "caption_col": s["caption_col"],
        "save_additional_columns": [UID_COL],
        "output_format": "webdataset",
        "output_folder": str(folder),
        # "overwrite" deletes the output folder after creating `_tmp` in it (1.47.0), so the run fails;
        # the folder is always fresh here, so "incremental" has nothing to skip.
        "incremental_mode": "incremental",
        "enable_wandb": False,
        "distributor": "multiprocessing",
        "processes_count": s["processes_count"],
        "thread_count": s["thread_count"],
        "image_size": s["image_size"],
        "resize_mode": s["resize_mode"],
        "resize_only_if_bigger": s["resize_only_if_bigger"],
        "upscale_interpolation": s["upscale_interpolation"],
        "downscale_interpolation": s["downscale_interpolation"],
        "encode_format": s["encode_format"],
        "encode_quality": s["encode_quality"],
        "skip_reencode": s["skip_reencode"],
        "disable_all_reencoding": s["disable_all_reencoding"],
        "min_image_size": s["min_image_size"],
        "max_image_area": float("inf") if s["max_image_area"] is None else s["max_image_area"],
        "max_aspect_ratio": float("inf") if s["max_aspect_ratio"] is None else s["max_aspect_ratio"],
        "number_sample_per_shard": s["number_sample_per_shard"],
        "extract_exif": s["extract_exif"],
        "compute_hash": s["compute_hash"],
        "timeout": s["timeout"],
        "retries": s["retries"],
        "max_shard_retry": s["max_shard_retry"],
        "user_agent_token": s["user_agent_token"],
        "disallowed_header_directives": s["disallowed_header_directives"],
    }


def _run_in_process(kwargs: dict[str, Any]) -> None:
    """img2dataset's Reader -> Downloader (threads) -> WebDatasetSampleWriter, in this process.

    The same components and files as `download()` with processes_count=1, without its SIGINT handler,
    logger process and one-process pool. Failed img2dataset shards are retried max_shard_retry times.
    """
    for k, v in _quiet_env().items():
        os.environ.setdefault(k, v)
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    folder = Path(kwargs["output_folder"])
    tmp_path = folder / "_tmp"
    tmp_path.mkdir(parents=True, exist_ok=True)
    directives = kwargs["disallowed_header_directives"]
    if directives is None:
        directives = ["noai", "noimageai", "noindex", "noimageindex"]
    reader = Reader(
        url_list=kwargs["url_list"],
        input_format="parquet",
        url_col=kwargs["url_col"],
        caption_col=kwargs["caption_col"],
        verify_hash_col=None,
        verify_hash_type=None,
        save_additional_columns=kwargs["save_additional_columns"],
        number_sample_per_shard=kwargs["number_sample_per_shard"],
        done_shards=set(),
        tmp_path=str(tmp_path),
        start_shard_id=0,
    )
    resizer = Resizer(
        image_size=kwargs["image_size"],
        resize_mode=kwargs["resize_mode"],
        resize_only_if_bigger=kwargs["resize_only_if_bigger"],
        upscale_interpolation=kwargs["upscale_interpolation"],
        downscale_interpolation=kwargs["downscale_interpolation"],
        encode_quality=kwargs["encode_quality"],
        encode_format=kwargs["encode_format"],
        skip_reencode=kwargs["skip_reencode"],
        disable_all_reencoding=kwargs["disable_all_reencoding"],
        min_image_size=kwargs["min_image_size"],
        max_image_area=kwargs["max_image_area"],
        max_aspect_ratio=kwargs["max_aspect_ratio"],
        blurrer=None,
    )
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=kwargs["thread_count"],
        save_caption=kwargs["caption_col"] is not None,
        extract_exif=kwargs["extract_exif"],
        output_folder=str(folder),
        column_list=reader.column_list,
        timeout=kwargs["timeout"],
        number_sample_per_shard=kwargs["number_sample_per_shard"],
        oom_shard_count=_OOM_SHARD_COUNT,
        compute_hash=kwargs["compute_hash"],
        verify_hash_type=None,
        encode_format=kwargs["encode_format"],
        retries=kwargs["retries"],
        user_agent_token=kwargs["user_agent_token"],
        disallowed_header_directives=list(directives) or None,
        blurring_bbox_col=None,
    )
    failed = [row for row in reader if not downloader(row)[0]]
    for _ in range(kwargs["max_shard_retry"]):
        if not failed:
            break
        failed = [row for row in failed if not downloader(row)[0]]
    shutil.rmtree(tmp_path, ignore_errors=True)


def _in_process_supported() -> bool:
    """Whether the installed img2dataset has the component signatures `_run_in_process` uses (checked
    against 1.47.0); otherwise every run goes through `download()` in a subprocess."""
    import inspect

    for k, v in _quiet_env().items():
        os.environ.setdefault(k, v)
    try:
        from img2dataset.downloader import Downloader
        from img2dataset.reader import Reader
        from img2dataset.resizer import Resizer
    except ImportError:
        return False
    needs = {
        Reader: {"url_list", "url_col", "caption_col", "save_additional_columns", "done_shards", "tmp_path"},
        Resizer: {"image_size", "resize_mode", "encode_format", "max_aspect_ratio", "blurrer"},
        Downloader: {"sample_writer_class", "column_list", "oom_shard_count", "disallowed_header_directives"},
    }
    return all(names <= set(inspect.signature(cls.__init__).parameters) for cls, names in needs.items())


_SUBPROCESS_MAIN = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"


def _run_img2dataset(input_parquet: Path, folder: Path, settings: dict[str, Any]) -> None:
    """Run img2dataset on `input_parquet` into the empty folder `folder`; its console output goes to
    `folder/_img2dataset.log`."""
    kwargs = _download_kwargs(input_parquet, folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_NAME
    if settings["processes_count"] > 1 or not _in_process_supported():
        # JSON has no infinity: leave unset limits to img2dataset's defaults (no limit).
        kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, float) and math.isinf(v))}
        with open(log_path, "ab") as out:
            proc = subprocess.run(
                [sys.executable, "-c", _SUBPROCESS_MAIN, json.dumps(kwargs)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **_quiet_env()},
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"img2dataset exited with status {proc.returncode} for {input_parquet}; see {log_path}"
            )
        return
    # img2dataset prints progress and tracebacks: keep them in the chunk's log, not the user's console.
    with open(log_path, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        _run_in_process(kwargs)


def _shard_stem(index: int) -> str:
    return f"{index:0{_OOM_SHARD_COUNT}d}"


def _round_record(
    chunk_dir: Path, round_name: str, n_rows: int, settings: dict[str, Any], seconds: float
) -> dict:
    """Check that img2dataset finished every shard of a round (tar, status Parquet and stats json) and
    summarise it; a RuntimeError (the chunk stays incomplete) names the shards it did not finish."""
    folder = chunk_dir if round_name == MAIN_ROUND else chunk_dir / round_name
    prefix = "" if round_name == MAIN_ROUND else f"{round_name}/"
    n_shards = math.ceil(n_rows / settings["number_sample_per_shard"])
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
    chunk_dir = Path(chunk_dir)
    try:
        marker = json.loads((chunk_dir / SUCCESS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return None
    for rnd in marker.get("rounds", []):
        for shard in rnd.get("shards", []):
            tar = chunk_dir / shard["name"]
            stem = str(tar)[: -len(".tar")]
            if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
                return None
            if not (Path(stem + ".parquet").is_file() and Path(stem + "_stats.json").is_file()):
                return None
    return marker


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
    settings: dict[str, Any] | None = None,
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
            "settings": {k: v for k, v in settings.items() if k not in RUN_ONLY_KEYS},
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
        for p in chunk_dir.iterdir():
            if p.name == round_name or (is_leftover_tmp(p) and p.name.startswith(RETRY_PREFIX)):
                _remove(p)
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


def _download_task(task: DownloadTask, retry_failed: bool = False) -> dict[str, Any]:
    """The Dask task: one chunk."""
    return download_chunk(task.chunk, task.out_dir, task.settings, retry_failed=retry_failed)


def run_download(client: Any, tasks: Sequence[DownloadTask], retry_failed: bool = False) -> dict[str, Any]:
    """Run every task (one per chunk) on the Dask `client`, or one after another here when it is None,
    and aggregate: `totals` (chunks, samples, successes, failed, new_successes, shards), `status` (chunks
    per outcome), `failures` by class, `failures_by_status`, `per_chunk` (each chunk's summary)."""
    started = time.perf_counter()
    tasks = list(tasks)
    if client is None:
        results = [_download_task(t, retry_failed) for t in tasks]
    else:
        # The same progress bar and ordering as the other stages (pipelines is imported only here).
        from pipelines.dask_runner import run_tasks

        results = run_tasks(
            client, _download_task, tasks, desc="download", unit="chunk", count_key="new_successes",
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
        "settings": tasks[0].settings if tasks else {},
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
    valid `_SUCCESS` are never listed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"download directory not found: {out_dir}")
    paths: list[Path] = []
    for chunk_dir in sorted(p for p in out_dir.iterdir() if p.is_dir() and not is_leftover_tmp(p)):
        marker = read_chunk_marker(chunk_dir)
        if marker is not None:
            paths.extend(chunk_dir / s for s in _listed_shards(marker))
    return sorted(paths)


def downloaded_shard_name(out_dir: Path | str, shard: Path | str) -> str:
    """A flat name unique within `out_dir` for a downloaded shard, for naming per-shard outputs:
    `<chunk>/00000.tar` -> `<chunk>-00000`, `<chunk>/retry-001/00000.tar` -> `<chunk>-retry-001-00000`."""
    rel = Path(shard).resolve().relative_to(Path(out_dir).resolve())
    return "-".join(rel.with_suffix("").parts)
