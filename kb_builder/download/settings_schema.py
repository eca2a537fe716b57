"""The img2dataset download settings' schema (`source.settings` of an img2dataset KB) and their check.

`DownloadSettings` holds every key with its default (img2dataset's own, except caption_col "text",
DataComp's, and thread_count: its 256 is sized for one process per core over the open internet);
`normalize_settings` checks a manifest's mapping against it, one `UserError` line naming the first bad
key, and fills `encode_quality`. The values are kept exactly as given (no coercion): the chunk
fingerprint hashes them, so an int stays an int.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from retformer.artifacts.errors import UserError

UID_COL = "uid"
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


class DownloadSettings(BaseModel):
    """img2dataset's settings for the download stage, each with its default (the field order is the
    order of the records and of the fingerprinted dict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url_col: str = "url"
    caption_col: str | None = "text"
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: str = "jpg"
    encode_quality: int | None = (
        None  # None: 95 for jpg/webp, 9 for png (png's "quality" is a 0-9 compression)
    )
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    min_image_size: int = 0
    max_image_area: float | None = None  # None: no limit (img2dataset's float("inf"), which JSON cannot hold)
    max_aspect_ratio: float | None = None
    number_sample_per_shard: int = 10000
    extract_exif: bool = True
    compute_hash: str | None = "sha256"
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] | None = None  # None: img2dataset's (noai, noimageai, ...)
    processes_count: int = 1
    thread_count: int = 64
    timeout: int = 10
    retries: int = 0
    max_shard_retry: int = 1
    # Our limits per request (kb_builder/download/fetch.py; img2dataset has none of them): bytes of one
    # response, pixels of one image (read from its header before anything is decoded: Pillow's own
    # decompression-bomb limit), and seconds for the whole request (`timeout` is per socket operation).
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 89_478_485
    deadline: float = 60


# Every key with its default, in the schema's order.
DEFAULT_SETTINGS: dict[str, Any] = {key: f.default for key, f in DownloadSettings.model_fields.items()}


def normalize_settings(settings: DownloadSettings | dict[str, Any] | None) -> DownloadSettings:
    """`settings` over the defaults, validated; a UserError names the first bad key. Settings already
    checked come back as they are."""
    if isinstance(settings, DownloadSettings):
        return settings
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
    # Checked above; built without coercion so that the records and the fingerprint hold the values given.
    return DownloadSettings.model_construct(**out)
