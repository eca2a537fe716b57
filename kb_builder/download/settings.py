"""Download settings (img2dataset's, validated), failure classes, and the plan: one task per chunk."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retformer.artifacts.atomic import is_leftover_tmp
from retformer.artifacts.errors import UserError
from retformer.kb_builder.download.settings_schema import DownloadSettings, normalize_settings

FORMAT_VERSION = 1
SUCCESS_NAME = "_SUCCESS"
LOG_NAME = "_img2dataset.log"
RETRY_PREFIX = "retry-"
RETRY_INPUT_NAME = "_input.parquet"
MAIN_ROUND = "."

FETCH_LIMIT_KEYS = ("max_bytes", "max_pixels", "deadline")
# Settings that change how a chunk is fetched but not what it contains: changing them never redoes a chunk.
# The fetch limits are here too, as `timeout` is: a chunk fetched under other limits is kept (use
# retry_failed to fetch its failures again under new ones).
RUN_ONLY_KEYS = frozenset(
    {"processes_count", "thread_count", "timeout", "retries", "max_shard_retry", *FETCH_LIMIT_KEYS}
)
_OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5-digit (00000.tar)


@dataclass(frozen=True)
class DownloadTask:
    """One unit of work: download `chunk` (a metadata Parquet file) into `out_dir/<chunk stem>/`."""

    chunk: Path
    out_dir: Path
    settings: DownloadSettings = field(default_factory=lambda: normalize_settings(None))

    @property
    def name(self) -> str:
        """The chunk's folder name under `out_dir`."""
        return chunk_name(self.chunk)


def chunk_name(chunk: Path | str) -> str:
    """The folder name of a chunk: its file name without `.parquet`."""
    name = Path(chunk).name
    return name[: -len(".parquet")] if name.endswith(".parquet") else Path(name).stem


# ------------------------------------------------------------------------------------------- settings
def settings_fingerprint(settings: DownloadSettings) -> str:
    """Hash of the settings that determine a chunk's content (everything but RUN_ONLY_KEYS)."""
    content = {k: v for k, v in sorted(settings.model_dump().items()) if k not in RUN_ONLY_KEYS}
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
    metadata: Path | str | Sequence[Path | str],
    out_dir: Path | str,
    settings: DownloadSettings | None = None,
) -> list[DownloadTask]:
    """One task per metadata Parquet chunk: a directory means its `*.parquet` files (sorted); `settings`
    as `normalize_settings` checked them (None: the defaults)."""
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
