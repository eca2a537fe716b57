"""Download settings (img2dataset's, validated), failure classes, and the plan: one task per chunk."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retformer.artifacts.atomic import is_leftover_tmp
from retformer.artifacts.errors import UserError

FORMAT_VERSION = 1
SUCCESS_NAME = "_SUCCESS"
LOG_NAME = "_img2dataset.log"
RETRY_PREFIX = "retry-"
RETRY_INPUT_NAME = "_input.parquet"
UID_COL = "uid"
MAIN_ROUND = "."

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
    # Our limits per request (kb_builder/download/fetch.py; img2dataset has none of them): bytes of one
    # response, pixels of one image (read from its header before anything is decoded: Pillow's own
    # decompression-bomb limit), and seconds for the whole request (`timeout` is per socket operation).
    "max_bytes": 20 * 1024 * 1024,
    "max_pixels": 89_478_485,
    "deadline": 60,
}
FETCH_LIMIT_KEYS = ("max_bytes", "max_pixels", "deadline")
# Settings that change how a chunk is fetched but not what it contains: changing them never redoes a chunk.
# The fetch limits are here too, as `timeout` is: a chunk fetched under other limits is kept (use
# retry_failed to fetch its failures again under new ones).
RUN_ONLY_KEYS = frozenset(
    {"processes_count", "thread_count", "timeout", "retries", "max_shard_retry", *FETCH_LIMIT_KEYS}
)
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
    for key in (
        "image_size", "number_sample_per_shard", "processes_count", "thread_count", "timeout",
        "max_bytes", "max_pixels",
    ):  # fmt: skip
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise UserError(f"download settings: {key} must be an integer >= 1, got {out[key]!r}")
    for key in ("retries", "max_shard_retry", "min_image_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise UserError(f"download settings: {key} must be an integer >= 0, got {out[key]!r}")
    deadline = out["deadline"]
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0:
        raise UserError(f"download settings: deadline must be a number of seconds > 0, got {deadline!r}")
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


_FETCH_REFUSALS = {
    "unsupported url scheme": "unsupported_scheme",
    "response over max_bytes": "too_many_bytes",
    "deadline of": "deadline_exceeded",
    "image of": "too_many_pixels",
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
    for prefix, reason in _FETCH_REFUSALS.items():  # fetch.py's own texts
        if low.startswith(prefix):
            return reason
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
