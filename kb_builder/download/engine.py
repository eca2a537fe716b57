"""Running img2dataset on one input Parquet: in this process (its components) or in a subprocess."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from retformer.kb_builder.download.settings import _OOM_SHARD_COUNT, FETCH_LIMIT_KEYS, LOG_NAME
from retformer.kb_builder.download.settings_schema import UID_COL, DownloadSettings


def _img2dataset_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img2dataset")
    except PackageNotFoundError:
        return "not installed"


def _quiet_env() -> dict[str, str]:
    # albumentations (imported by img2dataset) checks PyPI for updates at import; wandb stays off.
    return {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


def _download_kwargs(input_parquet: Path, folder: Path, settings: DownloadSettings) -> dict[str, Any]:
    """img2dataset.download() arguments for one run (also what the in-process engine mirrors)."""
    s = settings
    return {
        "url_list": str(input_parquet),
        "input_format": "parquet",
        "url_col": s.url_col,
        "caption_col": s.caption_col,
        "save_additional_columns": [UID_COL],
        "output_format": "webdataset",
        "output_folder": str(folder),
        # "overwrite" deletes the output folder after creating `_tmp` in it (1.47.0), so the run fails;
        # the folder is always fresh here, so "incremental" has nothing to skip.
        "incremental_mode": "incremental",
        "enable_wandb": False,
        "distributor": "multiprocessing",
        "processes_count": s.processes_count,
        "thread_count": s.thread_count,
        "image_size": s.image_size,
        "resize_mode": s.resize_mode,
        "resize_only_if_bigger": s.resize_only_if_bigger,
        "upscale_interpolation": s.upscale_interpolation,
        "downscale_interpolation": s.downscale_interpolation,
        "encode_format": s.encode_format,
        "encode_quality": s.encode_quality,
        "skip_reencode": s.skip_reencode,
        "disable_all_reencoding": s.disable_all_reencoding,
        "min_image_size": s.min_image_size,
        "max_image_area": float("inf") if s.max_image_area is None else s.max_image_area,
        "max_aspect_ratio": float("inf") if s.max_aspect_ratio is None else s.max_aspect_ratio,
        "number_sample_per_shard": s.number_sample_per_shard,
        "extract_exif": s.extract_exif,
        "compute_hash": s.compute_hash,
        "timeout": s.timeout,
        "retries": s.retries,
        "max_shard_retry": s.max_shard_retry,
        "user_agent_token": s.user_agent_token,
        "disallowed_header_directives": s.disallowed_header_directives,
    }


# download() arguments that img2dataset's Resizer takes under the same names.
_RESIZER_KEYS = (
    "image_size", "resize_mode", "resize_only_if_bigger", "upscale_interpolation", "downscale_interpolation",
    "encode_quality", "encode_format", "skip_reencode", "disable_all_reencoding", "min_image_size",
    "max_image_area", "max_aspect_ratio",
)  # fmt: skip


def _run_in_process(kwargs: dict[str, Any], limits: dict[str, Any]) -> None:
    """img2dataset's Reader -> Downloader (threads) -> WebDatasetSampleWriter, in this process.

    The same components and files as `download()` with processes_count=1, without its SIGINT handler,
    logger process and one-process pool. Failed img2dataset shards are retried max_shard_retry times.
    Fetching is `fetch.py`'s, within `limits` (FetchLimits fields).
    """
    for k, v in _quiet_env().items():
        os.environ.setdefault(k, v)
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from retformer.kb_builder.download.fetch import FetchLimits, SafeDownloader

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
    resizer = Resizer(blurrer=None, **{key: kwargs[key] for key in _RESIZER_KEYS})
    downloader = SafeDownloader(
        limits=FetchLimits(**limits),
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


# The spawned pool processes of download() get the limits with the pickled SafeDownloader.
_SUBPROCESS_MAIN = (
    "import json, sys; from retformer.kb_builder.download.fetch import install_in_download; "
    "install_in_download(json.loads(sys.argv[2])); "
    "from img2dataset import download; download(**json.loads(sys.argv[1]))"
)


def _run_img2dataset(input_parquet: Path, folder: Path, settings: DownloadSettings) -> None:
    """Run img2dataset on `input_parquet` into the empty folder `folder`; its console output goes to
    `folder/_img2dataset.log`."""
    kwargs = _download_kwargs(input_parquet, folder, settings)
    limits = {key: getattr(settings, key) for key in FETCH_LIMIT_KEYS}
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_NAME
    if settings.processes_count > 1 or not _in_process_supported():
        # JSON has no infinity: leave unset limits to img2dataset's defaults (no limit).
        kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, float) and math.isinf(v))}
        with open(log_path, "ab") as out:
            proc = subprocess.run(
                [sys.executable, "-c", _SUBPROCESS_MAIN, json.dumps(kwargs), json.dumps(limits)],
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
        _run_in_process(kwargs, limits)
